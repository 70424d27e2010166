// Per-channel arithmetic: the shifts, the affine and gradient coefficients, the batch and
// running statistics, and the sums the passes build. Part of the batch-norm CPU kernels:
// cpu_kernels.h describes the whole.

#pragma once

#include "geometry.h"

namespace {

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
// is as accurate: near_zero).
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

// Whether a channel's |mean|*invstd is at most 1, where the uncentered form
// y = x*s + (beta - mean*s) is as accurate as the centered one (false for NaN).
inline bool near_zero(double mean, double invstd) { return std::fabs(mean * invstd) <= 1.0; }

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

// Lanes [kLanes - rem, kLanes) one, the others zero: the new part of a run's
// last, overlapping vector.
template <typename T>
struct TailOnes {
    alignas(64) T values[2 * kLanes];
    constexpr TailOnes() : values{} {
        for (int k = kLanes; k < 2 * kLanes; ++k) values[k] = 1;
    }
};
template <typename T>
inline typename Elem<T>::V tail_ones(int64_t rem) {
    static constexpr TailOnes<T> table;
    return Elem<T>::load(table.values + rem);
}

}  // namespace
