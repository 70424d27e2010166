// Batch norm CPU kernels: fused passes over dense float32/float64 tensors.
//
// Every supported layout is one geometry: memory holds x as (outer, C, inner),
// contiguous. NCHW is (N, C, H*W); channels_last and (N, C) are (rows, C, 1).
// Two traversals cover all of them:
//
//   planes    inner >= kPlaneMin: runs of `inner` values of one channel.
//   periodic  short inner (channels_last, (N, C)): the channel of flat index
//             e is (e % P) / inner with period P = C*inner, so memory is read
//             as rows of width W = lcm(P, 16) whose column j always holds
//             channel (j % P) / inner, and every row is whole vectors.
//
// Passes (n values per channel, xhat = (x - mean)*invstd):
//   forward   sums of (x - K) and (x - K)^2, K a shift near the channel's mean;
//             then y = xhat*gamma + beta.
//   backward  dbeta = sum dy, dgamma = sum dy*xhat; then
//               batch statistics:   dx = gamma*invstd/n * (n*dy - dbeta - xhat*dgamma)
//               running statistics: dx = gamma*invstd * dy
// When every thread owns whole channels, a channel's second pass follows its
// first while its data is still in cache.
//
// Numerics: with the shift, var = E[(x-K)^2] - E[x-K]^2 does not cancel.
// Sums are built in the input's precision for at most kBlock additions per
// vector lane, then carried in float64. Elementwise passes run in the input's
// dtype, with the mean split as mh (in T) + ml (the float64 rest, folded into
// per-channel constants) so x - mean stays accurate when |mean| >> std.
//
// Threads: OpenMP (the runtime torch uses), as many as the caller passes
// (torch.get_num_threads()); small inputs run on fewer.
//
// Memory: outputs larger than a quarter of a last-level cache (kStreamBytes)
// are written around the caches (non-temporal stores: little of them would
// still be cached when they are read, and the stores skip reading the lines
// they overwrite). On Linux, large fresh outputs are advised as huge pages
// before their first touch: one page fault per 2 MiB instead of one per 4 KiB,
// which on some machines costs more than the pass itself.
//
// The Python functions take data pointers and sizes, never tensors, so this
// file needs only the Python headers and compiles in a few seconds.

#include <Python.h>

#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;           // elements per vector, float and double alike
constexpr int kBlock = 16;           // additions per lane before partial sums go to float64
constexpr int64_t kPlaneMin = 64;    // inner >= this: plane traversal
constexpr int64_t kMaxWidth = 4096;  // widest periodic row
constexpr int64_t kGrain = 32768;    // elements per thread, at least
constexpr int64_t kAlign = 16;       // thread ranges start at multiples of this

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef double vd __attribute__((vector_size(128)));
typedef double vdu __attribute__((vector_size(128), aligned(8)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
    typedef vf v;
    typedef vfu u;
};
template <>
struct Vec<double> {
    typedef vd v;
    typedef vdu u;
};

template <typename T>
inline typename Vec<T>::v load(const T* p) {
    return *reinterpret_cast<const typename Vec<T>::u*>(p);
}
template <typename T>
inline void store(T* p, typename Vec<T>::v v) {
    *reinterpret_cast<typename Vec<T>::u*>(p) = v;
}

// Outputs larger than this are written around the caches (non-temporal
// stores). A pass writing that much reads at least as much, so little of the
// output would still be cached when its reader comes; the stores skip reading
// the lines they overwrite and leave the caches to the input, which the next
// pass over it reads again. A quarter of a typical last-level cache (32 MiB;
// what the OS reports is unreliable in VMs). Measured against 32 MiB on
// outputs of 16 and 26 MB: training forwards 1.3-1.5x faster, evaluation
// 1.05-1.7x in most runs (one, its output's memory reused, 1.2x slower).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

template <typename T>
inline void store_out(T* p, typename Vec<T>::v v, bool stream) {
#if defined(__AVX__)
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
        const __m256i* from = reinterpret_cast<const __m256i*>(&v);
        __m256i* to = reinterpret_cast<__m256i*>(p);
        for (size_t k = 0; k < sizeof(v) / sizeof(__m256i); ++k)
            _mm256_stream_si256(to + k, _mm256_load_si256(from + k));
        return;
    }
#endif
    store(p, v);
}

// Orders this thread's non-temporal stores before whatever follows.
inline void store_fence() {
#if defined(__AVX__)
    _mm_sfence();
#endif
}

template <typename T>
inline vd to_double(typename Vec<T>::v v);
template <>
inline vd to_double<float>(vf v) {
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

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

int64_t gcd(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// The shape of one call: memory is (outer, C, inner), contiguous.
struct Geometry {
    int64_t outer, C, inner;
    int64_t numel() const { return outer * C * inner; }
    int64_t n() const { return outer * inner; }  // values per channel
    bool planes() const { return inner >= kPlaneMin; }
    int64_t period() const { return C * inner; }
    // Width of a periodic row: a multiple of the period, whole vectors when affordable.
    int64_t width() const {
        int64_t p = period();
        int64_t w = p / gcd(p, kLanes) * kLanes;
        return w <= kMaxWidth ? w : p;
    }
};

// body(t, T) on a team of `team` threads, or directly when team is 1 (an
// OpenMP region costs microseconds, a small batch norm about as much).
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

int team_size(int64_t numel, int requested) {
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

// Whole channels per thread, when that balances: every thread the same number, or many.
inline bool channel_split(const Geometry& g, int T) {
    return g.planes() && (g.C % T == 0 || g.C >= 8 * T);
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

// The shift K of channel c: the mean of its first few values, in T.
template <typename T>
T shift_of(const T* x, const Geometry& g, int64_t c) {
    double s = 0.0;
    int k = 0;
    if (g.inner >= 8) {
        for (; k < 8; ++k) s += x[c * g.inner + k];
    } else {
        for (; k < 8 && k < g.outer; ++k) s += x[k * g.period() + c * g.inner];
    }
    return static_cast<T>(s / k);
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

template <typename T>
Affine<T> affine_of(double mean, double invstd, const T* w, const T* b, int64_t c) {
    Affine<T> a;
    a.mh = static_cast<T>(mean);
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

// Per-channel statistics, float64 outputs.
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
void update_running(R* rm, R* rv, int64_t c, double mean, double var, double n, double m) {
    double unbiased = n > 1 ? var * (n / (n - 1)) : var;
    rm[c] = static_cast<R>((1.0 - m) * static_cast<double>(rm[c]) + m * mean);
    rv[c] = static_cast<R>((1.0 - m) * static_cast<double>(rv[c]) + m * unbiased);
}

// Statistics of channel c from its shifted sums.
void finish_stats(int64_t c, double n, double K, double s1, double s2, double eps,
                  const Running& run, const Stats& stats) {
    double d = s1 / n;
    double var = s2 / n - d * d;
    if (var < 0) var = 0;
    double mean = K + d;
    stats.mean[c] = mean;
    stats.var[c] = var;
    stats.invstd[c] = 1.0 / std::sqrt(var + eps);
    if (!run.mean) return;
    if (run.is_double)
        update_running(static_cast<double*>(run.mean), static_cast<double*>(run.var), c, mean, var,
                       n, run.momentum);
    else
        update_running(static_cast<float*>(run.mean), static_cast<float*>(run.var), c, mean, var,
                       n, run.momentum);
}

// ---- sums ------------------------------------------------------------------------------

// Two running sums per vector lane (s1, s2), for one channel: built in T for
// at most kBlock steps, then carried in float64. Two sets of accumulators (a,
// b) keep two independent addition chains in flight.
template <typename T>
struct Sums {
    typedef typename Vec<T>::v V;
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
inline typename Vec<T>::v tail_ones(int64_t rem) {
    alignas(64) static const T table[2 * kLanes] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    return load(table + rem);
}

// ---- passes over contiguous runs (plane traversal) --------------------------------

// Shifted sums of one run: s1 += sum(x - K), s2 += sum((x - K)^2).
template <typename T>
void shifted_sums(const T* x, int64_t len, T K, Sums<T>& s) {
    typedef typename Vec<T>::v V;
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        V d = load(x + i) - K, e = load(x + i + kLanes) - K;
        s.a1 += d;
        s.a2 += d * d;
        s.b1 += e;
        s.b2 += e * e;
        s.step();
    }
    if (i + kLanes <= len) {
        V d = load(x + i) - K;
        s.a1 += d;
        s.a2 += d * d;
        i += kLanes;
    }
    if (i < len && len >= kLanes) {
        V d = (load(x + len - kLanes) - K) * tail_ones<T>(len - i);
        s.b1 += d;
        s.b2 += d * d;
    } else {
        for (; i < len; ++i) {
            double d = static_cast<double>(x[i] - K);
            s.r1 += d;
            s.r2 += d * d;
        }
    }
    s.step();
}

// Gradient sums of one run: s1 += sum(dy), s2 += sum(dy*(x - mh)).
template <typename T>
void grad_sums(const T* dy, const T* x, int64_t len, T mh, Sums<T>& s) {
    typedef typename Vec<T>::v V;
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        V g = load(dy + i), h = load(dy + i + kLanes);
        s.a1 += g;
        s.a2 += g * (load(x + i) - mh);
        s.b1 += h;
        s.b2 += h * (load(x + i + kLanes) - mh);
        s.step();
    }
    if (i + kLanes <= len) {
        V g = load(dy + i);
        s.a1 += g;
        s.a2 += g * (load(x + i) - mh);
        i += kLanes;
    }
    if (i < len && len >= kLanes) {
        const int64_t last = len - kLanes;
        V g = load(dy + last) * tail_ones<T>(len - i);
        s.b1 += g;
        s.b2 += g * (load(x + last) - mh);
    } else {
        for (; i < len; ++i) {
            s.r1 += static_cast<double>(dy[i]);
            s.r2 += static_cast<double>(dy[i] * (x[i] - mh));
        }
    }
    s.step();
}

// out[i] = f(i) over one run, f giving a vector at i (or a value, scalar). A
// ragged end recomputes an overlapping vector; when streaming, the run goes
// value by value up to a 64-byte boundary, then in whole vectors written
// around the caches (each a full line, never rewritten), then value by value.
template <typename T, typename Vector, typename Scalar>
inline void elementwise_run(T* out, int64_t len, bool stream, Vector f, Scalar f1) {
    if (stream) {
        int64_t i = 0;
        for (; i < len && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0; ++i) out[i] = f1(i);
        for (; i + kLanes <= len; i += kLanes) store_out(out + i, f(i), true);
        for (; i < len; ++i) out[i] = f1(i);
        return;
    }
    if (len < kLanes) {
        for (int64_t i = 0; i < len; ++i) out[i] = f1(i);
        return;
    }
    for (int64_t i = 0;; i += kLanes) {
        if (i > len - kLanes) i = len - kLanes;
        store(out + i, f(i));
        if (i == len - kLanes) break;
    }
}

// y = (x - mh)*s + b over one run.
template <typename T>
void normalize_run(const T* x, T* y, int64_t len, Affine<T> c, bool stream) {
    typedef typename Vec<T>::v V;
    elementwise_run(
        y, len, stream, [&](int64_t i) { return V((load(x + i) - c.mh) * c.s + c.b); },
        [&](int64_t i) { return (x[i] - c.mh) * c.s + c.b; });
}

// dx = a*dy - k*(x - mh) + c0 over one run.
template <typename T>
void grad_run(const T* dy, const T* x, T* dx, int64_t len, GradCoef<T> q, bool stream) {
    typedef typename Vec<T>::v V;
    elementwise_run(
        dx, len, stream,
        [&](int64_t i) {
            return V(load(dy + i) * q.a + (q.c0 - (load(x + i) - q.mh) * q.k));
        },
        [&](int64_t i) { return dy[i] * q.a + (q.c0 - (x[i] - q.mh) * q.k); });
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
// faster than many short strided runs; their sums go through per-column
// partial sums in T that are carried into float64 every kBlock rows.

constexpr int64_t kBlockBytes = 16384;
constexpr int64_t kWideRow = 2048;

template <typename T>
bool wide_rows(int64_t W) {
    return W * int64_t(sizeof(T)) >= kWideRow;
}

template <typename T>
constexpr int kUnroll = sizeof(T) == 4 ? 4 : 2;  // vectors of columns per sweep

template <typename T>
int64_t rows_per_block(int64_t W) {
    if (wide_rows<T>(W)) return 1;
    int64_t r = kBlockBytes / (W * int64_t(sizeof(T)));
    return r < 1 ? 1 : (r > kBlock ? kBlock : r);
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

// Calls sweep.template run<U>(rb, re, j) over all rows [r0, r1) and whole
// vectors of columns, then sweep.scalar(rb, re, j) for the columns left over.
template <typename T, typename Sweep>
void for_column_blocks(int64_t r0, int64_t r1, int64_t W, const Sweep& sweep) {
    constexpr int U = kUnroll<T>;
    const int64_t WU = W / (U * kLanes) * (U * kLanes), Wv = W / kLanes * kLanes;
    const int64_t RB = rows_per_block<T>(W);
    for (int64_t rb = r0; rb < r1; rb += RB) {
        const int64_t re = min64(r1, rb + RB);
        int64_t j = 0;
        for (; j < WU; j += U * kLanes) sweep.template run<U>(rb, re, j);
        for (; j < Wv; j += kLanes) sweep.template run<1>(rb, re, j);
        for (; j < W; ++j) sweep.scalar(rb, re, j);
    }
}

// acc1[j] += sum_r (x[r, j] - K[j]), acc2[j] += sum_r (x[r, j] - K[j])^2.
template <typename T>
struct ColumnSums {
    typedef typename Vec<T>::v V;
    const T* x;
    int64_t W;
    const T* K;
    double *acc1, *acc2;
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V k[U], a1[U], a2[U];
        for (int u = 0; u < U; ++u) {
            k[u] = load(K + j + u * kLanes);
            a1[u] = V{};
            a2[u] = V{};
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                V d = load(x + r * W + j + u * kLanes) - k[u];
                a1[u] += d;
                a2[u] += d * d;
            }
        for (int u = 0; u < U; ++u) {
            double* p1 = acc1 + j + u * kLanes;
            double* p2 = acc2 + j + u * kLanes;
            store(p1, vd(load(p1) + to_double<T>(a1[u])));
            store(p2, vd(load(p2) + to_double<T>(a2[u])));
        }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            double d = static_cast<double>(x[r * W + j] - K[j]);
            acc1[j] += d;
            acc2[j] += d * d;
        }
    }
};

// Wide rows: add(rows, r, j, p1, p2) adds the vectors of columns j of rows
// [r, r + rows) (rows a compile-time 4 or 1: four rows read side by side
// share one update of the partial sums) to the T-precision partial sums p1,
// p2 (arrays of W), carried into acc1, acc2 every kBlock rows. Columns past
// the last whole vector go to add_scalar(r, j, acc1 + j, acc2 + j).
template <typename T, typename Add, typename AddScalar>
void stream_rows(int64_t r0, int64_t r1, int64_t W, double* acc1, double* acc2, Add add,
                 AddScalar add_scalar) {
    std::vector<T> p1(W), p2(W);
    const int64_t Wv = W / kLanes * kLanes;
    for (int64_t rb = r0; rb < r1; rb += kBlock) {
        const int64_t re = min64(r1, rb + kBlock);
        int64_t r = rb;
        for (; r + 4 <= re; r += 4)
            for (int64_t j = 0; j < Wv; j += kLanes)
                add(std::integral_constant<int, 4>{}, r, j, p1.data() + j, p2.data() + j);
        for (; r < re; ++r)
            for (int64_t j = 0; j < Wv; j += kLanes)
                add(std::integral_constant<int, 1>{}, r, j, p1.data() + j, p2.data() + j);
        for (r = rb; r < re; ++r)
            for (int64_t j = Wv; j < W; ++j) add_scalar(r, j, acc1 + j, acc2 + j);
        for (int64_t j = 0; j < Wv; ++j) {
            acc1[j] += static_cast<double>(p1[j]);
            acc2[j] += static_cast<double>(p2[j]);
            p1[j] = p2[j] = T(0);
        }
    }
}

template <typename T>
void periodic_sums(const ColumnSums<T>& s, int64_t r0, int64_t r1) {
    typedef typename Vec<T>::v V;
    if (!wide_rows<T>(s.W)) return for_column_blocks<T>(r0, r1, s.W, s);
    stream_rows<T>(
        r0, r1, s.W, s.acc1, s.acc2,
        [&](auto rows, int64_t r, int64_t j, T* p1, T* p2) {
            const V k = load(s.K + j);
            V a1 = V{}, a2 = V{};
            for (int i = 0; i < decltype(rows)::value; ++i) {
                V d = load(s.x + (r + i) * s.W + j) - k;
                a1 += d;
                a2 += d * d;
            }
            store(p1, V(load(p1) + a1));
            store(p2, V(load(p2) + a2));
        },
        [&](int64_t r, int64_t j, double* a1, double* a2) {
            double d = static_cast<double>(s.x[r * s.W + j] - s.K[j]);
            *a1 += d;
            *a2 += d * d;
        });
}

// acc1[j] += sum_r dy[r, j], acc2[j] += sum_r dy[r, j]*(x[r, j] - MH[j]).
template <typename T>
struct ColumnGradSums {
    typedef typename Vec<T>::v V;
    const T *dy, *x;
    int64_t W;
    const T* MH;
    double *acc1, *acc2;
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V mh[U], a1[U], a2[U];
        for (int u = 0; u < U; ++u) {
            mh[u] = load(MH + j + u * kLanes);
            a1[u] = V{};
            a2[u] = V{};
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * W + j + u * kLanes;
                V g = load(dy + e);
                a1[u] += g;
                a2[u] += g * (load(x + e) - mh[u]);
            }
        for (int u = 0; u < U; ++u) {
            double* p1 = acc1 + j + u * kLanes;
            double* p2 = acc2 + j + u * kLanes;
            store(p1, vd(load(p1) + to_double<T>(a1[u])));
            store(p2, vd(load(p2) + to_double<T>(a2[u])));
        }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            acc1[j] += static_cast<double>(dy[e]);
            acc2[j] += static_cast<double>(dy[e] * (x[e] - MH[j]));
        }
    }
};

template <typename T>
void periodic_grad_sums(const ColumnGradSums<T>& s, int64_t r0, int64_t r1) {
    typedef typename Vec<T>::v V;
    if (!wide_rows<T>(s.W)) return for_column_blocks<T>(r0, r1, s.W, s);
    stream_rows<T>(
        r0, r1, s.W, s.acc1, s.acc2,
        [&](auto rows, int64_t r, int64_t j, T* p1, T* p2) {
            const V mh = load(s.MH + j);
            V a1 = V{}, a2 = V{};
            for (int i = 0; i < decltype(rows)::value; ++i) {
                const int64_t e = (r + i) * s.W + j;
                V g = load(s.dy + e);
                a1 += g;
                a2 += g * (load(s.x + e) - mh);
            }
            store(p1, V(load(p1) + a1));
            store(p2, V(load(p2) + a2));
        },
        [&](int64_t r, int64_t j, double* a1, double* a2) {
            const int64_t e = r * s.W + j;
            *a1 += static_cast<double>(s.dy[e]);
            *a2 += static_cast<double>(s.dy[e] * (s.x[e] - s.MH[j]));
        });
}

// Affine coefficients per column, and y = (x - mh)*s + b over rows.
template <typename T>
struct ColumnNormalize {
    typedef typename Vec<T>::v V;
    std::vector<T> mh, s, b;
    const T* x;
    T* y;
    int64_t W;
    bool stream;
    ColumnNormalize(const std::vector<int64_t>& chan, const std::vector<Affine<T>>& per,
                    const T* x_, T* y_, bool stream_)
        : mh(columns<T>(chan, [&](int64_t c) { return per[c].mh; })),
          s(columns<T>(chan, [&](int64_t c) { return per[c].s; })),
          b(columns<T>(chan, [&](int64_t c) { return per[c].b; })),
          x(x_),
          y(y_),
          W(int64_t(chan.size())),
          stream(stream_) {}
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V vmh[U], vs[U], vb[U];
        for (int u = 0; u < U; ++u) {
            vmh[u] = load(mh.data() + j + u * kLanes);
            vs[u] = load(s.data() + j + u * kLanes);
            vb[u] = load(b.data() + j + u * kLanes);
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * W + j + u * kLanes;
                store_out(y + e, V((load(x + e) - vmh[u]) * vs[u] + vb[u]), stream);
            }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            y[e] = (x[e] - mh[j]) * s[j] + b[j];
        }
    }
};

// Gradient coefficients per column, and dx = a*dy - k*(x - mh) + c0 over rows.
template <typename T>
struct ColumnGrad {
    typedef typename Vec<T>::v V;
    std::vector<T> mh, a, k, c0;
    const T *dy, *x;
    T* dx;
    int64_t W;
    bool stream;
    ColumnGrad(const std::vector<int64_t>& chan, const std::vector<GradCoef<T>>& per,
               const T* dy_, const T* x_, T* dx_, bool stream_)
        : mh(columns<T>(chan, [&](int64_t c) { return per[c].mh; })),
          a(columns<T>(chan, [&](int64_t c) { return per[c].a; })),
          k(columns<T>(chan, [&](int64_t c) { return per[c].k; })),
          c0(columns<T>(chan, [&](int64_t c) { return per[c].c0; })),
          dy(dy_),
          x(x_),
          dx(dx_),
          W(int64_t(chan.size())),
          stream(stream_) {}
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V vmh[U], va[U], vk[U], vc[U];
        for (int u = 0; u < U; ++u) {
            vmh[u] = load(mh.data() + j + u * kLanes);
            va[u] = load(a.data() + j + u * kLanes);
            vk[u] = load(k.data() + j + u * kLanes);
            vc[u] = load(c0.data() + j + u * kLanes);
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * W + j + u * kLanes;
                V t = load(x + e) - vmh[u];
                store_out(dx + e, V(load(dy + e) * va[u] + (vc[u] - t * vk[u])), stream);
            }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            dx[e] = dy[e] * a[j] + (c0[j] - (x[e] - mh[j]) * k[j]);
        }
    }
};

// ---- forward, batch statistics -------------------------------------------------------

template <typename T>
void forward_train(const T* x, T* y, const T* w, const T* b, const Stats& stats, const Running& run,
                   double eps, const Geometry& g, int threads) {
    const int64_t C = g.C, inner = g.inner, numel = g.numel();
    const double n = static_cast<double>(g.n());
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(T)) > kStreamBytes;
    std::vector<T> K(C);
    for (int64_t c = 0; c < C; ++c) K[c] = shift_of(x, g, c);

    if (g.planes()) {
        std::vector<double> partial;  // (threads, 2, C): element split only
        parallel(team, [&](const int t, const int T_) {
            if (channel_split(g, T_)) {
                int64_t c0, c1;
                split(C, t, T_, 1, &c0, &c1);
                for (int64_t c = c0; c < c1; ++c) {
                    Sums<T> sums;
                    for (int64_t o = 0; o < g.outer; ++o)
                        shifted_sums(x + (o * C + c) * inner, inner, K[c], sums);
                    double s1 = 0, s2 = 0;
                    sums.add_to(&s1, &s2);
                    finish_stats(c, n, K[c], s1, s2, eps, run, stats);
                    const Affine<T> a = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
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
                    finish_stats(c, n, K[c], s1, s2, eps, run, stats);
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
    ColumnNormalize<T>* norm = nullptr;
    parallel(team, [&](const int t, const int T_) {
#pragma omp single
        partial.assign(size_t(T_) * 2 * W, 0.0);
        double* acc = partial.data() + int64_t(t) * 2 * W;
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        periodic_sums(ColumnSums<T>{x, W, KW.data(), acc, acc + W}, r0, r1);
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
                const double d = static_cast<double>(x[e] - K[c]);
                s1[c] += d;
                s2[c] += d * d;
            }
            for (int64_t c = 0; c < C; ++c) {
                finish_stats(c, n, K[c], s1[c], s2[c], eps, run, stats);
                per[c] = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
            }
            norm = new ColumnNormalize<T>(chan, per, x, y, stream);
        }
        for_column_blocks<T>(r0, r1, W, *norm);
    });
    delete norm;
    for (int64_t e = tail; e < numel; ++e) {
        const Affine<T>& a = per[chan[e - tail]];
        y[e] = (x[e] - a.mh) * a.s + a.b;
    }
}

// ---- forward, given statistics (evaluation) ---------------------------------------------

// The statistics (float64) of running buffers of type R.
template <typename R>
void running_stats(const R* rm, const R* rv, int64_t C, double eps, const Stats& stats) {
    for (int64_t c = 0; c < C; ++c) {
        stats.mean[c] = static_cast<double>(rm[c]);
        stats.var[c] = static_cast<double>(rv[c]);
        stats.invstd[c] = 1.0 / std::sqrt(stats.var[c] + eps);
    }
}

template <typename T>
void normalize(const T* x, T* y, const T* w, const T* b, const double* mean, const double* invstd,
               const Geometry& g, int threads) {
    const int64_t C = g.C, numel = g.numel();
    std::vector<Affine<T>> per(C);
    for (int64_t c = 0; c < C; ++c) per[c] = affine_of(mean[c], invstd[c], w, b, c);
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(T)) > kStreamBytes;
    if (g.planes()) {
        parallel(team, [&](const int t, const int T_) {
            int64_t e0, e1;
            split(numel, t, T_, kAlign, &e0, &e1);
            for_plane_pieces(g, e0, e1, [&](int64_t c, int64_t off, int64_t len) {
                normalize_run(x + off, y + off, len, per[c], stream);
            });
        });
        return;
    }
    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const std::vector<int64_t> chan = column_channels(g, W);
    const ColumnNormalize<T> norm(chan, per, x, y, stream);
    parallel(team, [&](const int t, const int T_) {
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        for_column_blocks<T>(r0, r1, W, norm);
    });
    for (int64_t e = tail; e < numel; ++e) {
        const Affine<T>& a = per[chan[e - tail]];
        y[e] = (x[e] - a.mh) * a.s + a.b;
    }
}

// ---- backward ------------------------------------------------------------------------------

template <typename T>
void backward(const T* dy, const T* x, T* dx, const T* w, const double* mean, const double* invstd,
              T* dw, T* db, bool batch_stats, const Geometry& g, int threads) {
    const int64_t C = g.C, inner = g.inner, numel = g.numel();
    const double n = static_cast<double>(g.n());
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(T)) > kStreamBytes;
    // mh first (the sums need it); the rest once the sums are known. The sums
    // give sum dy*(x - mh); sum dy*(x - mean) is that minus ml*sum dy.
    std::vector<GradCoef<T>> coef(C);
    for (int64_t c = 0; c < C; ++c) coef[c] = grad_coef(mean[c], invstd[c], w, c, 0, 0, n, false);
    auto finish = [&](int64_t c, double sdy, double sdyx_mh) {
        const double sdyx = sdyx_mh - (mean[c] - double(coef[c].mh)) * sdy;
        const double dgamma = sdyx * invstd[c];
        db[c] = static_cast<T>(sdy);
        dw[c] = static_cast<T>(dgamma);
        coef[c] = grad_coef(mean[c], invstd[c], w, c, sdy, dgamma, n, batch_stats);
    };

    if (g.planes()) {
        std::vector<double> partial;
        parallel(team, [&](const int t, const int T_) {
            if (channel_split(g, T_)) {
                int64_t c0, c1;
                split(C, t, T_, 1, &c0, &c1);
                for (int64_t c = c0; c < c1; ++c) {
                    Sums<T> sums;
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        grad_sums(dy + off, x + off, inner, coef[c].mh, sums);
                    }
                    double sdy = 0, sdyx = 0;
                    sums.add_to(&sdy, &sdyx);
                    finish(c, sdy, sdyx);
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
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
    ColumnGrad<T>* grad = nullptr;
    parallel(team, [&](const int t, const int T_) {
#pragma omp single
        partial.assign(size_t(T_) * 2 * W, 0.0);
        double* acc = partial.data() + int64_t(t) * 2 * W;
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        periodic_grad_sums(ColumnGradSums<T>{dy, x, W, MH.data(), acc, acc + W}, r0, r1);
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
                sdy[c] += static_cast<double>(dy[e]);
                sdyx[c] += static_cast<double>(dy[e] * (x[e] - coef[c].mh));
            }
            for (int64_t c = 0; c < C; ++c) finish(c, sdy[c], sdyx[c]);
            grad = new ColumnGrad<T>(chan, coef, dy, x, dx, stream);
        }
        for_column_blocks<T>(r0, r1, W, *grad);
    });
    delete grad;
    for (int64_t e = tail; e < numel; ++e) {
        const GradCoef<T>& q = coef[chan[e - tail]];
        dx[e] = dy[e] * q.a + (q.c0 - (x[e] - q.mh) * q.k);
    }
}

// ---- fused ReLU + 2x2 max pooling (stride 2, floor) -----------------------------------
//
// y = max of relu over each 2x2 window = relu(max of the window): the numbers
// of ReLU followed by MaxPool2d(2), in one pass instead of two (ReLU, then the
// pool). The forward stores no indices: the backward finds each window's
// winner again from x and y, as torch's pool picks it (a later value wins
// only if greater, or NaN): where y > 0, the first position holding y; where
// y is NaN, the last NaN; where y is 0 (the maximum is <= 0), none, since ReLU
// passes no gradient. Storing a uint8 index per output made the forward's
// loops mix float and byte lanes, which compilers vectorize only for rows far
// longer than LeNet-5's; the float-only forward runs 3-4x faster, and the
// backward pays one extra read of x. Backward writes every dx value once: dy
// at the winner, 0 elsewhere, also in rows or columns past the last window.
//
// Layouts: NCHW walks planes of one channel; channels_last (memory N, H, W, C)
// walks rows of windows with the channels innermost. Both take the vertical
// maximum of a row pair first (one long contiguous loop), then the horizontal.

// Branch-free by construction: the winner is data-dependent, so jumps would
// mispredict about half the time (measured 2-5x slower on random data), and
// compilers turn plain ?: on floats back into jumps. pick() selects bits.
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

template <typename T>
inline T pick(bool take, T yes, T no) {
    typedef typename Bits<T>::u U;
    U a, b;
    std::memcpy(&a, &yes, sizeof(T));
    std::memcpy(&b, &no, sizeof(T));
    const U mask = U(0) - U(take);
    const U r = (a & mask) | (b & ~mask);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}

// The pool's running maximum: v replaces m if greater, or NaN.
template <typename T>
inline T pool_max(T m, T v) {
    return pick((v > m) | (v != v), v, m);
}

// ReLU of a window maximum: 0 where it is <= 0; NaN passes.
template <typename T>
inline T relu_of(T m) {
    return pick(m <= T(0), T(0), m);
}

struct PoolShape {
    int64_t N, C, H, W;
    int64_t Ho() const { return H / 2; }
    int64_t Wo() const { return W / 2; }
};

constexpr int64_t kPoolChunk = 1024;  // values of a row pair's vertical maximum kept on the stack

// f(std::integral_constant<int, lane>) for NCHW rows (lane 1) and the small
// channel counts of channels_last rows, f(std::integral_constant<int, 0>)
// (lane known at run time) otherwise. With the lane fixed, a pixel's channels
// compile to vector operations; with it unknown they stay scalar: LeNet-5's
// 6-channel pool backward ran 4x slower, and its NCHW backward 2x slower.
template <typename F>
inline void with_lane(int64_t lane, F f) {
    switch (lane) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        case 8: f(std::integral_constant<int, 8>{}); break;
        default: f(std::integral_constant<int, 0>{});
    }
}

// One row of windows: top and bottom input rows hold Wo windows of `lane`
// adjacent values each side by side (lane = 1 for NCHW, C for channels_last),
// and y gets Wo * lane outputs. Order within a window: top-left, top-right,
// bottom-left, bottom-right; the vertical maximum first is the same value
// (max is order-free, and any NaN makes the result NaN either way).
template <typename T, int FixedLane = 0>
void pool_row(const T* __restrict top, const T* __restrict bottom, T* __restrict y, int64_t Wo,
              int64_t runtime_lane) {
    const int64_t lane = FixedLane ? FixedLane : runtime_lane;
    T v[kPoolChunk];
    const int64_t per_chunk = kPoolChunk / (2 * lane) > 0 ? kPoolChunk / (2 * lane) : 1;
    for (int64_t j0 = 0; j0 < Wo; j0 += per_chunk) {
        const int64_t j1 = min64(j0 + per_chunk, Wo);
        if (2 * lane > kPoolChunk) {  // very wide channels: window by window
            for (int64_t j = j0; j < j1; ++j) {
                const T* p = top + 2 * j * lane;
                const T* q = bottom + 2 * j * lane;
                for (int64_t c = 0; c < lane; ++c)
                    y[j * lane + c] = relu_of(pool_max(pool_max(pool_max(p[c], p[lane + c]), q[c]),
                                                       q[lane + c]));
            }
            continue;
        }
        const int n = int(2 * (j1 - j0) * lane), l = int(lane);
        const T* __restrict p = top + 2 * j0 * lane;
        const T* __restrict q = bottom + 2 * j0 * lane;
        for (int e = 0; e < n; ++e) v[e] = pool_max(p[e], q[e]);
        T* __restrict out = y + j0 * lane;
        const int windows = int(j1 - j0);
        if (l == 1) {
            for (int j = 0; j < windows; ++j) out[j] = relu_of(pool_max(v[2 * j], v[2 * j + 1]));
        } else {
            for (int j = 0; j < windows; ++j)
                for (int c = 0; c < l; ++c)
                    out[j * l + c] = relu_of(pool_max(v[2 * j * l + c], v[(2 * j + 1) * l + c]));
        }
    }
}

// NCHW with an even width: `rows` rows of windows of one plane at once. The
// vertical maxima of all their row pairs lie side by side in v, so the
// horizontal pass is one long loop however short the rows (LeNet-5's 10-wide
// rows: 126 -> 40 us on (64, 16, 10, 10)).
template <typename T>
void pool_rows_nchw(const T* __restrict x, T* __restrict y, int64_t rows, int64_t W) {
    T v[kPoolChunk];
    for (int64_t i = 0; i < rows; ++i) {
        const T* __restrict p = x + 2 * i * W;
        const T* __restrict q = p + W;
        T* __restrict vi = v + i * W;
        for (int64_t k = 0; k < W; ++k) vi[k] = pool_max(p[k], q[k]);
    }
    const int64_t outs = rows * W / 2;
    for (int64_t o = 0; o < outs; ++o) y[o] = relu_of(pool_max(v[2 * o], v[2 * o + 1]));
}

template <typename T>
void relu_maxpool_forward(const T* x, T* y, const PoolShape& s, bool channels_last, int threads) {
    const int64_t Ho = s.Ho(), Wo = s.Wo(), H = s.H, W = s.W, C = s.C;
    if (!channels_last && W % 2 == 0 && W <= kPoolChunk) {
        const int64_t group = kPoolChunk / W;  // rows of windows per call
        parallel(team_size(s.N * C * H * W, threads), [&](int t, int T_) {
            int64_t begin, end;
            split(s.N * C, t, T_, 1, &begin, &end);
            for (int64_t plane = begin; plane < end; ++plane)
                for (int64_t i = 0; i < Ho; i += group)
                    pool_rows_nchw(x + (plane * H + 2 * i) * W, y + (plane * Ho + i) * Wo,
                                   min64(group, Ho - i), W);
        });
        return;
    }
    const int64_t rows = channels_last ? s.N * Ho : s.N * C * Ho;  // rows of windows
    const int64_t lane = channels_last ? C : 1;
    parallel(team_size(s.N * C * H * W, threads), [&](int t, int T_) {
        int64_t begin, end;
        split(rows, t, T_, 1, &begin, &end);
        with_lane(lane, [&](auto fixed) {
            // r = (n, i) for channels_last, (n, c, i) for NCHW: the same arithmetic,
            // with a "plane" of H rows of W * lane values.
            int64_t plane = begin / Ho, i = begin % Ho;
            for (int64_t r = begin; r < end; ++r) {
                const T* top = x + (plane * H + 2 * i) * W * lane;
                pool_row<T, decltype(fixed)::value>(top, top + W * lane, y + r * Wo * lane, Wo,
                                                    lane);
                if (++i == Ho) i = 0, ++plane;
            }
        });
    });
}

// dx of one window from its four inputs, its output m and the output gradient g.
// The general case, NaN included.
template <typename T>
inline void unpool_window(T a, T b, T c, T d, T m, T g, T* da, T* db, T* dc, T* dd) {
    const bool live = m > T(0);  // the window's maximum passed ReLU
    const bool ea = a == m, eb = b == m, ec = c == m, ed = d == m;  // all false for NaN m
    const bool na = a != a, nb = b != b, nc = c != c, nd = d != d;
    const bool nan = m != m;
    // first position holding m; last NaN
    const bool wa = (live & ea) | (nan & na & !nb & !nc & !nd);
    const bool wb = (live & eb & !ea) | (nan & nb & !nc & !nd);
    const bool wc = (live & ec & !ea & !eb) | (nan & nc & !nd);
    const bool wd = (live & ed & !ea & !eb & !ec) | (nan & nd);
    *da = pick(wa, g, T(0));
    *db = pick(wb, g, T(0));
    *dc = pick(wc, g, T(0));
    *dd = pick(wd, g, T(0));
}

// One row of windows without NaN outputs (so none in its inputs): the gradient
// g (0 where ReLU stopped it) goes to the first position holding m: a chain of
// branch-free selects.
template <typename T, int FixedLane = 0>
void unpool_row(const T* __restrict p, const T* __restrict q, const T* __restrict m,
                const T* __restrict g, T* __restrict dp, T* __restrict dq, int64_t Wo,
                int64_t lane) {
    const int wo = int(Wo), l = FixedLane ? FixedLane : int(lane);
    for (int j = 0; j < wo; ++j)
        for (int c = 0; c < l; ++c) {
            const int o = j * l + c, left = 2 * j * l + c, right = left + l;
            const T mo = m[o];
            T rest = pick(mo > T(0), g[o], T(0));
            const bool ea = p[left] == mo;
            dp[left] = pick(ea, rest, T(0));
            rest = pick(ea, T(0), rest);
            const bool eb = p[right] == mo;
            dp[right] = pick(eb, rest, T(0));
            rest = pick(eb, T(0), rest);
            const bool ec = q[left] == mo;
            dq[left] = pick(ec, rest, T(0));
            dq[right] = pick(ec, T(0), rest);
        }
}

template <typename T>
void relu_maxpool_backward(const T* dy, const T* x, const T* y, T* dx, const PoolShape& s,
                           bool channels_last, int threads) {
    const int64_t Ho = s.Ho(), Wo = s.Wo(), H = s.H, W = s.W, C = s.C;
    const int64_t planes = channels_last ? s.N : s.N * C;
    const int64_t lane = channels_last ? C : 1;
    parallel(team_size(s.N * C * H * W, threads), [&](int t, int T_) {
        int64_t begin, end;
        split(planes, t, T_, 1, &begin, &end);
        const int64_t row = W * lane, outs = Wo * lane;
        for (int64_t r = begin; r < end; ++r) {  // one image (channels_last) or plane (NCHW)
            const T* xs = x + r * H * row;
            T* ds = dx + r * H * row;
            for (int64_t i = 0; i < Ho; ++i) {
                const T* p = xs + 2 * i * row;
                const T* q = p + row;
                T* dp = ds + 2 * i * row;
                T* dq = dp + row;
                const T* m = y + (r * Ho + i) * outs;
                const T* g = dy + (r * Ho + i) * outs;
                bool nan = false;
                for (int64_t o = 0; o < outs; ++o) nan |= m[o] != m[o];
                if (!nan) {
                    with_lane(lane, [&](auto fixed) {
                        unpool_row<T, decltype(fixed)::value>(p, q, m, g, dp, dq, Wo, lane);
                    });
                } else {
                    for (int64_t j = 0; j < Wo; ++j)
                        for (int64_t c = 0; c < lane; ++c) {
                            const int64_t o = j * lane + c, left = 2 * j * lane + c;
                            const int64_t right = left + lane;
                            unpool_window(p[left], p[right], q[left], q[right], m[o], g[o],
                                          dp + left, dp + right, dq + left, dq + right);
                        }
                }
                if (W % 2) {  // the last column belongs to no window
                    for (int64_t c = 0; c < lane; ++c) dp[(W - 1) * lane + c] = dq[(W - 1) * lane + c] = T(0);
                }
            }
            for (int64_t e = 2 * Ho * row; e < H * row; ++e) ds[e] = T(0);  // the last odd row
        }
    });
}

// ---- Python functions ----------------------------------------------------------------------
//
// Arguments are ints (data pointers, sizes, flags; None for an absent tensor)
// and floats. Pointers refer to contiguous memory of the dtype the flags say:
// x, y, dy, dx, weight, bias, dweight, dbias in T (float64 if is_double, else
// float32); running buffers in float64 if running_is_double, else float32;
// mean, var and invstd (in or out) in float64.

bool check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char* name) {
    if (nargs == want) return true;
    PyErr_Format(PyExc_TypeError, "%s expects %zd arguments, got %zd", name, want, nargs);
    return false;
}

inline void* ptr(PyObject* o) { return o == Py_None ? nullptr : PyLong_AsVoidPtr(o); }
inline int64_t i64(PyObject* o) { return PyLong_AsLongLong(o); }
inline double f64(PyObject* o) { return PyFloat_AsDouble(o); }

// Small calls keep the GIL: releasing it costs more than they take.
struct MaybeReleaseGil {
    PyThreadState* state;
    explicit MaybeReleaseGil(int64_t numel)
        : state(numel >= kGrain ? PyEval_SaveThread() : nullptr) {}
    ~MaybeReleaseGil() {
        if (state) PyEval_RestoreThread(state);
    }
};

inline Stats stats_of(PyObject* const* a) {
    return Stats{static_cast<double*>(ptr(a[0])), static_cast<double*>(ptr(a[1])),
                 static_cast<double*>(ptr(a[2]))};
}

// forward_train(x, y, weight, bias, mean, var, invstd, running_mean, running_var,
//               running_is_double, momentum, eps, is_double, outer, C, inner, threads)
// mean, var (biased), invstd: (C,) outputs. The running buffers, when given,
// move by r <- (1 - momentum)*r + momentum*s (unbiased variance).
PyObject* py_forward_train(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 17, "forward_train")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]), *w = ptr(a[2]), *b = ptr(a[3]);
    const Stats stats = stats_of(a + 4);
    const Running run{ptr(a[7]), ptr(a[8]), int(i64(a[9])), f64(a[10])};
    const double eps = f64(a[11]);
    const bool is_double = i64(a[12]) != 0;
    const Geometry g{i64(a[13]), i64(a[14]), i64(a[15])};
    const int threads = int(i64(a[16]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(g.numel());
    if (is_double) {
        advise_huge_pages(y, g.numel() * 8);
        forward_train(static_cast<const double*>(x), static_cast<double*>(y),
                      static_cast<const double*>(w), static_cast<const double*>(b), stats, run,
                      eps, g, threads);
    } else {
        advise_huge_pages(y, g.numel() * 4);
        forward_train(static_cast<const float*>(x), static_cast<float*>(y),
                      static_cast<const float*>(w), static_cast<const float*>(b), stats, run, eps,
                      g, threads);
    }
    Py_RETURN_NONE;
}

template <typename T>
void normalize_call(void* x, void* y, void* w, void* b, const Stats& stats, const Geometry& g,
                    int threads) {
    advise_huge_pages(y, g.numel() * int64_t(sizeof(T)));
    normalize(static_cast<const T*>(x), static_cast<T*>(y), static_cast<const T*>(w),
              static_cast<const T*>(b), stats.mean, stats.invstd, g, threads);
}

// forward_eval(x, y, weight, bias, mean, var, invstd, running_mean, running_var,
//              running_is_double, eps, is_double, outer, C, inner, threads)
// Normalizes with the running statistics; mean, var, invstd: (C,) outputs, or
// all three None.
PyObject* py_forward_eval(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 16, "forward_eval")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]), *w = ptr(a[2]), *b = ptr(a[3]);
    Stats stats = stats_of(a + 4);
    void *rm = ptr(a[7]), *rv = ptr(a[8]);
    const bool running_is_double = i64(a[9]) != 0;
    const double eps = f64(a[10]);
    const bool is_double = i64(a[11]) != 0;
    const Geometry g{i64(a[12]), i64(a[13]), i64(a[14])};
    const int threads = int(i64(a[15]));
    if (PyErr_Occurred()) return nullptr;
    std::vector<double> scratch;  // the statistics, when the caller does not want them
    if (!stats.mean) {
        scratch.resize(size_t(3 * g.C));
        stats = Stats{scratch.data(), scratch.data() + g.C, scratch.data() + 2 * g.C};
    }
    MaybeReleaseGil gil(g.numel());
    if (running_is_double)
        running_stats(static_cast<const double*>(rm), static_cast<const double*>(rv), g.C, eps,
                      stats);
    else
        running_stats(static_cast<const float*>(rm), static_cast<const float*>(rv), g.C, eps,
                      stats);
    if (is_double)
        normalize_call<double>(x, y, w, b, stats, g, threads);
    else
        normalize_call<float>(x, y, w, b, stats, g, threads);
    Py_RETURN_NONE;
}

// normalize(x, y, weight, bias, mean, invstd, is_double, outer, C, inner, threads)
PyObject* py_normalize(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 11, "normalize")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]), *w = ptr(a[2]), *b = ptr(a[3]);
    const double* mean = static_cast<const double*>(ptr(a[4]));
    const double* invstd = static_cast<const double*>(ptr(a[5]));
    const bool is_double = i64(a[6]) != 0;
    const Geometry g{i64(a[7]), i64(a[8]), i64(a[9])};
    const int threads = int(i64(a[10]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(g.numel());
    if (is_double) {
        advise_huge_pages(y, g.numel() * 8);
        normalize(static_cast<const double*>(x), static_cast<double*>(y),
                  static_cast<const double*>(w), static_cast<const double*>(b), mean, invstd, g,
                  threads);
    } else {
        advise_huge_pages(y, g.numel() * 4);
        normalize(static_cast<const float*>(x), static_cast<float*>(y),
                  static_cast<const float*>(w), static_cast<const float*>(b), mean, invstd, g,
                  threads);
    }
    Py_RETURN_NONE;
}

// backward(dy, x, dx, weight, mean, invstd, dweight, dbias, batch_stats, is_double, outer, C,
//          inner, threads)
PyObject* py_backward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 14, "backward")) return nullptr;
    void *dy = ptr(a[0]), *x = ptr(a[1]), *dx = ptr(a[2]), *w = ptr(a[3]);
    const double* mean = static_cast<const double*>(ptr(a[4]));
    const double* invstd = static_cast<const double*>(ptr(a[5]));
    void *dw = ptr(a[6]), *db = ptr(a[7]);
    const bool batch_stats = i64(a[8]) != 0;
    const bool is_double = i64(a[9]) != 0;
    const Geometry g{i64(a[10]), i64(a[11]), i64(a[12])};
    const int threads = int(i64(a[13]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(g.numel());
    if (is_double) {
        advise_huge_pages(dx, g.numel() * 8);
        backward(static_cast<const double*>(dy), static_cast<const double*>(x),
                 static_cast<double*>(dx), static_cast<const double*>(w), mean, invstd,
                 static_cast<double*>(dw), static_cast<double*>(db), batch_stats, g, threads);
    } else {
        advise_huge_pages(dx, g.numel() * 4);
        backward(static_cast<const float*>(dy), static_cast<const float*>(x),
                 static_cast<float*>(dx), static_cast<const float*>(w), mean, invstd,
                 static_cast<float*>(dw), static_cast<float*>(db), batch_stats, g, threads);
    }
    Py_RETURN_NONE;
}

// relu_maxpool_forward(x, y, is_double, N, C, H, W, channels_last, threads)
PyObject* py_relu_maxpool_forward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 9, "relu_maxpool_forward")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]);
    const bool is_double = i64(a[2]) != 0;
    const PoolShape s{i64(a[3]), i64(a[4]), i64(a[5]), i64(a[6])};
    const bool channels_last = i64(a[7]) != 0;
    const int threads = int(i64(a[8]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(s.N * s.C * s.H * s.W);
    if (is_double)
        relu_maxpool_forward(static_cast<const double*>(x), static_cast<double*>(y), s,
                             channels_last, threads);
    else
        relu_maxpool_forward(static_cast<const float*>(x), static_cast<float*>(y), s,
                             channels_last, threads);
    Py_RETURN_NONE;
}

// relu_maxpool_backward(dy, x, y, dx, is_double, N, C, H, W, channels_last, threads)
PyObject* py_relu_maxpool_backward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 11, "relu_maxpool_backward")) return nullptr;
    void *dy = ptr(a[0]), *x = ptr(a[1]), *y = ptr(a[2]), *dx = ptr(a[3]);
    const bool is_double = i64(a[4]) != 0;
    const PoolShape s{i64(a[5]), i64(a[6]), i64(a[7]), i64(a[8])};
    const bool channels_last = i64(a[9]) != 0;
    const int threads = int(i64(a[10]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(s.N * s.C * s.H * s.W);
    if (is_double)
        relu_maxpool_backward(static_cast<const double*>(dy), static_cast<const double*>(x),
                              static_cast<const double*>(y), static_cast<double*>(dx), s,
                              channels_last, threads);
    else
        relu_maxpool_backward(static_cast<const float*>(dy), static_cast<const float*>(x),
                              static_cast<const float*>(y), static_cast<float*>(dx), s,
                              channels_last, threads);
    Py_RETURN_NONE;
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction fastcall() {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

PyMethodDef methods[] = {
    {"forward_train", fastcall<py_forward_train>(), METH_FASTCALL,
     "Batch statistics, running-stat update and normalize, fused."},
    {"forward_eval", fastcall<py_forward_eval>(), METH_FASTCALL,
     "Normalize with running statistics."},
    {"normalize", fastcall<py_normalize>(), METH_FASTCALL, "Normalize with given statistics."},
    {"backward", fastcall<py_backward>(), METH_FASTCALL, "Gradients of x, weight and bias."},
    {"relu_maxpool_forward", fastcall<py_relu_maxpool_forward>(), METH_FASTCALL,
     "ReLU then 2x2 max pooling, fused."},
    {"relu_maxpool_backward", fastcall<py_relu_maxpool_backward>(), METH_FASTCALL,
     "Gradient of the fused ReLU + 2x2 max pooling."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_bnlab_cpu", "bnlab CPU kernels: batch norm, ReLU + pooling, convolution", -1,
                          methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

extern PyMethodDef bnlab_conv_methods[];  // conv_kernels.cpp, linked into the same module

PyMODINIT_FUNC PyInit__bnlab_cpu(void) {
    PyObject* module = PyModule_Create(&module_def);
    if (module && PyModule_AddFunctions(module, bnlab_conv_methods) != 0) Py_CLEAR(module);
    if (module && PyModule_AddIntConstant(module, "STREAM_BYTES", long(kStreamBytes)) != 0)
        Py_CLEAR(module);
    return module;
}
