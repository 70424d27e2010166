// Batch norm CPU kernels: fused passes over dense float32, float64, bfloat16
// and float16 tensors.
//
// Every supported layout is one geometry: memory holds x as (outer, C, inner),
// contiguous. NCHW is (N, C, H*W); channels_last and (N, C) are (rows, C, 1).
// Two traversals cover all of them:
//
//   planes    inner >= kPlaneMin, or at least a vector when the period is
//             too wide for rows: runs of `inner` values of one channel.
//   periodic  short inner (channels_last, (N, C)): the channel of flat index
//             e is (e % P) / inner with period P = C*inner, so memory is read
//             as rows of width W = lcm(P, kLanes) whose column j always holds
//             channel (j % P) / inner, and every row is whole vectors.
//
// A vector is as wide as the build's registers (bnlab_half.h): kLanes is 16
// floats with AVX-512, 8 with AVX2, 4 otherwise.
//
// and the training passes split each over threads by its geometry (split_of):
//
//   planes by channel   every thread owns whole channels (many channels).
//   planes by element   equal element ranges, sums combined after a barrier
//                       (few channels, large planes: one image, conv1).
//   rows by row         equal row ranges, per-column sums combined (many
//                       rows of a narrow period: channels_last, (N, C)).
//   rows by column      every thread owns whole channels' columns of all
//                       rows, a cache-sized panel at a time (few rows of a
//                       wide period: (32, 4096), (256, 512)).
// When a thread owns whole channels, a channel's second pass follows its
// first while its data is still in cache, and no barrier is needed. Planes
// shorter than kPlaneMin that are not whole vectors (wide layers' 7x7 maps)
// go G channels at a time, so that G planes of an image are whole vectors
// (plane_groups.h); in training, so do 10x10 and 14x14 planes (16-bit ones
// in the forward only).
// Inference has nothing to reduce: equal element, group or row ranges, or
// for a few wide rows, column ranges.
//
// Passes (n values per channel, xhat = (x - mean)*invstd):
//   forward   sums of (x - K) and (x - K)^2, K a shift near the channel's mean;
//             then y = xhat*gamma + beta.
//   backward  dbeta = sum dy, dgamma = sum dy*xhat; then
//               batch statistics:   dx = gamma*invstd/n * (n*dy - dbeta - xhat*dgamma)
//               running statistics: dx = gamma*invstd * dy
//
// Types: x, y, dy, dx are stored as S (float, double, bfloat16 or float16,
// see bnlab_half.h) and computed in T (float for the 16-bit types, else S);
// weight, bias and their gradients are T, statistics float64.
//
// Numerics: with the shift, var = E[(x-K)^2] - E[x-K]^2 does not cancel.
// Sums are built in T for at most kBlock additions per vector lane, then
// carried in float64. Elementwise passes run in T, with the mean split as
// mh (in T) + ml (the float64 rest, folded into per-channel constants) so
// x - mean stays accurate when |mean| >> std.
// (Periodic rows drop mh where every channel's |mean|*invstd is at most 1:
// y = x*s + (beta - mean*s) is as accurate there, and one array fewer to read.)
//
// Threads: OpenMP (the runtime torch uses), as many as the caller passes
// (torch.get_num_threads()); small inputs run on fewer.
//
// Memory: outputs of a quarter of a last-level cache or more (kStreamBytes;
// half of it for inference's single pass over planes, kStreamEvalBytes) are written
// around the caches (non-temporal stores: little of them would still be
// cached when they are read, and the stores skip reading the lines they
// overwrite); the training passes over planes stream runs of kStreamRunBytes
// or more, their whole cache lines only (streamed_run). (Inference keeps 16-bit
// rows in the caches where a vector is 16 bytes: geometry.h's
// streams_inference.) On Linux, large fresh outputs are advised as huge pages
// before their first touch: one page fault per 2 MiB instead of one per 4 KiB,
// which on some machines costs more than the pass itself.
// The by-channel passes over short runs (ResNet's 7x7 to 28x28 planes, and
// 56x56 in 16 bits) fetch the next channel's runs ahead (prefetch_run): the
// hardware prefetchers do not follow runs that short and that far apart.
// Periodic rows of 512 bytes or more that come from memory are read whole,
// one after the other (stream_sums, elementwise_rows).
//
// The parts, in cpu_kernels/, each building on those before it:
//   common.h           constants, cache lines, loads and stores of a storage type
//   geometry.h         the (outer, C, inner) geometry and the threads' split
//   statistics.h       per-channel coefficients and statistics, the running
//                      update, the sums
//   planes.h           passes over one channel's contiguous runs
//   plane_groups.h     short planes in groups that are whole vectors (7x7 to 4x5)
//   plane_group_sums.h their sums, vector position by vector position
//   rows.h             periodic rows: blocks, panels, the columns' channels
//   row_sums.h         sums over periodic rows
//   row_elementwise.h  the elementwise passes over periodic rows
//   forward.h          the training forward
//   eval.h             inference
//   backward.h         the backward
// This header adds the entry points. cpu_kernels.cpp compiles it into the
// Python functions that take data pointers and sizes (Python headers only,
// compiled in seconds), and hands the entry points, which map a dtype code to
// a storage type, to the autograd node (cpu_node.cpp) as a table of functions
// (cpu_kernels_api.h).

#pragma once

#include "cpu_kernels/forward.h"
#include "cpu_kernels/eval.h"
#include "cpu_kernels/backward.h"

namespace {

// ---- entry points --------------------------------------------------------------------------
//
// Pointers refer to contiguous memory of the types the dtype code says: x, y,
// dy, dx in S; weight, bias, dweight, dbias in S's compute type (float32 for
// the 16-bit types); running buffers in float64 if Running::is_double, else
// float32; statistics in float64.

constexpr int64_t kElementBytes[kDtypes] = {4, 8, 2, 2};

// f(S{}) for the storage type S of a valid dtype code.
template <typename F>
void with_storage(int64_t code, F f) {
    switch (code) {
        case kFloat32: return f(float{});
        case kFloat64: return f(double{});
        case kBFloat16: return f(bf16{});
        default: return f(f16{});
    }
}

// The statistics with scratch memory where the caller wants none: all three
// when mean or invstd is null (y alone), else var when it is null.
inline Stats with_scratch(Stats stats, std::vector<double>& scratch, int64_t C) {
    if (!stats.mean || !stats.invstd) {
        scratch.resize(size_t(3 * C));
        return Stats{scratch.data(), scratch.data() + C, scratch.data() + 2 * C};
    }
    if (!stats.var) {
        scratch.resize(size_t(C));
        stats.var = scratch.data();
    }
    return stats;
}

// Batch statistics into `stats` (mean, biased var, invstd; all three given),
// the running buffers' move, and y.
inline void run_forward_train(int64_t dtype, const void* x, void* y, const void* w, const void* b,
                              const Stats& stats, const Running& run, double eps,
                              const Geometry& g, int threads) {
    with_storage(dtype, [&](auto tag) {
        typedef decltype(tag) S;
        typedef Compute<S> T;
        advise_huge_pages(y, g.numel() * int64_t(sizeof(S)));
        forward_train(static_cast<const S*>(x), static_cast<S*>(y), static_cast<const T*>(w),
                      static_cast<const T*>(b), stats, run, eps, g, threads);
    });
}

// y normalized with the running buffers (`run`, only read; its momentum
// unused); their statistics into `stats` (all three given).
inline void run_forward_eval(int64_t dtype, const void* x, void* y, const void* w, const void* b,
                             const Stats& stats, const Running& run, double eps,
                             const Geometry& g, int threads) {
    if (run.is_double)
        running_stats(static_cast<const double*>(run.mean), static_cast<const double*>(run.var),
                      g.C, eps, stats.mean, stats.var, stats.invstd);
    else
        running_stats(static_cast<const float*>(run.mean), static_cast<const float*>(run.var),
                      g.C, eps, stats.mean, stats.var, stats.invstd);
    with_storage(dtype, [&](auto tag) {
        typedef decltype(tag) S;
        typedef Compute<S> T;
        advise_huge_pages(y, g.numel() * int64_t(sizeof(S)));
        normalize(static_cast<const S*>(x), static_cast<S*>(y), static_cast<const T*>(w),
                  static_cast<const T*>(b), stats.mean, stats.invstd, g, threads);
    });
}

// dx, dweight and dbias (the last two always written).
inline void run_backward(int64_t dtype, const void* dy, const void* x, void* dx, const void* w,
                         const double* mean, const double* invstd, void* dw, void* db,
                         bool batch_stats, const Geometry& g, int threads) {
    with_storage(dtype, [&](auto tag) {
        typedef decltype(tag) S;
        typedef Compute<S> T;
        advise_huge_pages(dx, g.numel() * int64_t(sizeof(S)));
        backward(static_cast<const S*>(dy), static_cast<const S*>(x), static_cast<S*>(dx),
                 static_cast<const T*>(w), mean, invstd, static_cast<T*>(dw), static_cast<T*>(db),
                 batch_stats, g, threads);
    });
}

}  // namespace
