// The batch-norm CPU kernels as a table of plain functions, for code built
// apart from them.
//
// cpu_kernels.cpp fills one BatchNormKernels and hands it out as the capsule
// _bnlab_bn_cpu.KERNELS; the autograd node (cpu_node.cpp, built against
// torch's headers) calls the kernels through it, so both run the same machine
// code and the templates compile once. Pointers and types as in
// cpu_kernels.h's entry points; (outer, C, inner) is the geometry of x.

#pragma once

#include <cstdint>

// Dtype codes, in the order of bnlab.kernels._cpu_native.DTYPE_CODES.
enum DtypeCode { kFloat32, kFloat64, kBFloat16, kFloat16, kDtypes };

struct BatchNormKernels {
    // Batch statistics into mean, var (biased) and invstd (all three given),
    // the running buffers' move (when given), and y.
    void (*forward_train)(int64_t dtype, const void* x, void* y, const void* weight,
                          const void* bias, double* mean, double* var, double* invstd,
                          void* running_mean, void* running_var, bool running_is_double,
                          double momentum, double eps, int64_t outer, int64_t C, int64_t inner,
                          int threads);
    // y with the running statistics (read only); theirs into mean, var and invstd.
    void (*forward_eval)(int64_t dtype, const void* x, void* y, const void* weight,
                         const void* bias, double* mean, double* var, double* invstd,
                         const void* running_mean, const void* running_var,
                         bool running_is_double, double eps, int64_t outer, int64_t C,
                         int64_t inner, int threads);
    // dx, dweight and dbias.
    void (*backward)(int64_t dtype, const void* dy, const void* x, void* dx, const void* weight,
                     const double* mean, const double* invstd, void* dweight, void* dbias,
                     bool batch_stats, int64_t outer, int64_t C, int64_t inner, int threads);
};

// The capsule's name.
#define BNLAB_KERNELS_CAPSULE "bnlab.kernels._bnlab_bn_cpu.KERNELS"
