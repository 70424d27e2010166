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
//             as rows of width W = lcm(P, 16) whose column j always holds
//             channel (j % P) / inner, and every row is whole vectors.
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
// first while its data is still in cache, and no barrier is needed.
// Inference has nothing to reduce: equal element or row ranges, or for
// a few wide rows, column ranges.
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
// or more, their whole cache lines only (streamed_run). On Linux, large fresh
// outputs are advised as huge pages before their first touch: one page fault
// per 2 MiB instead of one per 4 KiB, which on some machines costs more than
// the pass itself.
// The by-channel passes over short runs (ResNet's 7x7 to 28x28 planes, and
// 56x56 in 16 bits) fetch the next channel's runs ahead (prefetch_run): the
// hardware prefetchers do not follow runs that short and that far apart.
// Periodic rows of 512 bytes or more that come from memory are read whole,
// one after the other (stream_sums, elementwise_rows).
//
// cpu_kernels.cpp compiles this header into the Python functions that take
// data pointers and sizes (Python headers only, compiled in seconds), and
// hands the entry points at its end, which map a dtype code to a storage
// type, to the autograd node (cpu_node.cpp) as a table of functions
// (cpu_kernels_api.h).

#pragma once

#include "bnlab_half.h"
#include "cpu_kernels_api.h"
#include "bnlab_native.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int kLanes = 16;           // elements per vector, whatever the type
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
inline vd to_double<float>(f32x16 v) {
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

// ---- geometry and the thread plan ----------------------------------------------------------

// The shape of one call: memory is (outer, C, inner), contiguous.
struct Geometry {
    int64_t outer, C, inner;
    int64_t numel() const { return outer * C * inner; }
    int64_t n() const { return outer * inner; }  // values per channel
    int64_t period() const { return C * inner; }
    // Planes when a channel's runs are long, or at least a vector long where
    // a periodic row would be too wide to be whole vectors (wide-channel,
    // small-spatial NCHW such as ResNet's 7x7 stages).
    bool planes() const { return inner >= kPlaneMin || (inner >= kLanes && period() > kMaxWidth); }
    // Width of a periodic row: a multiple of the period, whole vectors when affordable.
    int64_t width() const {
        int64_t p = period();
        int64_t w = p / gcd(p, kLanes) * kLanes;
        return w <= kMaxWidth ? w : p;
    }
};

// Inference's output streams from this many bytes (kStreamEvalBytes).
inline int64_t stream_eval_bytes(const Geometry& g) {
    return g.planes() ? kStreamEvalBytes : kStreamBytes;
}

enum Split { kByChannel, kByElement, kByRow, kByColumn };
const char* const kSplitNames[] = {"planes by channel", "planes by element", "rows by row",
                                   "rows by column"};

// How a team of T threads shares the work of g (elements of `bytes` each).
Split split_of(const Geometry& g, int64_t bytes, int T) {
    if (g.planes()) {
        // Whole channels per thread when that balances: every thread the same number, or many.
        return g.C % T == 0 || g.C >= 8 * T ? kByChannel : kByElement;
    }
    // Columns map to channels one to one only when a row is one period.
    const int64_t W = g.width();
    const bool one_period = W == g.period();
    // ... and only for few rows: a panel of 16 vectors of columns must take
    // all rows within kPanelBytes, or the strided reads would not stream.
    const bool few_rows = g.outer * 16 * kLanes * bytes <= kPanelBytes;
    return one_period && few_rows && g.C >= T && W * bytes >= kColumnShareBytes * T ? kByColumn
                                                                                     : kByRow;
}

// Fresh outputs are first touched here; on Linux, huge pages make that several
// times cheaper for large tensors (one fault per 2 MiB instead of per 4 KiB).
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = uintptr_t(1) << 21;
    if (bytes < int64_t(4 * huge)) return;
    uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
    uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

// ---- per-channel coefficients -------------------------------------------------

// The shifts K of all channels: each the mean of its channel's first few
// values (its first 8, or its value in each of the first 8 rows when runs are
// shorter: read row by row, so wide rows are read whole), in T.
template <typename S>
std::vector<Compute<S>> shifts(const S* x, const Geometry& g) {
    typedef Compute<S> T;
    std::vector<T> K(g.C, T(0));
    if (g.inner >= 8) {
        for (int64_t c = 0; c < g.C; ++c) {
            T s = 0;
            for (int k = 0; k < 8; ++k) s += up(x[c * g.inner + k]);
            K[c] = s / T(8);
        }
        return K;
    }
    const int64_t rows = min64(8, g.outer);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < g.C; ++c) K[c] += up(x[r * g.period() + c * g.inner]);
    for (int64_t c = 0; c < g.C; ++c) K[c] /= T(rows);
    return K;
}

// The mean is used as mh (the nearest T) and ml = mean - mh (float64, tiny):
// x - mh is exact for x near the mean, and ml only shifts a per-channel
// constant, computed in float64. So x - mean keeps full precision in float32
// even when |mean| >> std.

// y = (x - mh)*s + b, i.e. (x - mean)*invstd*gamma + beta with b = beta - ml*s.
template <typename T>
struct Affine {
    T mh, s, b;
};

// Uncentered (centered false): mh = 0, so b = beta - mean*s, all of the mean
// folded into the constant (see ColumnNormalize::set_channels for where that
// is as accurate).
template <typename T>
Affine<T> affine_of(double mean, double invstd, const T* w, const T* b, int64_t c,
                    bool centered = true) {
    Affine<T> a;
    a.mh = centered ? static_cast<T>(mean) : T(0);
    const double s = invstd * (w ? static_cast<double>(w[c]) : 1.0);
    a.s = static_cast<T>(s);
    a.b = static_cast<T>((b ? static_cast<double>(b[c]) : 0.0) - (mean - double(a.mh)) * s);
    return a;
}

// dx = a*dy - k*(x - mh) + c0: the input gradient of one channel, with
//   batch statistics:   a = gamma*invstd, k = a*invstd*dgamma/n,
//                       c0 = -a*dbeta/n + k*ml
//   running statistics: a = gamma*invstd, k = c0 = 0
template <typename T>
struct GradCoef {
    T mh, a, k, c0;
};

template <typename T>
GradCoef<T> grad_coef(double mean, double invstd, const T* w, int64_t c, double dbeta,
                      double dgamma, double n, bool batch_stats) {
    GradCoef<T> q;
    q.mh = static_cast<T>(mean);
    const double a = invstd * (w ? static_cast<double>(w[c]) : 1.0);
    const double k = batch_stats ? a * invstd * dgamma / n : 0.0;
    q.a = static_cast<T>(a);
    q.k = static_cast<T>(k);
    q.c0 = batch_stats ? static_cast<T>(-a * dbeta / n + k * (mean - double(q.mh))) : T(0);
    return q;
}

// dgamma = sum dy*xhat from the sums the kernels build: sum dy, and sum
// dy*(x - mh) with mh the mean rounded to T; the rest ml = mean - mh is taken
// off here, in float64.
template <typename T>
inline double dgamma_of(double sdy, double sdyx_mh, double mean, double invstd) {
    const double ml = mean - static_cast<double>(static_cast<T>(mean));
    return (sdyx_mh - ml * sdy) * invstd;
}

// Per-channel statistics, float64 outputs (the callers give scratch for what is not wanted).
struct Stats {
    double *mean, *var, *invstd;
};

// Running statistics: r <- (1 - m)*r + m*s, with the unbiased variance.
struct Running {
    void* mean;  // null: no update
    void* var;
    int is_double;
    double momentum;
};

template <typename R>
void update_running(R* rm, R* rv, int64_t c0, int64_t c1, const Stats& stats, double n,
                    double m) {
    const double unbias = n > 1 ? n / (n - 1) : 1.0;
    for (int64_t c = c0; c < c1; ++c) {
        rm[c] = static_cast<R>((1.0 - m) * static_cast<double>(rm[c]) + m * stats.mean[c]);
        rv[c] = static_cast<R>((1.0 - m) * static_cast<double>(rv[c]) + m * stats.var[c] * unbias);
    }
}

// Channel c's statistics from its shifted sums (K its shift).
inline void channel_stats(int64_t c, double n, double K, double s1, double s2, double eps,
                          const Stats& stats) {
    const double d = s1 / n;
    const double var = s2 / n - d * d;
    stats.var[c] = var < 0 ? 0 : var;
    stats.mean[c] = K + d;
    stats.invstd[c] = 1.0 / std::sqrt(stats.var[c] + eps);
}

inline void move_running(int64_t c0, int64_t c1, double n, const Running& run, const Stats& stats) {
    if (!run.mean) return;
    if (run.is_double)
        update_running(static_cast<double*>(run.mean), static_cast<double*>(run.var), c0, c1,
                       stats, n, run.momentum);
    else
        update_running(static_cast<float*>(run.mean), static_cast<float*>(run.var), c0, c1, stats,
                       n, run.momentum);
}

// Statistics of channels [c0, c1) from their shifted sums s1[c], s2[c]
// (indexed by channel), and the running buffers' move: loops over channels
// without branches, so wide layers finish in vector instructions.
template <typename T>
void finish_stats(int64_t c0, int64_t c1, double n, const T* K, const double* s1,
                  const double* s2, double eps, const Running& run, const Stats& stats) {
    for (int64_t c = c0; c < c1; ++c) channel_stats(c, n, K[c], s1[c], s2[c], eps, stats);
    move_running(c0, c1, n, run, stats);
}

// One channel's statistics from its two sums, and its running buffers' move.
template <typename T>
void finish_channel(int64_t c, double n, const T* K, double s1, double s2, double eps,
                    const Running& run, const Stats& stats) {
    channel_stats(c, n, K[c], s1, s2, eps, stats);
    move_running(c, c + 1, n, run, stats);
}

// ---- sums ------------------------------------------------------------------------------

// Two running sums per vector lane (s1, s2), for one channel: built in T for
// at most kBlock steps, then carried in float64. Two sets of accumulators (a,
// b) keep two independent addition chains in flight.
template <typename T>
struct Sums {
    typedef typename Elem<T>::V V;
    V a1, a2, b1, b2;
    vd d1, d2;
    double r1, r2;  // runs shorter than one vector
    int steps;
    Sums() : a1(), a2(), b1(), b2(), d1(), d2(), r1(0), r2(0), steps(0) {}
    inline void step() {
        if (++steps >= kBlock) flush();
    }
    inline void flush() {
        d1 += to_double<T>(a1 + b1);
        d2 += to_double<T>(a2 + b2);
        a1 = a2 = b1 = b2 = V{};
        steps = 0;
    }
    void add_to(double* s1, double* s2) {
        flush();
        *s1 += hsum(d1) + r1;
        *s2 += hsum(d2) + r2;
    }
};

// Lanes [16 - rem, 16) one, the others zero: the new part of a run's last,
// overlapping vector.
template <typename T>
inline typename Elem<T>::V tail_ones(int64_t rem) {
    alignas(64) static const T table[2 * kLanes] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    return Elem<T>::load(table + rem);
}

// ---- passes over contiguous runs (plane traversal) --------------------------------

// Shifted sums of one run: s1 += sum(x - K), s2 += sum((x - K)^2).
template <typename S, typename T = Compute<S>>
__attribute__((always_inline)) inline void shifted_sums(const S* x, int64_t len, T K, Sums<T>& s) {
    typedef VecOf<S> V;
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        V d = ld(x + i) - K, e = ld(x + i + kLanes) - K;
        s.a1 += d;
        s.a2 += d * d;
        s.b1 += e;
        s.b2 += e * e;
        s.step();
    }
    if (i + kLanes <= len) {
        V d = ld(x + i) - K;
        s.a1 += d;
        s.a2 += d * d;
        i += kLanes;
    }
    if (i < len && len >= kLanes) {
        V d = (ld(x + len - kLanes) - K) * tail_ones<T>(len - i);
        s.b1 += d;
        s.b2 += d * d;
    } else {
        for (; i < len; ++i) {
            double d = static_cast<double>(up(x[i]) - K);
            s.r1 += d;
            s.r2 += d * d;
        }
    }
    s.step();
}

// Gradient sums of one run: s1 += sum(dy), s2 += sum(dy*(x - mh)).
template <typename S, typename T = Compute<S>>
__attribute__((always_inline)) inline void grad_sums(const S* dy, const S* x, int64_t len, T mh, Sums<T>& s) {
    typedef VecOf<S> V;
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        V g = ld(dy + i), h = ld(dy + i + kLanes);
        s.a1 += g;
        s.a2 += g * (ld(x + i) - mh);
        s.b1 += h;
        s.b2 += h * (ld(x + i + kLanes) - mh);
        s.step();
    }
    if (i + kLanes <= len) {
        V g = ld(dy + i);
        s.a1 += g;
        s.a2 += g * (ld(x + i) - mh);
        i += kLanes;
    }
    if (i < len && len >= kLanes) {
        const int64_t last = len - kLanes;
        V g = ld(dy + last) * tail_ones<T>(len - i);
        s.b1 += g;
        s.b2 += g * (ld(x + last) - mh);
    } else {
        for (; i < len; ++i) {
            const T g = up(dy[i]);
            s.r1 += static_cast<double>(g);
            s.r2 += static_cast<double>(g * (up(x[i]) - mh));
        }
    }
    s.step();
}

// Runs of a streamed output shorter than this take ordinary stores: 14x14
// bfloat16 planes (392 bytes) ran 0.8x streamed, 14x14 float32 ones (784
// bytes) 1.25-1.5x, ResNet's 28x28 stage 1.3-1.9x (by-channel training passes
// on 1 and 2 threads; elementwise_run writes no line both ways).
constexpr int64_t kStreamRunBytes = 512;

constexpr int64_t kLineBytes = 64;  // a cache line

template <typename S>
constexpr int64_t kLineValues = kLineBytes / sizeof(S);  // values of S in a cache line

// Where streamed stores of S start: a line, or a vector where a vector is less
// (16-bit types), so at most kLanes - 1 values come before it.
template <typename S>
constexpr int64_t kStreamAlign =
    kLineBytes < int64_t(kLanes * sizeof(S)) ? kLineBytes : int64_t(kLanes * sizeof(S));

// A channel of (outer, C, inner) is `outer` runs a plane apart. When runs are
// short (ResNet's 56x56 stage in 16 bits, its 28x28, 14x14 and 7x7 stages:
// 6272 to 98 bytes), each is too short and too far from the last for the
// hardware prefetchers, and the by-channel passes wait on memory at every
// run. The next channel's run o lies right after this channel's, so while a
// channel is summed, the same runs of its successor are fetched into L2; while
// it is written, the lines its successor's outputs go to are fetched into L1
// (runs shorter than kStreamRunBytes always take ordinary stores).
constexpr int64_t kPrefetchRunBytes = 8192;  // fp32 56x56 planes (12544 bytes) ran 8% slower
// Smaller tensors stay in a core's L2 between passes, where the requests only
// cost: LeNet-5's conv1 (1.2 MB) ran 10% slower with them, ResNet's stages
// (6-13 MB) 10-45% faster.
constexpr int64_t kPrefetchMinBytes = kBeyondL2Bytes;

// What the by-channel passes fetch of a channel's successor: its inputs'
// runs, and the lines of its outputs.
struct FetchAhead {
    bool reads, writes;
};
template <typename S>
inline FetchAhead fetch_ahead(const Geometry& g) {
    const int64_t run = g.inner * int64_t(sizeof(S));
    const bool reads =
        run < kPrefetchRunBytes && g.numel() * int64_t(sizeof(S)) >= kPrefetchMinBytes;
    return FetchAhead{reads, reads && run < kStreamRunBytes};
}

template <typename S>
inline void prefetch_run(const S* p, int64_t len, bool for_write) {
    constexpr uintptr_t line = kLineBytes;
    uintptr_t q = reinterpret_cast<uintptr_t>(p) & ~(line - 1);
    const uintptr_t end = reinterpret_cast<uintptr_t>(p + len);
    for (; q < end; q += line) {
        if (for_write)
            __builtin_prefetch(reinterpret_cast<const void*>(q), 1, 3);
        else
            __builtin_prefetch(reinterpret_cast<const void*>(q), 0, 2);
    }
}

// Ordinary stores of out[i, e) of a run of len values (len >= kLanes), f giving
// the vector at an index; none writes outside [i, e). A ragged end is taken
// from a vector inside the run and copied through a buffer.
template <typename S, typename Vector>
inline void store_span(S* out, int64_t i, int64_t e, int64_t len, Vector f) {
    for (; i + kLanes <= e; i += kLanes) store_out(out + i, f(i), false);
    if (i < e) {
        const int64_t v = min64(i, len - kLanes);  // v <= i and e <= v + kLanes
        alignas(64) S part[kLanes];
        store_out(part, f(v), false);
        std::memcpy(out + i, part + (i - v), size_t(e - i) * sizeof(S));
    }
}

// out[i] = f(i) over a run of len values (len >= kLanes), streamed: the cache
// lines that lie wholly inside the run are written around the caches, and the
// part lines at its ends with ordinary stores that reach no further. A line
// written both ways (a streamed vector, then an overlapping ordinary one)
// leaves the line half-written in the write-combining buffer, which cost more
// than the streaming saved ((32, 256, 18, 18) float32 training, 1296-byte
// runs: 0.6x). Not inlined: in elementwise_run's loop, GCC then compiled the
// ordinary stores of 16-bit inference 1.2-1.4x slower.
template <typename S, typename Vector>
__attribute__((noinline)) void streamed_run(S* out, int64_t len, Vector f) {
    constexpr int64_t L = kLineValues<S>;
    const uintptr_t to_line =
        (kLineBytes - (reinterpret_cast<uintptr_t>(out) & (kLineBytes - 1))) & (kLineBytes - 1);
    const int64_t head = min64(len, int64_t(to_line / sizeof(S)));
    const int64_t body = head + (len - head) / L * L;  // [head, body): whole lines
    store_span(out, 0, head, len, f);
    int64_t i = head;
    for (; i + kLanes <= body; i += kLanes) store_out(out + i, f(i), true);
    store_span(out, i, len, len, f);  // the tail (and float64's last line of half a vector)
}

// out[i] = f(i) over one run, f giving a vector at i (or a value, scalar). A
// ragged end recomputes an overlapping vector. Runs of kStreamRunBytes or
// more are streamed when asked (streamed_run).
template <typename S, typename Vector, typename Scalar>
inline void elementwise_run(S* out, int64_t len, bool stream, Vector f, Scalar f1) {
    if (len < kLanes) {
        for (int64_t i = 0; i < len; ++i) out[i] = down<S>(f1(i));
        return;
    }
    if (stream && len * int64_t(sizeof(S)) >= kStreamRunBytes) return streamed_run(out, len, f);
    for (int64_t i = 0;; i += kLanes) {
        if (i > len - kLanes) i = len - kLanes;
        store_out(out + i, f(i), false);
        if (i == len - kLanes) break;
    }
}

// y = (x - mh)*s + b over one run.
template <typename S, typename T = Compute<S>>
void normalize_run(const S* x, S* y, int64_t len, Affine<T> c, bool stream) {
    typedef VecOf<S> V;
    elementwise_run(
        y, len, stream, [&](int64_t i) { return V((ld(x + i) - c.mh) * c.s + c.b); },
        [&](int64_t i) { return (up(x[i]) - c.mh) * c.s + c.b; });
}

// dx = a*dy - k*(x - mh) + c0 over one run.
template <typename S, typename T = Compute<S>>
void grad_run(const S* dy, const S* x, S* dx, int64_t len, GradCoef<T> q, bool stream) {
    typedef VecOf<S> V;
    elementwise_run(
        dx, len, stream,
        [&](int64_t i) { return V(ld(dy + i) * q.a + (q.c0 - (ld(x + i) - q.mh) * q.k)); },
        [&](int64_t i) { return up(dy[i]) * q.a + (q.c0 - (up(x[i]) - q.mh) * q.k); });
}

// fn(channel, offset, length) for the pieces of planes inside elements [e0, e1).
template <typename F>
inline void for_plane_pieces(const Geometry& g, int64_t e0, int64_t e1, F fn) {
    for (int64_t e = e0; e < e1;) {
        int64_t plane = e / g.inner;
        int64_t stop = min64((plane + 1) * g.inner, e1);
        fn(plane % g.C, e, stop - e);
        e = stop;
    }
}

// ---- passes over periodic rows -------------------------------------------------------
//
// Rows are taken in blocks (at most kBlock rows, about kBlockBytes) and, within
// a block, U vectors of columns at a time down the rows, so per-column
// coefficients and partial sums stay in registers. Wide rows (kWideRow bytes
// or more) are streamed one after the other instead, which memory serves
// faster than many short strided runs; their sums (and those of narrower rows
// read from memory, stream_sums) go through per-column partial sums in T that
// are carried into float64 every kBlock rows. Every
// sweep covers the rows [r0, r1) and columns [j0, j1) of its thread.

constexpr int64_t kBlockBytes = 16384;
constexpr int64_t kWideRow = 2048;

template <typename S>
bool wide_rows(int64_t W) {
    return W * int64_t(sizeof(S)) >= kWideRow;
}

template <typename T>
constexpr int kUnroll = sizeof(T) == 4 ? 4 : 2;  // vectors of columns per sweep

template <typename S>
int64_t rows_per_block(int64_t W) {
    if (wide_rows<S>(W)) return 1;
    int64_t r = kBlockBytes / (W * int64_t(sizeof(S)));
    return r < 1 ? 1 : (r > kBlock ? kBlock : r);
}

// A rectangle of a periodic array: rows [r0, r1), columns [j0, j1).
struct Block {
    int64_t r0, r1, j0, j1;
};

// Rows of kStreamRow bytes or more that come from memory are read whole, one
// after the other: memory serves them faster than a block's strided runs.
// The sums stream them when a thread's share of the rows is more than its L2
// holds (channels_last ResNet stages of 256 and 512 channels: backward sums
// 1.1-1.25x faster, float32 forward 1.1-1.2x, 16-bit forward 2-6% slower);
// a share the caches hold sums faster in registers.
constexpr int64_t kStreamRow = 512;
constexpr int64_t kStreamSumsShare = int64_t(1) << 20;

template <typename S>
bool stream_sums(int64_t W, const Block& k) {
    const int64_t row = W * int64_t(sizeof(S));
    return wide_rows<S>(W) || (row >= kStreamRow && (k.r1 - k.r0) * row > kStreamSumsShare);
}

// Rows per block of the elementwise passes over periodic rows. Tensors a
// core's L2 holds take blocks of kBlock rows (coefficients loaded once per
// block: (32, 4096) 16-bit inference ran 1.1-1.3x faster so than row by row).
// Beyond L2, rows of kStreamRow bytes or more are taken one by one
// (channels_last ResNet stages of 256 and 512 channels: backward 1.1-1.5x and
// inference 1.2-1.5x faster than in blocks of 16 rows; wide rows, 16 rows 4 KiB
// apart, also fall in one set of the L1 cache), narrower ones in blocks.
template <typename S>
int64_t elementwise_rows(int64_t W, int64_t numel) {
    const int64_t row = W * int64_t(sizeof(S)), bytes = numel * int64_t(sizeof(S));
    if (bytes < kBeyondL2Bytes) return kBlock;
    if (row >= kStreamRow) return 1;
    return bytes <= kStreamBytes ? kBlock : rows_per_block<S>(W);
}

// Rows by column: a thread takes its channels a panel at a time, a panel
// being as many columns as keep all its rows (of `bytes` per value, summed
// over the tensors read) within kPanelBytes (see its definition).

int64_t panel_channels(const Geometry& g, int64_t rows, int64_t bytes) {
    int64_t columns = kPanelBytes / (rows * bytes);
    if (columns < 4 * kLanes) columns = 4 * kLanes;
    int64_t channels = columns / g.inner;
    if (g.inner == 1) channels = channels / kAlign * kAlign;  // whole vectors
    return channels < 1 ? 1 : channels;
}

// The channel of each column of a periodic row of width W (a multiple of the
// period): column j holds channel (j % P) / inner. Counted, not divided.
std::vector<int64_t> column_channels(const Geometry& g, int64_t W) {
    std::vector<int64_t> chan(W);
    int64_t c = 0, i = 0;
    for (int64_t j = 0; j < W; ++j) {
        chan[j] = c;
        if (++i == g.inner) {
            i = 0;
            if (++c == g.C) c = 0;
        }
    }
    return chan;
}

// Per-column copies of a per-channel value.
template <typename T, typename F>
std::vector<T> columns(const std::vector<int64_t>& chan, F per_channel) {
    std::vector<T> out(chan.size());
    for (size_t j = 0; j < chan.size(); ++j) out[j] = per_channel(chan[j]);
    return out;
}

// Calls sweep.template run<U>(rb, re, j) over the block's rows, RB rows at a
// time (default: by the row's width), and whole vectors of its columns, then
// sweep.scalar(rb, re, j) for the columns left over.
template <typename S, typename Sweep>
void for_column_blocks(const Block& k, int64_t W, const Sweep& sweep, int64_t RB = 0) {
    constexpr int U = kUnroll<Compute<S>>;
    if (RB <= 0) RB = rows_per_block<S>(W);
    for (int64_t rb = k.r0; rb < k.r1; rb += RB) {
        const int64_t re = min64(k.r1, rb + RB);
        int64_t j = k.j0;
        for (; j + U * kLanes <= k.j1; j += U * kLanes) sweep.template run<U>(rb, re, j);
        for (; j + kLanes <= k.j1; j += kLanes) sweep.template run<1>(rb, re, j);
        for (; j < k.j1; ++j) sweep.scalar(rb, re, j);
    }
}

// Rows [r0, r1) of width W, columns [j0, j1): apply(f, coef(j)) at each
// whole vector, f the flat index of column j and coef(j) the coefficient
// vectors of columns [j, j + kLanes); scalar(e, j) at each column past them.
// The elementwise passes' rows() call it with their coefficients and pointers
// copied into the closures: read through the object, GCC reloaded them after
// every store (which may alias it) and, gathering a single row's coefficients
// into registers, spilled them; 16-bit channels_last inference of 2048
// channels ran at half the copy bandwidth.
//
// With `pairs`, rows go two at a time, each coefficient vector loaded once
// for both, Vecs vectors (a cache line of S) at a time, so a streamed output
// line is written whole before the next row's (pair_rows says when).
template <typename S>
constexpr int kRowGroup = kLineValues<S> > kLanes ? int(kLineValues<S> / kLanes) : 1;

template <int Vecs, typename Coef, typename Apply, typename Scalar>
inline void for_rows(int64_t r0, int64_t r1, int64_t j0, int64_t j1, int64_t W, bool pairs,
                     Coef coef, Apply apply, Scalar scalar) {
    const int64_t jv = j0 + (j1 - j0) / kLanes * kLanes;
    const int64_t jg = j0 + (j1 - j0) / (Vecs * kLanes) * (Vecs * kLanes);
    const auto rest_of_row = [&](int64_t o, int64_t from) {
        for (int64_t j = from; j < jv; j += kLanes) apply(o + j, coef(j));
        for (int64_t j = jv; j < j1; ++j) scalar(o + j, j);
    };
    int64_t r = r0;
    if (pairs)
        for (; r + 2 <= r1; r += 2) {
            const int64_t o = r * W;
            for (int64_t j = j0; j < jg; j += Vecs * kLanes) {
                decltype(coef(j)) c[Vecs];
                for (int u = 0; u < Vecs; ++u) c[u] = coef(j + u * kLanes);
                for (int i = 0; i < 2; ++i)
                    for (int u = 0; u < Vecs; ++u) apply(o + i * W + j + u * kLanes, c[u]);
            }
            rest_of_row(o, jg);
            rest_of_row(o + W, jg);
        }
    for (; r < r1; ++r) rest_of_row(r * W, j0);
}

// Rows one by one read each row's coefficients again. Once a sweep's
// coefficient arrays (`arrays` of W values of T) take more than half of a
// 32 KiB L1 data cache, those reads come from L2 and outnumber the data's:
// rows then go in pairs (for_rows). Wide rows measured in-process, paired
// against one by one: channels_last ResNet stage 4 (2048 channels) training
// 1.06-1.15x and (1024, 4096) float16 training and inference 1.2x faster;
// (2048, 1536) training 1.05-1.07x. At 1024 channels (16 KiB of gradient
// coefficients) pairs ran 0.74-0.88x, and 1024-channel inference 0.4x.
constexpr int64_t kPairCoefBytes = int64_t(16) << 10;

template <typename T>
bool pair_rows(int arrays, int64_t W) {
    return arrays * W * int64_t(sizeof(T)) > kPairCoefBytes;
}

// acc1[j] += sum_r (x[r, j] - K[j]), acc2[j] += sum_r (x[r, j] - K[j])^2.
template <typename S>
struct ColumnSums {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const S* x;
    int64_t W;
    const T* K;
    double *acc1, *acc2;
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V k[U], a1[U], a2[U];
        for (int u = 0; u < U; ++u) {
            k[u] = Elem<T>::load(K + j + u * kLanes);
            a1[u] = V{};
            a2[u] = V{};
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                V d = ld(x + r * W + j + u * kLanes) - k[u];
                a1[u] += d;
                a2[u] += d * d;
            }
        for (int u = 0; u < U; ++u) {
            double* p1 = acc1 + j + u * kLanes;
            double* p2 = acc2 + j + u * kLanes;
            store<kLanes>(p1, vd(load<kLanes>(p1) + to_double<T>(a1[u])));
            store<kLanes>(p2, vd(load<kLanes>(p2) + to_double<T>(a2[u])));
        }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            double d = static_cast<double>(up(x[r * W + j]) - K[j]);
            acc1[j] += d;
            acc2[j] += d * d;
        }
    }
};

// Streamed rows: add(rows, r, j, p1, p2) adds the vectors of columns j of rows
// [r, r + rows) (rows a compile-time 4 or 1: four rows read side by side
// share one update of the partial sums) to the T-precision partial sums p1,
// p2 (arrays of W), carried into acc1, acc2 every kBlock rows. Columns past
// the last whole vector go to add_scalar(r, j, acc1 + j, acc2 + j).
// ahead(r, j) fetches the line at column j of rows [r, r + 4), called once per
// `line` columns for the next four rows: four rows read side by side are four
// streams a few KiB long, which the hardware prefetchers follow late (16-bit
// (8192, 1024) passes ran 1.2-1.3x faster with it; float32 unchanged).
template <typename T, typename Add, typename AddScalar, typename Ahead>
void stream_rows(const Block& k, int64_t W, double* acc1, double* acc2, Add add,
                 AddScalar add_scalar, Ahead ahead, int64_t line) {
    std::vector<T> p1(W), p2(W);
    const int64_t jv = k.j0 + (k.j1 - k.j0) / kLanes * kLanes;  // end of the whole vectors
    for (int64_t rb = k.r0; rb < k.r1; rb += kBlock) {
        const int64_t re = min64(k.r1, rb + kBlock);
        int64_t r = rb;
        for (; r + 4 <= re; r += 4) {
            const bool fetch = r + 8 <= k.r1;
            for (int64_t j = k.j0; j < jv; j += kLanes) {
                if (fetch && (j & (line - 1)) == 0) ahead(r + 4, j);  // line: a power of 2
                add(std::integral_constant<int, 4>{}, r, j, p1.data() + j, p2.data() + j);
            }
        }
        for (; r < re; ++r)
            for (int64_t j = k.j0; j < jv; j += kLanes)
                add(std::integral_constant<int, 1>{}, r, j, p1.data() + j, p2.data() + j);
        for (r = rb; r < re; ++r)
            for (int64_t j = jv; j < k.j1; ++j) add_scalar(r, j, acc1 + j, acc2 + j);
        for (int64_t j = k.j0; j < jv; ++j) {
            acc1[j] += static_cast<double>(p1[j]);
            acc2[j] += static_cast<double>(p2[j]);
            p1[j] = p2[j] = T(0);
        }
    }
}

template <typename S>
void periodic_sums(const ColumnSums<S>& s, const Block& k) {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    if (!stream_sums<S>(s.W, k)) return for_column_blocks<S>(k, s.W, s);
    // s's fields copied into the closures: read through s, they were reloaded
    // after every store to the partial sums, which may alias s for all the
    // compiler knows.
    const S* const x = s.x;
    const T* const K = s.K;
    const int64_t W = s.W;
    stream_rows<T>(
        k, W, s.acc1, s.acc2,
        [=](auto rows, int64_t r, int64_t j, T* p1, T* p2) {
            const V kv = Elem<T>::load(K + j);
            V a1 = V{}, a2 = V{};
            for (int i = 0; i < decltype(rows)::value; ++i) {
                V d = ld(x + (r + i) * W + j) - kv;
                a1 += d;
                a2 += d * d;
            }
            Elem<T>::store(p1, V(Elem<T>::load(p1) + a1), false);
            Elem<T>::store(p2, V(Elem<T>::load(p2) + a2), false);
        },
        [=](int64_t r, int64_t j, double* a1, double* a2) {
            double d = static_cast<double>(up(x[r * W + j]) - K[j]);
            *a1 += d;
            *a2 += d * d;
        },
        [=](int64_t r, int64_t j) {
            for (int i = 0; i < 4; ++i) __builtin_prefetch(x + (r + i) * W + j, 0, 2);
        },
        kLineValues<S>);
}

// acc1[j] += sum_r dy[r, j], acc2[j] += sum_r dy[r, j]*(x[r, j] - MH[j]).
template <typename S>
struct ColumnGradSums {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const S *dy, *x;
    int64_t W;
    const T* MH;
    double *acc1, *acc2;
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V mh[U], a1[U], a2[U];
        for (int u = 0; u < U; ++u) {
            mh[u] = Elem<T>::load(MH + j + u * kLanes);
            a1[u] = V{};
            a2[u] = V{};
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * W + j + u * kLanes;
                V g = ld(dy + e);
                a1[u] += g;
                a2[u] += g * (ld(x + e) - mh[u]);
            }
        for (int u = 0; u < U; ++u) {
            double* p1 = acc1 + j + u * kLanes;
            double* p2 = acc2 + j + u * kLanes;
            store<kLanes>(p1, vd(load<kLanes>(p1) + to_double<T>(a1[u])));
            store<kLanes>(p2, vd(load<kLanes>(p2) + to_double<T>(a2[u])));
        }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            const T g = up(dy[e]);
            acc1[j] += static_cast<double>(g);
            acc2[j] += static_cast<double>(g * (up(x[e]) - MH[j]));
        }
    }
};

template <typename S>
void periodic_grad_sums(const ColumnGradSums<S>& s, const Block& k) {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    if (!stream_sums<S>(s.W, k)) return for_column_blocks<S>(k, s.W, s);
    const S* const dy = s.dy;  // in the closures, as in periodic_sums
    const S* const x = s.x;
    const T* const MH = s.MH;
    const int64_t W = s.W;
    stream_rows<T>(
        k, W, s.acc1, s.acc2,
        [=](auto rows, int64_t r, int64_t j, T* p1, T* p2) {
            const V mh = Elem<T>::load(MH + j);
            V a1 = V{}, a2 = V{};
            for (int i = 0; i < decltype(rows)::value; ++i) {
                const int64_t e = (r + i) * W + j;
                V g = ld(dy + e);
                a1 += g;
                a2 += g * (ld(x + e) - mh);
            }
            Elem<T>::store(p1, V(Elem<T>::load(p1) + a1), false);
            Elem<T>::store(p2, V(Elem<T>::load(p2) + a2), false);
        },
        [=](int64_t r, int64_t j, double* a1, double* a2) {
            const int64_t e = r * W + j;
            const T g = up(dy[e]);
            *a1 += static_cast<double>(g);
            *a2 += static_cast<double>(g * (up(x[e]) - MH[j]));
        },
        [=](int64_t r, int64_t j) {
            for (int i = 0; i < 4; ++i) {
                __builtin_prefetch(x + (r + i) * W + j, 0, 2);
                __builtin_prefetch(dy + (r + i) * W + j, 0, 2);
            }
        },
        kLineValues<S>);
}

// Affine coefficients per column, and y = (x - mh)*s + b over rows. The
// coefficients of columns [j0, j1) are set by set(), as their channels' statistics come.
template <typename S>
struct ColumnNormalize {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const std::vector<int64_t>* chan;  // null: column j is channel j
    std::vector<T> mh, s, b;
    bool centered = false;  // some column's mh is not 0 (see set_channels); sticky
    const S* x;
    S* y;
    int64_t W;
    bool stream;
    ColumnNormalize(const std::vector<int64_t>* chan_, int64_t W_, const S* x_, S* y_,
                    bool stream_)
        : chan(chan_), mh(W_), s(W_), b(W_), x(x_), y(y_), W(W_), stream(stream_) {}
    ColumnNormalize& set(int64_t j0, int64_t j1, const std::vector<Affine<T>>& per) {
        centered = true;
        for (int64_t j = j0; j < j1; ++j) {
            const Affine<T>& a = per[(*chan)[j]];
            mh[j] = a.mh;
            s[j] = a.s;
            b[j] = a.b;
        }
        return *this;
    }
    // Columns that are channels: the coefficients straight from the statistics
    // (affine_of's, in one loop the compiler vectorizes; wide layers have
    // thousands of channels).
    //
    // Where every channel's |mean|*invstd is at most 1, the coefficients are
    // uncentered: mh = 0 and b = beta - mean*s (in float64), so y = x*s + b.
    // That form rounds s and b, whose errors reach y scaled by |x|*invstd and
    // |mean|*invstd, within an ulp or two of y then, as the centered form's;
    // and rows() then reads two arrays instead of three (float32 wide-row
    // inference 10% faster). Far from zero (|mean| >> std) the centered form
    // keeps its accuracy. run<U> needs no branch: x - 0 is x.
    ColumnNormalize& set_channels(int64_t c0, int64_t c1, const double* __restrict mean,
                                  const double* __restrict invstd, const T* __restrict weight,
                                  const T* __restrict bias) {
        T* __restrict m = mh.data();
        T* __restrict sc = s.data();
        T* __restrict bb = b.data();
        // The largest |mean|*invstd, as 8 running maxima: std::fmax was a libm
        // call per channel (15% of a (1, 4096) inference call), and one running
        // maximum a chain of dependent steps (another 15%); GCC's vectors of
        // this loop ran slower than the 8 scalar chains. NaN statistics give
        // NaN outputs either way.
        double lane[8] = {};
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8)
            for (int k = 0; k < 8; ++k) {
                const double d = std::fabs(mean[c + k] * invstd[c + k]);
                lane[k] = d > lane[k] ? d : lane[k];
            }
        double far = 0;
        for (; c < c1; ++c) far = std::max(far, std::fabs(mean[c] * invstd[c]));
        for (double d : lane) far = std::max(far, d);
        const bool centered_here = !(far <= 1.0);
        centered = centered || centered_here;
        for (c = c0; c < c1; ++c) {
            const Affine<T> q = affine_of(mean[c], invstd[c], weight, bias, c, centered_here);
            m[c] = q.mh;
            sc[c] = q.s;
            bb[c] = q.b;
        }
        return *this;
    }
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V vmh[U], vs[U], vb[U];
        for (int u = 0; u < U; ++u) {
            vmh[u] = Elem<T>::load(mh.data() + j + u * kLanes);
            vs[u] = Elem<T>::load(s.data() + j + u * kLanes);
            vb[u] = Elem<T>::load(b.data() + j + u * kLanes);
        }
        // Members in locals: the stores may alias *this as far as the compiler
        // knows, which made it reload x, y, W and stream after every vector.
        const S* const xs = x;
        S* const ys = y;
        const int64_t w = W;
        const bool st = stream;
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * w + j + u * kLanes;
                store_out(ys + e, V((ld(xs + e) - vmh[u]) * vs[u] + vb[u]), st);
            }
    }
    // Rows [r0, r1), columns [j0, j1): one by one, or in pairs (for_rows).
    void rows(int64_t r0, int64_t r1, int64_t j0, int64_t j1) const {
        const T *const m = mh.data(), *const sc = s.data(), *const bb = b.data();
        const S* const xs = x;
        S* const ys = y;
        const bool st = stream;
        const auto last = [=](int64_t e, int64_t j) {
            ys[e] = down<S>((up(xs[e]) - m[j]) * sc[j] + bb[j]);
        };
        if (!centered)
            return for_rows<kRowGroup<S>>(
                r0, r1, j0, j1, W, pair_rows<T>(2, W),
                [=](int64_t j) {
                    return std::array<V, 2>{Elem<T>::load(sc + j), Elem<T>::load(bb + j)};
                },
                [=](int64_t f, const std::array<V, 2>& c) {
                    store_out(ys + f, V(ld(xs + f) * c[0] + c[1]), st);
                },
                last);
        for_rows<kRowGroup<S>>(
            r0, r1, j0, j1, W, pair_rows<T>(3, W),
            [=](int64_t j) {
                return std::array<V, 3>{Elem<T>::load(m + j), Elem<T>::load(sc + j),
                                        Elem<T>::load(bb + j)};
            },
            [=](int64_t f, const std::array<V, 3>& c) {
                store_out(ys + f, V((ld(xs + f) - c[0]) * c[1] + c[2]), st);
            },
            last);
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            y[e] = down<S>((up(x[e]) - mh[j]) * s[j] + b[j]);
        }
    }
};

// Gradient coefficients per column, and dx = a*dy - k*(x - mh) + c0 over
// rows; set() as in ColumnNormalize.
template <typename S>
struct ColumnGrad {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const std::vector<int64_t>& chan;
    std::vector<T> mh, a, k, c0;
    const S *dy, *x;
    S* dx;
    int64_t W;
    bool stream;
    ColumnGrad(const std::vector<int64_t>& chan_, const S* dy_, const S* x_, S* dx_, bool stream_)
        : chan(chan_), mh(chan_.size()), a(chan_.size()), k(chan_.size()), c0(chan_.size()),
          dy(dy_), x(x_), dx(dx_), W(int64_t(chan_.size())), stream(stream_) {}
    ColumnGrad& set(int64_t j0, int64_t j1, const std::vector<GradCoef<T>>& per) {
        for (int64_t j = j0; j < j1; ++j) {
            const GradCoef<T>& q = per[chan[j]];
            mh[j] = q.mh;
            a[j] = q.a;
            k[j] = q.k;
            c0[j] = q.c0;
        }
        return *this;
    }
    // Columns [lo, hi) that are channels: dbeta, dgamma and the coefficients
    // straight from the column sums (sdy, and sdyx_mh = sum dy*(x - mh)), as
    // grad_coef has them, in one loop the compiler vectorizes.
    ColumnGrad& set_channels(int64_t lo, int64_t hi, const double* __restrict sdy,
                             const double* __restrict sdyx_mh, const double* __restrict mean,
                             const double* __restrict invstd, const T* __restrict weight,
                             T* __restrict dweight, T* __restrict dbias, double n,
                             bool batch_stats) {
        T* __restrict cm = mh.data();
        T* __restrict ca = a.data();
        T* __restrict ck = k.data();
        T* __restrict cc = c0.data();
        for (int64_t c = lo; c < hi; ++c) {
            const double dgamma = dgamma_of<T>(sdy[c], sdyx_mh[c], mean[c], invstd[c]);
            const GradCoef<T> q = grad_coef(mean[c], invstd[c], weight, c, sdy[c], dgamma, n,
                                            batch_stats);
            dbias[c] = static_cast<T>(sdy[c]);
            dweight[c] = static_cast<T>(dgamma);
            cm[c] = q.mh;
            ca[c] = q.a;
            ck[c] = q.k;
            cc[c] = q.c0;
        }
        return *this;
    }
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V vmh[U], va[U], vk[U], vc[U];
        for (int u = 0; u < U; ++u) {
            vmh[u] = Elem<T>::load(mh.data() + j + u * kLanes);
            va[u] = Elem<T>::load(a.data() + j + u * kLanes);
            vk[u] = Elem<T>::load(k.data() + j + u * kLanes);
            vc[u] = Elem<T>::load(c0.data() + j + u * kLanes);
        }
        const S* const dys = dy;  // in locals, as in ColumnNormalize::run
        const S* const xs = x;
        S* const dxs = dx;
        const int64_t w = W;
        const bool st = stream;
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * w + j + u * kLanes;
                V t = ld(xs + e) - vmh[u];
                store_out(dxs + e, V(ld(dys + e) * va[u] + (vc[u] - t * vk[u])), st);
            }
    }
    // Rows [r0, r1), columns [j0, j1): one by one, or in pairs (for_rows).
    void rows(int64_t r0, int64_t r1, int64_t j0, int64_t j1) const {
        const T *const m = mh.data(), *const ca = a.data(), *const ck = k.data();
        const T* const cc = c0.data();
        const S *const dys = dy, *const xs = x;
        S* const dxs = dx;
        const bool st = stream;
        for_rows<kRowGroup<S>>(
            r0, r1, j0, j1, W, pair_rows<T>(4, W),
            [=](int64_t j) {
                return std::array<V, 4>{Elem<T>::load(m + j), Elem<T>::load(ca + j),
                                        Elem<T>::load(ck + j), Elem<T>::load(cc + j)};
            },
            [=](int64_t f, const std::array<V, 4>& c) {
                const V t = ld(xs + f) - c[0];
                store_out(dxs + f, V(ld(dys + f) * c[1] + (c[3] - t * c[2])), st);
            },
            [=](int64_t e, int64_t j) {
                dxs[e] = down<S>(up(dys[e]) * ca[j] + (cc[j] - (up(xs[e]) - m[j]) * ck[j]));
            });
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            dx[e] = down<S>(up(dy[e]) * a[j] + (c0[j] - (up(x[e]) - mh[j]) * k[j]));
        }
    }
};

// The elementwise passes (ColumnNormalize, ColumnGrad) over a block of rows:
// RB == 1, rows one by one in one loop each; else for_column_blocks.
template <typename S, typename Sweep>
void elementwise_blocks(const Block& k, int64_t W, const Sweep& sweep, int64_t RB) {
    if (RB == 1) return sweep.rows(k.r0, k.r1, k.j0, k.j1);
    for_column_blocks<S>(k, W, sweep, RB);
}

// ---- forward, batch statistics -------------------------------------------------------

template <typename S, typename T = Compute<S>>
void forward_train(const S* x, S* y, const T* w, const T* b, const Stats& stats, const Running& run,
                   double eps, const Geometry& g, int threads) {
    const int64_t C = g.C, inner = g.inner, numel = g.numel();
    const double n = static_cast<double>(g.n());
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(S)) >= kStreamBytes;
    const std::vector<T> K = shifts(x, g);

    if (g.planes()) {
        std::vector<double> partial;  // (threads, 2, C): element split only
        parallel(team, [&](const int t, const int T_) {
            if (split_of(g, sizeof(S), T_) == kByChannel) {
                int64_t c0, c1;
                split(C, t, T_, 1, &c0, &c1);
                const FetchAhead ahead = fetch_ahead<S>(g);
                for (int64_t c = c0; c < c1; ++c) {
                    const bool last = c + 1 == c1;
                    const bool next = ahead.reads && !last, next_out = ahead.writes && !last;
                    Sums<T> sums;
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        if (next) prefetch_run(x + off + inner, inner, false);
                        shifted_sums(x + off, inner, K[c], sums);
                    }
                    double s1 = 0, s2 = 0;
                    sums.add_to(&s1, &s2);
                    finish_channel(c, n, K.data(), s1, s2, eps, run, stats);
                    const Affine<T> a = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        if (next_out) prefetch_run(y + off + inner, inner, true);
                        normalize_run(x + off, y + off, inner, a, stream);
                    }
                }
            } else {
#pragma omp single
                partial.assign(size_t(T_) * 2 * C, 0.0);
                std::vector<Sums<T>> sums(C);
                int64_t e0, e1;
                split(numel, t, T_, kAlign, &e0, &e1);
                for_plane_pieces(g, e0, e1, [&](int64_t c, int64_t off, int64_t len) {
                    shifted_sums(x + off, len, K[c], sums[c]);
                });
                double* mine = partial.data() + int64_t(t) * 2 * C;
                for (int64_t c = 0; c < C; ++c) sums[c].add_to(mine + c, mine + C + c);
#pragma omp barrier
#pragma omp single
                for (int64_t c = 0; c < C; ++c) {
                    double s1 = 0, s2 = 0;
                    for (int u = 0; u < T_; ++u) {
                        s1 += partial[u * 2 * C + c];
                        s2 += partial[u * 2 * C + C + c];
                    }
                    finish_channel(c, n, K.data(), s1, s2, eps, run, stats);
                }
                for_plane_pieces(g, e0, e1, [&](int64_t c, int64_t off, int64_t len) {
                    normalize_run(x + off, y + off, len,
                                  affine_of(stats.mean[c], stats.invstd[c], w, b, c), stream);
                });
            }
        });
        return;
    }

    // Periodic rows of width W, then the last numel % W elements one by one.
    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const std::vector<int64_t> chan = column_channels(g, W);
    const std::vector<T> KW = columns<T>(chan, [&](int64_t c) { return K[c]; });
    std::vector<double> partial;
    std::vector<Affine<T>> per(C);
    ColumnNormalize<S>* norm = nullptr;
    parallel(team, [&](const int t, const int T_) {
        if (split_of(g, sizeof(S), T_) == kByColumn) {
            // A row is one period (rows = outer, no tail): this thread's
            // channels own the columns [c0*inner, c1*inner) of every row,
            // taken a panel at a time so the second pass finds it in cache.
            int64_t c0, c1;
            split(C, t, T_, inner == 1 ? kAlign : 1, &c0, &c1);
            std::vector<double> acc(size_t(2 * W), 0.0);
            ColumnNormalize<S> norm(&chan, W, x, y, stream);
            const int64_t pc = panel_channels(g, rows, sizeof(S));
            for (int64_t p0 = c0; p0 < c1; p0 += pc) {
                const int64_t p1 = min64(c1, p0 + pc);
                const Block k{0, rows, p0 * inner, p1 * inner};
                for_column_blocks<S>(
                    k, W, ColumnSums<S>{x, W, KW.data(), acc.data(), acc.data() + W}, kBlock);
                if (inner == 1) {  // a column is a channel
                    finish_stats(p0, p1, n, K.data(), acc.data(), acc.data() + W, eps, run, stats);
                    norm.set_channels(p0, p1, stats.mean, stats.invstd, w, b);
                } else {
                    for (int64_t c = p0; c < p1; ++c) {
                        double s1 = 0, s2 = 0;
                        for (int64_t j = c * inner; j < (c + 1) * inner; ++j) {
                            s1 += acc[j];
                            s2 += acc[W + j];
                        }
                        finish_channel(c, n, K.data(), s1, s2, eps, run, stats);
                        per[c] = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
                    }
                    norm.set(k.j0, k.j1, per);
                }
                for_column_blocks<S>(k, W, norm, kBlock);
            }
            return;
        }
#pragma omp single
        partial.assign(size_t(T_) * 2 * W, 0.0);
        double* acc = partial.data() + int64_t(t) * 2 * W;
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        const Block k{r0, r1, 0, W};
        periodic_sums(ColumnSums<S>{x, W, KW.data(), acc, acc + W}, k);
#pragma omp barrier
#pragma omp single
        {
            std::vector<double> s1(C, 0.0), s2(C, 0.0);
            for (int u = 0; u < T_; ++u)
                for (int64_t j = 0; j < W; ++j) {
                    s1[chan[j]] += partial[u * 2 * W + j];
                    s2[chan[j]] += partial[u * 2 * W + W + j];
                }
            for (int64_t e = tail; e < numel; ++e) {
                const int64_t c = chan[e - tail];
                const double d = static_cast<double>(up(x[e]) - K[c]);
                s1[c] += d;
                s2[c] += d * d;
            }
            finish_stats(0, C, n, K.data(), s1.data(), s2.data(), eps, run, stats);
            for (int64_t c = 0; c < C; ++c)
                per[c] = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
            norm = &(new ColumnNormalize<S>(&chan, W, x, y, stream))->set(0, W, per);
        }
        elementwise_blocks<S>(k, W, *norm, elementwise_rows<S>(W, numel));
    });
    delete norm;
    for (int64_t e = tail; e < numel; ++e) {
        const Affine<T>& a = per[chan[e - tail]];
        y[e] = down<S>((up(x[e]) - a.mh) * a.s + a.b);
    }
}

// ---- forward, given statistics (evaluation) ---------------------------------------------

// The statistics (float64) of running buffers of type R.
// Separate arrays (restrict): the loop runs in vector square roots and divisions.
template <typename R>
void running_stats(const R* __restrict rm, const R* __restrict rv, int64_t C, double eps,
                   double* __restrict mean, double* __restrict var, double* __restrict invstd) {
    for (int64_t c = 0; c < C; ++c) {
        mean[c] = static_cast<double>(rm[c]);
        var[c] = static_cast<double>(rv[c]);
        invstd[c] = 1.0 / std::sqrt(static_cast<double>(rv[c]) + eps);
    }
}

// y = (x - mh)*s + b over the elements [e0, e1) of planes (inner >= kLanes):
// whole aligned vectors all along, a vector that straddles two planes taking
// each lane's coefficients from its own plane. Inference takes it (by_range)
//   - for a streamed output: runs of one plane each would leave their first
//     and last lines partial; but 16-bit planes of kStreamRunBytes or more go
//     run by run, each run's whole lines streamed (streamed_run), as training
//     writes them, which measured faster there (56x56 16-bit inference
//     1.14-1.49x, 28x28 0.99-1.05x; float32 14x14 planes ran 0.58x so);
//   - for planes shorter than kShortPlane: there a run's overlapping last
//     vector and the call per run cost more than the straddling vectors (7x7
//     inference 1.05-1.07x faster, 6x6 1.33x; 10x10 and 14x14 16-bit planes
//     ran 0.87-0.94x);
//   - where a float32 or float64 vector is whole cache lines, runs are not
//     whole vectors, and the tensor is too large for the caches to hold with
//     its output (kStreamBytes): run by run, nearly every vector would then
//     straddle two lines that come from memory (14x14 and 17x17 float32
//     inference 1.12-1.14x faster on one thread; 10x10 in cache ran 0.9x).
constexpr int64_t kShortPlane = 4 * kLanes;

template <typename S>
bool by_range(const Geometry& g, bool stream) {
    const bool streamed_runs = sizeof(S) == 2 && g.inner * int64_t(sizeof(S)) >= kStreamRunBytes;
    const bool misaligned_runs = sizeof(S) >= 4 && g.inner % kLanes != 0 &&
                                 g.numel() * int64_t(sizeof(S)) >= kStreamBytes;
    return (stream && !streamed_runs) || g.inner < kShortPlane || misaligned_runs;
}

template <typename S, typename T = Compute<S>>
void normalize_range(const S* x, S* y, int64_t e0, int64_t e1, const Geometry& g,
                     const std::vector<Affine<T>>& per, bool stream) {
    typedef VecOf<S> V;
    constexpr int64_t line = kStreamAlign<S>;
    auto one = [&](int64_t e) {
        const Affine<T>& a = per[(e / g.inner) % g.C];
        y[e] = down<S>((up(x[e]) - a.mh) * a.s + a.b);
    };
    int64_t e = e0;
    for (; e < e1 && (reinterpret_cast<uintptr_t>(y + e) & (line - 1)) != 0; ++e) one(e);
    V lane{};
    for (int k = 0; k < kLanes; ++k) lane[k] = T(k);
    const int64_t plane = e / g.inner;
    int64_t end = (plane + 1) * g.inner, c = plane % g.C;
    for (; e + kLanes <= e1; e += kLanes) {
        if (e >= end) {
            end += g.inner;
            if (++c == g.C) c = 0;
        }
        const Affine<T>& a = per[c];
        if (e + 2 * kLanes <= end && e + 2 * kLanes <= e1) {  // two vectors of one plane
            const V v0 = (ld(x + e) - a.mh) * a.s + a.b;
            const V v1 = (ld(x + e + kLanes) - a.mh) * a.s + a.b;
            store_out(y + e, v0, stream);
            store_out(y + e + kLanes, v1, stream);
            e += kLanes;
            continue;
        }
        if (e + kLanes <= end) {
            store_out(y + e, V((ld(x + e) - a.mh) * a.s + a.b), stream);
            continue;
        }
        // Lanes from end - e on belong to the next plane.
        const Affine<T>& n = per[c + 1 == g.C ? 0 : c + 1];
        const auto next = lane >= T(end - e);
        const V mh = next ? V{} + n.mh : V{} + a.mh;
        const V sc = next ? V{} + n.s : V{} + a.s;
        const V bb = next ? V{} + n.b : V{} + a.b;
        store_out(y + e, V((ld(x + e) - mh) * sc + bb), stream);
    }
    for (; e < e1; ++e) one(e);
}

// One pass: y = (x - mean)*invstd*gamma + beta. Nothing to reduce, so every
// geometry splits into equal ranges (of elements, rows, or a few rows' columns).
template <typename S, typename T = Compute<S>>
void normalize(const S* x, S* y, const T* w, const T* b, const double* mean, const double* invstd,
               const Geometry& g, int threads) {
    const int64_t C = g.C, numel = g.numel();
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(S)) >= stream_eval_bytes(g);
    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const bool columns_are_channels = !g.planes() && W == C;  // then no tail either
    std::vector<Affine<T>> per(columns_are_channels ? 0 : C);
    for (size_t c = 0; c < per.size(); ++c) per[c] = affine_of(mean[c], invstd[c], w, b, c);
    if (g.planes()) {
        parallel(team, [&](const int t, const int T_) {
            int64_t e0, e1;
            split(numel, t, T_, kAlign, &e0, &e1);
            if (by_range<S>(g, stream)) return normalize_range(x, y, e0, e1, g, per, stream);
            for_plane_pieces(g, e0, e1, [&](int64_t c, int64_t off, int64_t len) {
                normalize_run(x + off, y + off, len, per[c], stream);
            });
        });
        return;
    }
    const std::vector<int64_t> chan =
        columns_are_channels ? std::vector<int64_t>() : column_channels(g, W);
    ColumnNormalize<S> norm(columns_are_channels ? nullptr : &chan, W, x, y, stream);
    if (columns_are_channels)
        norm.set_channels(0, W, mean, invstd, w, b);
    else
        norm.set(0, W, per);
    const int64_t RB = elementwise_rows<S>(W, numel);
    const bool by_column = split_of(g, sizeof(S), team) == kByColumn;
    parallel(team, [&](const int t, const int T_) {
        if (by_column && rows <= 4 * kBlock) {
            // Few rows: each thread takes all rows of its columns, as in training.
            // Halving a thread's rows instead leaves it short strided runs, and
            // every thread all the coefficients.
            int64_t j0, j1;
            split(W, t, T_, kAlign, &j0, &j1);
            return elementwise_blocks<S>(Block{0, rows, j0, j1}, W, norm, RB);
        }
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        elementwise_blocks<S>(Block{r0, r1, 0, W}, W, norm, RB);
    });
    for (int64_t e = tail; e < numel; ++e) {
        const Affine<T>& a = per[chan[e - tail]];
        y[e] = down<S>((up(x[e]) - a.mh) * a.s + a.b);
    }
}

// ---- backward ------------------------------------------------------------------------------

template <typename S, typename T = Compute<S>>
void backward(const S* dy, const S* x, S* dx, const T* w, const double* mean, const double* invstd,
              T* dw, T* db, bool batch_stats, const Geometry& g, int threads) {
    const int64_t C = g.C, inner = g.inner, numel = g.numel();
    const double n = static_cast<double>(g.n());
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(S)) >= kStreamBytes;
    // mh first (the sums need it); the rest once the sums are known. The sums
    // give sum dy*(x - mh); sum dy*(x - mean) is that minus ml*sum dy.
    std::vector<GradCoef<T>> coef(C);
    for (int64_t c = 0; c < C; ++c) coef[c] = grad_coef(mean[c], invstd[c], w, c, 0, 0, n, false);
    auto finish = [&](int64_t c, double sdy, double sdyx_mh) {
        const double dgamma = dgamma_of<T>(sdy, sdyx_mh, mean[c], invstd[c]);
        db[c] = static_cast<T>(sdy);
        dw[c] = static_cast<T>(dgamma);
        coef[c] = grad_coef(mean[c], invstd[c], w, c, sdy, dgamma, n, batch_stats);
    };

    if (g.planes()) {
        std::vector<double> partial;
        parallel(team, [&](const int t, const int T_) {
            if (split_of(g, sizeof(S), T_) == kByChannel) {
                int64_t c0, c1;
                split(C, t, T_, 1, &c0, &c1);
                const FetchAhead ahead = fetch_ahead<S>(g);
                for (int64_t c = c0; c < c1; ++c) {
                    const bool last = c + 1 == c1;
                    const bool next = ahead.reads && !last, next_out = ahead.writes && !last;
                    Sums<T> sums;
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        if (next) {
                            prefetch_run(dy + off + inner, inner, false);
                            prefetch_run(x + off + inner, inner, false);
                        }
                        grad_sums(dy + off, x + off, inner, coef[c].mh, sums);
                    }
                    double sdy = 0, sdyx = 0;
                    sums.add_to(&sdy, &sdyx);
                    finish(c, sdy, sdyx);
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        if (next_out) prefetch_run(dx + off + inner, inner, true);
                        grad_run(dy + off, x + off, dx + off, inner, coef[c], stream);
                    }
                }
            } else {
#pragma omp single
                partial.assign(size_t(T_) * 2 * C, 0.0);
                std::vector<Sums<T>> sums(C);
                int64_t e0, e1;
                split(numel, t, T_, kAlign, &e0, &e1);
                for_plane_pieces(g, e0, e1, [&](int64_t c, int64_t off, int64_t len) {
                    grad_sums(dy + off, x + off, len, coef[c].mh, sums[c]);
                });
                double* mine = partial.data() + int64_t(t) * 2 * C;
                for (int64_t c = 0; c < C; ++c) sums[c].add_to(mine + c, mine + C + c);
#pragma omp barrier
#pragma omp single
                for (int64_t c = 0; c < C; ++c) {
                    double sdy = 0, sdyx = 0;
                    for (int u = 0; u < T_; ++u) {
                        sdy += partial[u * 2 * C + c];
                        sdyx += partial[u * 2 * C + C + c];
                    }
                    finish(c, sdy, sdyx);
                }
                for_plane_pieces(g, e0, e1, [&](int64_t c, int64_t off, int64_t len) {
                    grad_run(dy + off, x + off, dx + off, len, coef[c], stream);
                });
            }
        });
        return;
    }

    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const std::vector<int64_t> chan = column_channels(g, W);
    const std::vector<T> MH = columns<T>(chan, [&](int64_t c) { return coef[c].mh; });
    std::vector<double> partial;
    ColumnGrad<S>* grad = nullptr;
    parallel(team, [&](const int t, const int T_) {
        if (split_of(g, sizeof(S), T_) == kByColumn) {  // as in forward_train
            int64_t c0, c1;
            split(C, t, T_, inner == 1 ? kAlign : 1, &c0, &c1);
            std::vector<double> acc(size_t(2 * W), 0.0);
            ColumnGrad<S> grad_cols(chan, dy, x, dx, stream);
            const int64_t pc = panel_channels(g, rows, 2 * sizeof(S));  // dy and x
            for (int64_t p0 = c0; p0 < c1; p0 += pc) {
                const int64_t p1 = min64(c1, p0 + pc);
                const Block k{0, rows, p0 * inner, p1 * inner};
                for_column_blocks<S>(
                    k, W, ColumnGradSums<S>{dy, x, W, MH.data(), acc.data(), acc.data() + W},
                    kBlock);
                if (inner == 1) {  // a column is a channel
                    grad_cols.set_channels(p0, p1, acc.data(), acc.data() + W, mean, invstd, w,
                                           dw, db, n, batch_stats);
                } else {
                    for (int64_t c = p0; c < p1; ++c) {
                        double sdy = 0, sdyx = 0;
                        for (int64_t j = c * inner; j < (c + 1) * inner; ++j) {
                            sdy += acc[j];
                            sdyx += acc[W + j];
                        }
                        finish(c, sdy, sdyx);
                    }
                    grad_cols.set(k.j0, k.j1, coef);
                }
                for_column_blocks<S>(k, W, grad_cols, kBlock);
            }
            return;
        }
#pragma omp single
        partial.assign(size_t(T_) * 2 * W, 0.0);
        double* acc = partial.data() + int64_t(t) * 2 * W;
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        const Block k{r0, r1, 0, W};
        periodic_grad_sums(ColumnGradSums<S>{dy, x, W, MH.data(), acc, acc + W}, k);
#pragma omp barrier
#pragma omp single
        {
            std::vector<double> sdy(C, 0.0), sdyx(C, 0.0);
            for (int u = 0; u < T_; ++u)
                for (int64_t j = 0; j < W; ++j) {
                    sdy[chan[j]] += partial[u * 2 * W + j];
                    sdyx[chan[j]] += partial[u * 2 * W + W + j];
                }
            for (int64_t e = tail; e < numel; ++e) {
                const int64_t c = chan[e - tail];
                const T g_ = up(dy[e]);
                sdy[c] += static_cast<double>(g_);
                sdyx[c] += static_cast<double>(g_ * (up(x[e]) - coef[c].mh));
            }
            for (int64_t c = 0; c < C; ++c) finish(c, sdy[c], sdyx[c]);
            grad = &(new ColumnGrad<S>(chan, dy, x, dx, stream))->set(0, W, coef);
        }
        elementwise_blocks<S>(k, W, *grad, elementwise_rows<S>(W, numel));
    });
    delete grad;
    for (int64_t e = tail; e < numel; ++e) {
        const GradCoef<T>& q = coef[chan[e - tail]];
        dx[e] = down<S>(up(dy[e]) * q.a + (q.c0 - (up(x[e]) - q.mh) * q.k));
    }
}

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
