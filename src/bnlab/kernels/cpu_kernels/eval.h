// Inference: y from the running statistics, in one pass. Part of the batch-norm CPU
// kernels: cpu_kernels.h describes the whole.

#pragma once

#include "plane_groups.h"
#include "row_elementwise.h"

namespace {

// The statistics (float64) of running buffers of type R. invstd starts from
// float's 1/sqrt (vector square roots and divisions with twice the lanes of
// double's, each cheaper; double's took half of a (32, 4096) float16
// inference, which now runs 1.1x faster in-process) and takes two Newton
// steps in double, y*(1.5 - v/2*y^2): float's relative error e becomes about
// 1.5e^2, then less than double's rounding adds. Where v is outside
// [kGuessLow, kGuessHigh] (0, inf and NaN among them), float's guess may be 0,
// inf or NaN, or v*y^2 overflow, so those channels take double's square root
// and division.
constexpr double kGuessLow = 1e-36, kGuessHigh = 1e36;
template <typename R>
void running_stats(const R* __restrict rm, const R* __restrict rv, int64_t C, double eps,
                   double* __restrict mean, double* __restrict var, double* __restrict invstd) {
    for (int64_t c = 0; c < C; ++c) {
        mean[c] = static_cast<double>(rm[c]);
        var[c] = static_cast<double>(rv[c]);
        const double v = static_cast<double>(rv[c]) + eps, h = 0.5 * v;
        double y = 1.0f / std::sqrt(static_cast<float>(v));
        y = y * (1.5 - h * y * y);
        invstd[c] = y * (1.5 - h * y * y);
    }
    // Three loops, each of which the compiler vectorizes: as one, the range
    // test ran scalar, or every channel took the division too.
    int outside = 0;
    for (int64_t c = 0; c < C; ++c)
        outside |= int(!(var[c] + eps >= kGuessLow)) | int(!(var[c] + eps <= kGuessHigh));
    if (outside)
        for (int64_t c = 0; c < C; ++c) {
            const double v = var[c] + eps;
            if (!(v >= kGuessLow && v <= kGuessHigh)) invstd[c] = 1.0 / std::sqrt(v);
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
//   - for planes shorter than kShortPlane values that do not go in groups
//     (plane_groups.h): there a run's overlapping last vector and the call
//     per run cost more than the straddling vectors (7x7 inference 1.05-1.07x
//     faster, 6x6 1.33x; 10x10 and 14x14 16-bit planes ran 0.87-0.94x);
//   - where a float32 or float64 vector is whole cache lines, runs are not
//     whole vectors, and the tensor is too large for the caches to hold with
//     its output (kStreamBytes): run by run, nearly every vector would then
//     straddle two lines that come from memory (14x14 and 17x17 float32
//     inference 1.12-1.14x faster on one thread; 10x10 in cache ran 0.9x).
constexpr int64_t kShortPlane = 64;

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

// How inference walks a geometry (cpu_kernels.cpp's inference_plan names it).
enum EvalTraversal { kInGroups, kByRange, kRunByRun, kRowsByRow, kRowsByColumn };
const char* const kEvalTraversalNames[] = {"planes in groups", "planes by range",
                                           "planes run by run", "rows by row", "rows by column"};

template <typename S>
EvalTraversal eval_traversal(const Geometry& g, int team) {
    if (g.planes()) {
        // float32 of kStreamBytes or more stays by range: (32, 2048, 7, 7), 12.8 MB,
        // ran 0.84-0.97x in groups on 2 threads.
        const bool large_float32 = sizeof(S) == 4 && g.numel() * int64_t(sizeof(S)) >= kStreamBytes;
        if (by_groups<S>(g) && !large_float32) return kInGroups;
        const bool stream = streams_inference<S>(g);
        return by_range<S>(g, stream) ? kByRange : kRunByRun;
    }
    // Few rows: each thread takes all rows of its columns, as in training.
    // Halving a thread's rows instead leaves it short strided runs, and every
    // thread all the coefficients.
    const int64_t rows = g.numel() / g.width();
    return split_of(g, sizeof(S), team) == kByColumn && rows <= 4 * kBlock ? kRowsByColumn
                                                                           : kRowsByRow;
}

// The groups [q0, q1) of g's planes (group q: planes q*G to q*G + G - 1),
// with the coefficients of channel c at c and, for the groups that wrap past
// C, of channel c - C at c (C <= c < C + kLanes).
template <typename S, bool centered>
void normalize_groups(const S* x, S* y, int64_t q0, int64_t q1, const Geometry& g,
                      const float* mh, const float* s, const float* b, bool stream) {
    const PlaneGroup pg(g);
    int64_t c = q0 * pg.G % g.C;
    for (int64_t q = q0; q < q1; ++q) {
        const int64_t e = q * pg.values;
        normalize_group<S, centered>(x + e, y + e, pg, mh + c, s + c, b + c, stream);
        c += pg.G;
        if (c >= g.C) c -= g.C;
    }
}

template <typename S>
void normalize_in_groups(const S* x, S* y, const float* w, const float* b, const double* mean,
                         const double* invstd, const Geometry& g, int team,
                         const std::vector<Affine<float>>& per, bool stream) {
    const int64_t C = g.C, G = group_planes(g), groups = g.outer * C / G;
    // The coefficients per channel as periodic rows keep them per column,
    // with their choice of form; then the first kLanes channels again.
    ColumnNormalize<S> coef(nullptr, C + kLanes, x, y, stream);
    coef.set_channels(0, C, mean, invstd, w, b);
    for (int64_t j = C; j < C + kLanes; ++j) {
        coef.mh[j] = coef.mh[j % C];
        coef.s[j] = coef.s[j % C];
        coef.b[j] = coef.b[j % C];
    }
    parallel(team, [&](const int t, const int T_) {
        int64_t q0, q1;
        split(groups, t, T_, 1, &q0, &q1);
        const float *m = coef.mh.data(), *s = coef.s.data(), *bb = coef.b.data();
        if (coef.centered)
            normalize_groups<S, true>(x, y, q0, q1, g, m, s, bb, stream);
        else
            normalize_groups<S, false>(x, y, q0, q1, g, m, s, bb, stream);
        // The planes after the last whole group, fewer than G: the last thread's.
        if (t == T_ - 1) normalize_range(x, y, groups * G * g.inner, g.numel(), g, per, stream);
    });
}

// One pass: y = (x - mean)*invstd*gamma + beta. Nothing to reduce, so every
// geometry splits into equal ranges (of elements, groups of planes, rows, or a
// few rows' columns).
template <typename S, typename T = Compute<S>>
void normalize(const S* x, S* y, const T* w, const T* b, const double* mean, const double* invstd,
               const Geometry& g, int threads) {
    const int64_t C = g.C, numel = g.numel();
    const int team = team_size(numel, threads);
    const bool stream = streams_inference<S>(g);
    const EvalTraversal how = eval_traversal<S>(g, team);
    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const bool columns_are_channels = !g.planes() && W == C;  // then no tail either
    std::vector<Affine<T>> per(columns_are_channels ? 0 : C);
    // Uncentered where a channel is near zero: runs of it then skip x - mh.
    for (size_t c = 0; c < per.size(); ++c)
        per[c] = affine_of(mean[c], invstd[c], w, b, c, !near_zero(mean[c], invstd[c]));
    if constexpr (std::is_same<T, float>::value) {
        if (how == kInGroups)
            return normalize_in_groups(x, y, w, b, mean, invstd, g, team, per, stream);
    }
    if (how == kByRange || how == kRunByRun) {
        parallel(team, [&](const int t, const int T_) {
            int64_t e0, e1;
            split(numel, t, T_, kAlign, &e0, &e1);
            if (how == kByRange) return normalize_range(x, y, e0, e1, g, per, stream);
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
    parallel(team, [&](const int t, const int T_) {
        if (how == kRowsByColumn) {
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

}  // namespace
