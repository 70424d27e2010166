// What bnlab's native sources share: vector types, the thread team, and the
// parsing of METH_FASTCALL arguments. Each extension module compiles it into
// its own sources (internal linkage: an anonymous namespace), so two modules
// built with different flags never resolve a symbol to the other's copy.

#pragma once

#include <Python.h>

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrain = 32768;  // elements per thread, at least; smaller calls keep the GIL

// ---- vectors -------------------------------------------------------------------------------

// The unsigned integer as wide as T: masks and bit-level selects.
template <typename T>
struct Bits;
template <>
struct Bits<float> {
    typedef uint32_t u;
};
template <>
struct Bits<double> {
    typedef uint64_t u;
};

// N lanes of T: v (aligned, for values), u (unaligned, for memory), bits (lane masks).
template <typename T, int N>
struct Vec {
    typedef T v __attribute__((vector_size(N * sizeof(T))));
    typedef T u __attribute__((vector_size(N * sizeof(T)), aligned(alignof(T))));
    typedef typename Bits<T>::u bits __attribute__((vector_size(N * sizeof(T))));
};

// Unaligned loads and stores of N lanes.
template <int N, typename T>
inline typename Vec<T, N>::v load(const T* p) {
    return *reinterpret_cast<const typename Vec<T, N>::u*>(p);
}
template <int N, typename T>
inline void store(T* p, typename Vec<T, N>::v v) {
    *reinterpret_cast<typename Vec<T, N>::u*>(p) = v;
}

// ---- threads -------------------------------------------------------------------------------

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Orders this thread's non-temporal stores before whatever follows (a no-op
// for code that makes none).
inline void store_fence() {
#if defined(__AVX__)
    _mm_sfence();
#endif
}

// body(t, T) on a team of `team` threads, or directly when team is 1 (an
// OpenMP region costs microseconds, a small call about as much).
template <typename F>
void parallel(int team, F body) {
    if (team <= 1) {
        body(0, 1);
        store_fence();
        return;
    }
#pragma omp parallel num_threads(team)
    {
        body(omp_get_thread_num(), omp_get_num_threads());
        store_fence();
    }
}

// Threads worth starting for `numel` elements: at most `requested`, each with kGrain or more.
inline int team_size(int64_t numel, int requested) {
    int64_t useful = numel / kGrain;
    if (useful < 1) useful = 1;
    return static_cast<int>(requested < useful ? requested : useful);
}

// [begin, end) of `total` items for thread t of T, begins at multiples of `align`.
inline void split(int64_t total, int t, int T, int64_t align, int64_t* begin, int64_t* end) {
    int64_t per = (total + T - 1) / T;
    per = (per + align - 1) / align * align;
    *begin = min64(per * t, total);
    *end = min64(per * (t + 1), total);
}

// ---- Python arguments ----------------------------------------------------------------------
//
// The Python functions take ints (data pointers, sizes, flags; None for an
// absent tensor) and floats, never tensors: the sources need only the Python
// headers. A bad int or float sets a Python error, checked once after parsing.

inline bool check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char* name) {
    if (nargs == want) return true;
    PyErr_Format(PyExc_TypeError, "%s expects %zd arguments, got %zd", name, want, nargs);
    return false;
}

inline void* ptr(PyObject* o) { return o == Py_None ? nullptr : PyLong_AsVoidPtr(o); }
inline int64_t i64(PyObject* o) { return PyLong_AsLongLong(o); }
inline double f64(PyObject* o) { return PyFloat_AsDouble(o); }

// Releases the GIL for calls of `work` elements or more: small calls take
// less time than releasing it costs.
struct MaybeReleaseGil {
    PyThreadState* state;
    explicit MaybeReleaseGil(int64_t work)
        : state(work >= kGrain ? PyEval_SaveThread() : nullptr) {}
    ~MaybeReleaseGil() {
        if (state) PyEval_RestoreThread(state);
    }
};

// A METH_FASTCALL function as the PyCFunction a PyMethodDef holds.
template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction fastcall() {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

}  // namespace
