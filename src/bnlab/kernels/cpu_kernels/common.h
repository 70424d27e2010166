// Constants shared by every pass (thread-split and streaming thresholds) and
// the helpers that load, store and widen one storage type. Part of the batch-norm CPU
// kernels: cpu_kernels.h describes the whole.

#pragma once

#include "bnlab_half.h"
#include "../cpu_kernels_api.h"
#include "bnlab_native.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kBlock = 16;           // additions per lane before partial sums go to float64
constexpr int64_t kPlaneMin = 64;    // inner >= this: plane traversal
constexpr int64_t kMaxWidth = 4096;  // widest periodic row
constexpr int64_t kAlign = 16;       // thread ranges start at multiples of this
// Rows by column: each thread's share of a row is at least this many bytes,
// so the strided reads still stream.
constexpr int64_t kColumnShareBytes = 1024;
// ... and the thread takes it a panel of columns at a time, all rows of a
// panel within this many bytes (a share of a core's L2 cache), so the pass
// that follows the sums reads the panel from cache.
constexpr int64_t kPanelBytes = int64_t(256) << 10;

// Outputs of this many bytes or more are written around the caches
// (non-temporal stores). A pass writing that much reads at least as much, so
// little of the output would still be cached when its reader comes; the stores
// skip reading the lines they overwrite and leave the caches to the input,
// which the next pass over it reads again. A quarter of a typical last-level
// cache (32 MiB; what the OS reports is unreliable in VMs); benchmarks/
// bench_bn.py's large shapes (8-26 MB outputs) measure the choice: the 16-bit
// 3d volume's output is 8 MiB exactly, and its training forward ran 1.2-1.4x
// faster streamed.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
// Tensors of this many bytes or more are beyond a core's L2 cache (1 MiB on
// the machines measured) with their outputs: their passes read from L3 or memory.
constexpr int64_t kBeyondL2Bytes = int64_t(2) << 20;
// Inference makes one pass, so the input need not stay cached for a second
// one: over planes it streams only when input and output together fill the
// last-level cache (2 x 16 MiB) or more; below that, the layer that reads y
// next finds it in cache. Periodic rows (channels_last, (N, C)) stream from
// kStreamBytes, as training does: at 8-16 MiB, streamed, their inference ran
// 1.2-1.67x faster (ResNet's stages 2-4 channels_last, 1 and 2 threads;
// (2048, 1024) float32 2x on one thread, 0.8-1.1x on two), where planes ran
// 0.76-0.95x (ResNet's 56x56 and 28x28 stages, 16-bit NCHW).
constexpr int64_t kStreamEvalBytes = int64_t(16) << 20;

typedef Vec<double, kLanes>::v vd;

template <typename S>
using Compute = typename Elem<S>::T;
template <typename S>
using VecOf = typename Elem<Compute<S>>::V;  // a vector of S's compute type

// ---- memory --------------------------------------------------------------------------------

constexpr int64_t kLineBytes = 64;  // a cache line

template <typename S>
constexpr int64_t kLineValues = kLineBytes / sizeof(S);  // values of S in a cache line

// Where streamed stores of S start: a line, or a vector where a vector is less
// (16-bit types), so at most kLanes - 1 values come before it.
template <typename S>
constexpr int64_t kStreamAlign =
    kLineBytes < int64_t(kLanes * sizeof(S)) ? kLineBytes : int64_t(kLanes * sizeof(S));

template <typename S>
inline VecOf<S> ld(const S* p) {
    return Elem<S>::load(p);
}
template <typename S>
inline void store_out(S* p, VecOf<S> v, bool stream) {
    Elem<S>::store(p, v, stream);
}
template <typename S>
inline Compute<S> up(S s) {
    return Elem<S>::up(s);
}
template <typename S>
inline S down(Compute<S> t) {
    return Elem<S>::down(t);
}

template <typename T>
inline vd to_double(typename Elem<T>::V v);
template <>
inline vd to_double<float>(f32v v) {
    return __builtin_convertvector(v, vd);
}
template <>
inline vd to_double<double>(vd v) {
    return v;
}

inline double hsum(vd v) {
    double s = 0.0;
    for (int k = 0; k < kLanes; ++k) s += v[k];
    return s;
}

int64_t gcd(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

}  // namespace
