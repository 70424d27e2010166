// The batch-norm CPU kernels (cpu_kernels.h) as Python functions.
//
// Arguments are ints (data pointers, sizes, flags; None for an absent tensor)
// and floats, never tensors, so this file needs only the Python headers and
// compiles in seconds. bnlab.kernels._cpu_native checks every tensor before
// it hands over a pointer. Pointers refer to contiguous memory of the types
// the dtype code says (see the entry points in cpu_kernels.h); mean, var and
// invstd (in or out) are float64. The module also hands the same entry points
// to the autograd node (cpu_node.cpp) as the capsule KERNELS (cpu_kernels_api.h).

#include "cpu_kernels.h"

namespace {

bool valid_dtype(int64_t code) {
    if (code >= 0 && code < kDtypes) return true;
    PyErr_Format(PyExc_ValueError, "unknown dtype code %lld", static_cast<long long>(code));
    return false;
}

inline Stats stats_of(PyObject* const* a) {
    return Stats{static_cast<double*>(ptr(a[0])), static_cast<double*>(ptr(a[1])),
                 static_cast<double*>(ptr(a[2]))};
}

// forward_train(x, y, weight, bias, mean, var, invstd, running_mean, running_var,
//               running_is_double, momentum, eps, dtype, outer, C, inner, threads)
// mean, var (biased), invstd: (C,) outputs, or all three None, or var alone
// None. The running buffers, when given, move by
// r <- (1 - momentum)*r + momentum*s (unbiased variance).
PyObject* py_forward_train(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 17, "forward_train")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]), *w = ptr(a[2]), *b = ptr(a[3]);
    Stats stats = stats_of(a + 4);
    const Running run{ptr(a[7]), ptr(a[8]), int(i64(a[9])), f64(a[10])};
    const double eps = f64(a[11]);
    const int64_t dtype = i64(a[12]);
    const Geometry g{i64(a[13]), i64(a[14]), i64(a[15])};
    const int threads = int(i64(a[16]));
    if (PyErr_Occurred() || !valid_dtype(dtype)) return nullptr;
    std::vector<double> scratch;
    stats = with_scratch(stats, scratch, g.C);
    MaybeReleaseGil gil(g.numel());
    run_forward_train(dtype, x, y, w, b, stats, run, eps, g, threads);
    Py_RETURN_NONE;
}

// forward_eval(x, y, weight, bias, mean, var, invstd, running_mean, running_var,
//              running_is_double, eps, dtype, outer, C, inner, threads)
// Normalizes with the running statistics; mean, var, invstd: (C,) outputs, or
// all three None, or var alone None.
PyObject* py_forward_eval(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 16, "forward_eval")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]), *w = ptr(a[2]), *b = ptr(a[3]);
    Stats stats = stats_of(a + 4);
    const Running run{ptr(a[7]), ptr(a[8]), int(i64(a[9]) != 0), 0.0};
    const double eps = f64(a[10]);
    const int64_t dtype = i64(a[11]);
    const Geometry g{i64(a[12]), i64(a[13]), i64(a[14])};
    const int threads = int(i64(a[15]));
    if (PyErr_Occurred() || !valid_dtype(dtype)) return nullptr;
    std::vector<double> scratch;
    stats = with_scratch(stats, scratch, g.C);
    MaybeReleaseGil gil(g.numel());
    run_forward_eval(dtype, x, y, w, b, stats, run, eps, g, threads);
    Py_RETURN_NONE;
}

// backward(dy, x, dx, weight, mean, invstd, dweight, dbias, batch_stats, dtype, outer, C,
//          inner, threads)
PyObject* py_backward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 14, "backward")) return nullptr;
    void *dy = ptr(a[0]), *x = ptr(a[1]), *dx = ptr(a[2]), *w = ptr(a[3]);
    const double* mean = static_cast<const double*>(ptr(a[4]));
    const double* invstd = static_cast<const double*>(ptr(a[5]));
    void *dw = ptr(a[6]), *db = ptr(a[7]);
    const bool batch_stats = i64(a[8]) != 0;
    const int64_t dtype = i64(a[9]);
    const Geometry g{i64(a[10]), i64(a[11]), i64(a[12])};
    const int threads = int(i64(a[13]));
    if (PyErr_Occurred() || !valid_dtype(dtype)) return nullptr;
    MaybeReleaseGil gil(g.numel());
    run_backward(dtype, dy, x, dx, w, mean, invstd, dw, db, batch_stats, g, threads);
    Py_RETURN_NONE;
}

// The arguments of plan and inference_plan: (outer, C, inner, dtype, threads),
// to the geometry, the dtype and the team a call of them would run on.
bool plan_arguments(PyObject* const* a, Py_ssize_t nargs, const char* name, Geometry* g,
                    int64_t* dtype, int* team) {
    if (!check_nargs(nargs, 5, name)) return false;
    *g = Geometry{i64(a[0]), i64(a[1]), i64(a[2])};
    *dtype = i64(a[3]);
    const int threads = int(i64(a[4]));
    if (PyErr_Occurred() || !valid_dtype(*dtype)) return false;
    if (g->outer < 1 || g->C < 1 || g->inner < 1 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "%s: sizes and threads must be positive", name);
        return false;
    }
    *team = team_size(g->numel(), threads);
    return true;
}

// plan(...) -> (split, team): how the training passes share out a call of this
// geometry (the tests and benchmarks ask); "planes by channel in groups" where
// each thread's training forward takes its channels' planes in groups
// (plane_groups.h's trains_in_groups: the backward does too, but for 16-bit
// 10x10 and 14x14 planes).
PyObject* py_plan(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    Geometry g;
    int64_t dtype;
    int team;
    if (!plan_arguments(a, nargs, "plan", &g, &dtype, &team)) return nullptr;
    const Split split = split_of(g, kElementBytes[dtype], team);
    bool groups = false;
    with_storage(dtype, [&](auto tag) {
        groups = split == kByChannel && trains_in_groups<decltype(tag)>(g, kForwardPass);
    });
    return Py_BuildValue("(si)", groups ? "planes by channel in groups" : kSplitNames[split], team);
}

// inference_plan(...) -> (traversal, team): how inference walks it.
PyObject* py_inference_plan(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    Geometry g;
    int64_t dtype;
    int team;
    if (!plan_arguments(a, nargs, "inference_plan", &g, &dtype, &team)) return nullptr;
    const char* name = nullptr;
    with_storage(dtype, [&](auto tag) {
        name = kEvalTraversalNames[eval_traversal<decltype(tag)>(g, team)];
    });
    return Py_BuildValue("(si)", name, team);
}

// ---- the table for the autograd node (cpu_kernels_api.h) ---------------------------------------

void table_forward_train(int64_t dtype, const void* x, void* y, const void* w, const void* b,
                         double* mean, double* var, double* invstd, void* rm, void* rv,
                         bool running_is_double, double momentum, double eps, int64_t outer,
                         int64_t C, int64_t inner, int threads) {
    run_forward_train(dtype, x, y, w, b, Stats{mean, var, invstd},
                      Running{rm, rv, running_is_double, momentum}, eps, Geometry{outer, C, inner},
                      threads);
}

void table_forward_eval(int64_t dtype, const void* x, void* y, const void* w, const void* b,
                        double* mean, double* var, double* invstd, const void* rm, const void* rv,
                        bool running_is_double, double eps, int64_t outer, int64_t C,
                        int64_t inner, int threads) {
    run_forward_eval(dtype, x, y, w, b, Stats{mean, var, invstd},
                     Running{const_cast<void*>(rm), const_cast<void*>(rv), running_is_double, 0.0},
                     eps, Geometry{outer, C, inner}, threads);
}

void table_backward(int64_t dtype, const void* dy, const void* x, void* dx, const void* w,
                    const double* mean, const double* invstd, void* dw, void* db, bool batch_stats,
                    int64_t outer, int64_t C, int64_t inner, int threads) {
    run_backward(dtype, dy, x, dx, w, mean, invstd, dw, db, batch_stats,
                 Geometry{outer, C, inner}, threads);
}

const BatchNormKernels kTable = {table_forward_train, table_forward_eval, table_backward};

PyMethodDef methods[] = {
    {"forward_train", fastcall<py_forward_train>(), METH_FASTCALL,
     "Batch statistics, running-stat update and normalize, fused."},
    {"forward_eval", fastcall<py_forward_eval>(), METH_FASTCALL,
     "Normalize with running statistics."},
    {"backward", fastcall<py_backward>(), METH_FASTCALL, "Gradients of x, weight and bias."},
    {"plan", fastcall<py_plan>(), METH_FASTCALL, "How a call's work is split over threads."},
    {"inference_plan", fastcall<py_inference_plan>(), METH_FASTCALL,
     "How inference walks a call, and on how many threads."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_bnlab_bn_cpu", "bnlab's batch norm CPU kernels",
                          -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__bnlab_bn_cpu(void) {
    PyObject* module = PyModule_Create(&module_def);
    if (module && (PyModule_AddIntConstant(module, "STREAM_BYTES", long(kStreamBytes)) != 0 ||
                   PyModule_AddIntConstant(module, "STREAM_EVAL_BYTES", long(kStreamEvalBytes)) != 0 ||
                   PyModule_AddIntConstant(module, "PLANE_GROUPS", long(kPlaneGroups)) != 0 ||
                   PyModule_AddIntConstant(module, "LANES", long(kLanes)) != 0 ||
                   PyModule_AddObject(module, "KERNELS",
                                      PyCapsule_New(const_cast<BatchNormKernels*>(&kTable),
                                                    BNLAB_KERNELS_CAPSULE, nullptr)) != 0))
        Py_CLEAR(module);
    return module;
}
