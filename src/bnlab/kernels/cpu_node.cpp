// Batch norm as a C++ autograd node over bnlab's CPU kernels, for small eager calls.
//
// bnlab's autograd function (bnlab/autograd.py) is Python: its forward,
// setup_context and backward, the engine's calls into them and the checks
// before each kernel cost about 20 us a training step more than torch's
// batch norm, whose node is C++. On a small tensor that is more than the
// kernels save. This file is that function's eager work in C++: the same
// kernels (the table _bnlab_bn_cpu hands out, cpu_kernels_api.h, so the very
// same machine code), the same checks of every tensor before a pointer is
// taken, the same statistics saved for the backward. bnlab.small_calls
// decides which calls come here; transforms, forward-mode AD, tracing and
// torch.compile never do (they need the Python function's jvp and vmap rules).
//
// Beyond torch's extension API (custom autograd functions, THPVariable_*),
// this file reads one torch detail, c10's TorchDispatchModeTLS. Should a
// release move it, the build fails, bnlab warns and small calls take the
// Python function, and tests/test_small_calls.py says so.
//
// batch_norm(input, weight, bias, running_mean, running_var, training,
// momentum, eps, max_bytes) normalizes with batch statistics (training; the
// running buffers, when given, move in place) or with the running ones, or
// returns None for a call it does not take. Its backward runs the kernels; a
// backward that is itself recorded (create_graph=True) or vmapped
// (is_grads_batched) runs differentiable ATen ops instead: torch's own
// batch-norm backward with batch statistics, the per-channel affine map's
// gradient with running ones.

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "bnlab_native.h"
#include "cpu_kernels_api.h"

#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels, from the capsule _bnlab_bn_cpu.KERNELS (use_kernels); until then the node
// takes no call.
const BatchNormKernels* kernels = nullptr;

// x's memory as the array (outer, C, inner), contiguous.
struct Geometry {
    int64_t outer, C, inner;
};

// Running buffers as the kernels take them: null pointers for none.
struct Running {
    void *mean, *var;
    bool is_double;
};

constexpr const char* kOp = "bnlab node batch_norm: ";

int64_t dtype_code(const Tensor& x) {
    switch (x.scalar_type()) {
        case at::kFloat: return kFloat32;
        case at::kDouble: return kFloat64;
        case at::kBFloat16: return kBFloat16;
        case at::kHalf: return kFloat16;
        default:
            TORCH_CHECK(false, kOp, "input must be float32, float64, bfloat16 or float16, got ",
                        x.scalar_type());
    }
}

// What weight, bias and their gradients are kept in: float32 for 16-bit input, as torch keeps them.
at::ScalarType compute_type(const Tensor& x) {
    return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the kernels read x as it is: contiguous, or channels_last(_3d).
bool dense(const Tensor& x) {
    return x.is_contiguous() ||
           (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
           (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// x's memory as (outer, C, inner), contiguous: (N, C, *) contiguous, or channels_last(_3d).
Geometry geometry_of(const Tensor& x) {
    TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && x.numel() > 0, kOp,
                "input must be a non-empty (N, C, *) CPU tensor, got size ", x.sizes(), " on ",
                x.device());
    TORCH_CHECK(dense(x), kOp, "input must be contiguous or channels_last, got strides ",
                x.strides());
    const int64_t n = x.size(0), c = x.size(1);
    if (x.is_contiguous()) return Geometry{n, c, x.numel() / (n * c)};
    return Geometry{x.numel() / c, c, 1};
}

// The data of a contiguous (C,) CPU tensor of `type`; null for an undefined one.
void* vector_data(const Tensor& t, at::ScalarType type, int64_t c, const char* name) {
    if (!t.defined()) return nullptr;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.numel() == c &&
                    t.is_contiguous(),
                kOp, name, " must be a contiguous ", type, " CPU tensor of ", c,
                " elements, got ", t.scalar_type(), " of size ", t.sizes(), " on ", t.device());
    return t.data_ptr();
}

Running running_of(const Tensor& mean, const Tensor& var, int64_t c) {
    if (!mean.defined() && !var.defined()) return Running{nullptr, nullptr, false};
    TORCH_CHECK(mean.defined() && var.defined() && mean.scalar_type() == var.scalar_type() &&
                    (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
                kOp, "running_mean and running_var must be given together, both float32 or "
                "both float64");
    const auto type = mean.scalar_type();
    return Running{vector_data(mean, type, c, "running_mean"), vector_data(var, type, c, "running_var"),
                   type == at::kDouble};
}

// (y, stats): stats (2, C) float64 holds the rows mean and invstd, as bnlab's backends return them.
std::tuple<Tensor, Tensor> forward_kernels(const Tensor& x, const Tensor& weight,
                                           const Tensor& bias, const Tensor& running_mean,
                                           const Tensor& running_var, bool training,
                                           double momentum, double eps) {
    const Geometry g = geometry_of(x);
    const int64_t code = dtype_code(x);
    const auto param = compute_type(x);
    const void* w = vector_data(weight, param, g.C, "weight");
    const void* b = vector_data(bias, param, g.C, "bias");
    const Running run = running_of(running_mean, running_var, g.C);
    TORCH_CHECK(training || run.mean, kOp, "evaluation needs running_mean and running_var");
    Tensor y = at::empty_like(x);  // x's strides: contiguous or channels_last
    Tensor stats = at::empty({2, g.C}, x.options().dtype(at::kDouble));
    std::vector<double> var(size_t(g.C));
    double* mean = stats.data_ptr<double>();
    const int threads = at::get_num_threads();
    if (training)
        kernels->forward_train(code, x.data_ptr(), y.data_ptr(), w, b, mean, var.data(),
                               mean + g.C, run.mean, run.var, run.is_double, momentum, eps,
                               g.outer, g.C, g.inner, threads);
    else
        kernels->forward_eval(code, x.data_ptr(), y.data_ptr(), w, b, mean, var.data(),
                              mean + g.C, run.mean, run.var, run.is_double, eps, g.outer, g.C,
                              g.inner, threads);
    if (training && run.mean) {  // written through pointers: tell autograd, as an in-place op would
        running_mean.unsafeGetTensorImpl()->bump_version();
        running_var.unsafeGetTensorImpl()->bump_version();
    }
    return {y, stats};
}

std::tuple<Tensor, Tensor, Tensor> backward_kernels(Tensor dy, const Tensor& x,
                                                    const Tensor& weight, const Tensor& stats,
                                                    bool training) {
    const Geometry g = geometry_of(x);
    const int64_t code = dtype_code(x);
    const auto param = compute_type(x);
    if (dy.scalar_type() != x.scalar_type() || dy.strides() != x.strides())
        dy = at::empty_like(x).copy_(dy);
    const void* w = vector_data(weight, param, g.C, "weight");
    TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous() &&
                    stats.numel() == 2 * g.C,
                kOp, "stats must be (2, C) float64");
    Tensor dx = at::empty_like(x);
    Tensor dw = at::empty({g.C}, x.options().dtype(param));
    Tensor db = at::empty({g.C}, x.options().dtype(param));
    const double* mean = stats.data_ptr<double>();
    kernels->backward(code, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), w, mean, mean + g.C,
                      dw.data_ptr(), db.data_ptr(), training, g.outer, g.C, g.inner,
                      at::get_num_threads());
    return {dx, dw, db};
}

// The backward as ATen ops, so that it can itself be differentiated.
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& dy, const Tensor& x,
                                                           const Tensor& weight,
                                                           const Tensor& stats, bool training,
                                                           double eps,
                                                           std::array<bool, 3> mask) {
    const auto param = compute_type(x);
    const Tensor mean = stats[0].to(param), invstd = stats[1].to(param);
    if (training)  // torch's backward, whose own derivative knows the statistics depend on x
        return at::native_batch_norm_backward(dy, x, weight, {}, {}, mean, invstd, true, eps,
                                              mask);
    // Running statistics: y = (x - mean)*invstd*gamma + beta is affine per channel.
    std::vector<int64_t> shape(size_t(x.dim()), 1), dims;
    shape[1] = x.size(1);
    for (int64_t d = 0; d < x.dim(); ++d)
        if (d != 1) dims.push_back(d);
    const Tensor s = invstd.view(shape);
    const Tensor g = dy.to(param);
    const Tensor dx = (weight.defined() ? g * (s * weight.view(shape)) : g * s).to(x.scalar_type());
    const Tensor dw = (g * ((x.to(param) - mean.view(shape)) * s)).sum(dims);
    return {dx, dw, g.sum(dims)};
}

struct BatchNormNode : public torch::autograd::Function<BatchNormNode> {
    // Optional tensors rather than undefined ones: autograd records each given tensor's metadata.
    static Tensor forward(AutogradContext* ctx, const Tensor& x,
                          const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& running_mean,
                          const std::optional<Tensor>& running_var, bool training,
                          double momentum, double eps) {
        const Tensor w = weight.value_or(Tensor());
        auto [y, stats] = forward_kernels(x, w, bias.value_or(Tensor()),
                                          running_mean.value_or(Tensor()),
                                          running_var.value_or(Tensor()), training, momentum, eps);
        // An undefined gradient (y unused) gives undefined ones, not zeros to add up.
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({x, w, stats});
        ctx->saved_data["training"] = training;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["has_bias"] = bias.has_value();
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        variable_list out(8);  // one per input of forward; None for the non-tensors
        const Tensor& dy = grads[0];
        if (!dy.defined()) return out;
        const variable_list saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &weight = saved[1], &stats = saved[2];
        const bool training = ctx->saved_data["training"].toBool();
        // needs_input_grad counts the tensors given (its edges), not the arguments.
        const bool has_weight = weight.defined(), has_bias = ctx->saved_data["has_bias"].toBool();
        const std::array<bool, 3> need = {
            ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
            has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
        // A backward that is recorded, or vmapped (is_grads_batched: dy is a batched
        // wrapper without memory of its own), runs on ATen ops.
        const bool aten = at::GradMode::is_enabled() || !dy.has_storage() || !x.has_storage();
        auto [dx, dw, db] = aten ? differentiable_backward(dy, x, weight, stats, training,
                                                           ctx->saved_data["eps"].toDouble(), need)
                                 : backward_kernels(dy, x, weight, stats, training);
        if (need[0]) out[0] = dx;
        if (need[1]) out[1] = dw;
        if (need[2]) out[2] = db;
        return out;
    }
};

Tensor batch_norm(const Tensor& input, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                  const std::optional<Tensor>& running_var, bool training, double momentum,
                  double eps) {
    return BatchNormNode::apply(input, weight, bias, running_mean, running_var, training, momentum,
                                eps);
}

// ---- Python ------------------------------------------------------------------------------------

// A tensor with nothing that expects to see the ops run on it: no __torch_dispatch__
// of a subclass (FakeTensor among them). (__torch_function__ is the caller's check.)
bool plain(const Tensor& t) { return !t.key_set().has(c10::DispatchKey::Python); }

// Whether the kernels take t as it is: a plain, dense CPU tensor of `type` and C
// elements, or None.
bool takes_vector(PyObject* o, at::ScalarType type, int64_t C, std::optional<Tensor>* out) {
    if (o == Py_None) return true;
    if (!THPVariable_Check(o)) return false;
    const Tensor& t = THPVariable_Unpack(o);
    if (!plain(t) || !t.device().is_cpu() || t.scalar_type() != type || !t.is_contiguous() ||
        t.numel() != C)
        return false;
    *out = t;
    return true;
}

// batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
//            max_bytes) -> y, or None when the call is not one the node takes as it is:
// input a plain, dense, non-empty CPU tensor of float32/float64/bfloat16/float16, and at
// most max_bytes where the call records a graph; weight and bias None or of its compute
// type; the running buffers None or both float32 or both float64; momentum a Python
// number; no dispatch mode active (it expects to see torch's ops). The caller has
// checked for __torch_function__. Deciding here costs a fraction of what the same tests
// cost in Python. A Python function rather than a torch op: a torch.ops call's boxing
// costs about as much as a small batch norm's kernels. It also declines every call that
// bnlab.functional.check_arguments would reject (sizes, eps, one value per channel in
// training, missing buffers in eval), so that it can be tried before those checks: the
// caller's full path then raises their errors.
PyObject* py_batch_norm(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 9, "batch_norm")) return nullptr;
    if (!kernels || !THPVariable_Check(a[0]) || !(PyFloat_Check(a[6]) || PyLong_Check(a[6])) ||
        c10::impl::TorchDispatchModeTLS::any_modes_set())
        Py_RETURN_NONE;
    const Tensor& x = THPVariable_Unpack(a[0]);
    const int64_t max_bytes = i64(a[8]);
    if (PyErr_Occurred()) return nullptr;
    const auto type = x.scalar_type();
    if (!plain(x) || !x.device().is_cpu() || x.numel() == 0 || x.dim() < 2 ||
        !(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 ||
          type == at::kHalf) ||
        !dense(x))
        Py_RETURN_NONE;
    std::optional<Tensor> w, b, rm, rv;
    const auto param = compute_type(x);
    const int64_t C = x.size(1);
    if (!takes_vector(a[1], param, C, &w) || !takes_vector(a[2], param, C, &b)) Py_RETURN_NONE;
    if (!takes_vector(a[3], at::kFloat, C, &rm) && !takes_vector(a[3], at::kDouble, C, &rm))
        Py_RETURN_NONE;
    const auto buffer = rm ? rm->scalar_type() : at::kFloat;
    if (!takes_vector(a[4], buffer, C, &rv) || rm.has_value() != rv.has_value()) Py_RETURN_NONE;
    const int training = PyObject_IsTrue(a[5]);
    const double momentum = f64(a[6]), eps = f64(a[7]);
    if (training < 0 || PyErr_Occurred()) return nullptr;
    // check_arguments' rules, in its comparisons (a NaN eps passes both).
    if (training ? (eps <= 0.0 || x.numel() / C == 1) : (eps < 0.0 || !rm)) Py_RETURN_NONE;
    const bool graph = at::GradMode::is_enabled() && (x.requires_grad() ||
                                                      (w && w->requires_grad()) ||
                                                      (b && b->requires_grad()));
    if (graph && int64_t(x.numel() * x.element_size()) > max_bytes) Py_RETURN_NONE;
    try {
        Tensor y;
        {
            MaybeReleaseGil gil(x.numel());
            y = batch_norm(x, w, b, rm, rv, training != 0, momentum, eps);
        }
        return THPVariable_Wrap(y);
    } catch (const c10::Error& e) {  // a TORCH_CHECK: its message, without the C++ backtrace
        PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
        return nullptr;
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }
}

// use_kernels(capsule): the kernels to run, _bnlab_bn_cpu.KERNELS.
PyObject* py_use_kernels(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 1, "use_kernels")) return nullptr;
    void* table = PyCapsule_GetPointer(a[0], BNLAB_KERNELS_CAPSULE);
    if (!table) return nullptr;
    kernels = static_cast<const BatchNormKernels*>(table);
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"use_kernels", fastcall<py_use_kernels>(), METH_FASTCALL,
     "Run the kernels of this capsule (_bnlab_bn_cpu.KERNELS)."},
    {"batch_norm", fastcall<py_batch_norm>(), METH_FASTCALL,
     "Batch norm behind the C++ autograd node; None for a call it does not take."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_bnlab_bn_node",
                          "bnlab's batch-norm autograd node", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__bnlab_bn_node(void) { return PyModule_Create(&module_def); }
