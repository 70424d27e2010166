// Inference: y from the running statistics, in one pass. Part of the batch-norm CPU
// kernels: cpu_kernels.h describes the whole.

#pragma once

#include "planes.h"
#include "row_elementwise.h"

namespace {

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

// Planes shorter than kShortPlane that are not whole vectors, in groups of
// G = kLanes/gcd(inner, kLanes) planes: a group is V = inner*G/kLanes whole
// vectors, and lane l of its vector k lies in plane (k*kLanes + l)/inner of the
// group, the same in every group. So the G channels' coefficients fill one
// vector each, and every vector takes its own from those by one lane
// permutation (vpermps) per coefficient: no branch on where planes end, no lane
// masks. That ran 1.3-1.9x faster than the straddling vectors (16-bit 7x7, 6x6,
// 5x5 and 4x6 planes; float32 6x6 and 7x7 in cache), where 4x4 planes (G = 1,
// a group a vector) ran 0.66-0.76x. float32 tensors of kStreamBytes or more
// stay by range: (32, 2048, 7, 7) ran 0.84-0.97x in groups on 2 threads.
// Needs a one-instruction permutation (AVX-512); elsewhere the straddling
// vectors serve.
#if defined(__AVX512F__)
constexpr bool kPlaneGroups = true;
inline f32x16 permute(f32x16 v, i32x16 lane) {
    return (f32x16)_mm512_permutexvar_ps((__m512i)lane, (__m512)v);
}
// a*b + c rounded once (GCC leaves a product and a sum of permuted operands apart).
inline f32x16 fused(f32x16 a, f32x16 b, f32x16 c) {
    return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#else
constexpr bool kPlaneGroups = false;
inline f32x16 permute(f32x16 v, i32x16 lane) {
    f32x16 r;
    for (int k = 0; k < kLanes; ++k) r[k] = v[lane[k] & (kLanes - 1)];
    return r;
}
inline f32x16 fused(f32x16 a, f32x16 b, f32x16 c) { return a * b + c; }
#endif

inline int64_t group_planes(const Geometry& g) { return kLanes / gcd(g.inner, kLanes); }

template <typename S>
bool by_groups(const Geometry& g) {
    const int64_t G = group_planes(g);
    const bool large_float32 = sizeof(S) == 4 && g.numel() * int64_t(sizeof(S)) >= kStreamBytes;
    return kPlaneGroups && std::is_same<Compute<S>, float>::value && g.planes() &&
           g.inner < kShortPlane && G > 1 && g.outer * g.C >= G && !large_float32;
}

// How inference walks a geometry (cpu_kernels.cpp's inference_plan names it).
enum EvalTraversal { kInGroups, kByRange, kRunByRun, kRowsByRow, kRowsByColumn };
const char* const kEvalTraversalNames[] = {"planes in groups", "planes by range",
                                           "planes run by run", "rows by row", "rows by column"};

template <typename S>
EvalTraversal eval_traversal(const Geometry& g, int team) {
    if (g.planes()) {
        if (by_groups<S>(g)) return kInGroups;
        const bool stream = g.numel() * int64_t(sizeof(S)) >= stream_eval_bytes(g);
        return by_range<S>(g, stream) ? kByRange : kRunByRun;
    }
    // Few rows: each thread takes all rows of its columns, as in training.
    // Halving a thread's rows instead leaves it short strided runs, and every
    // thread all the coefficients.
    const int64_t rows = g.numel() / g.width();
    return split_of(g, sizeof(S), team) == kByColumn && rows <= 4 * kBlock ? kRowsByColumn
                                                                           : kRowsByRow;
}

// The groups [q0, q1) (group q: planes q*G to q*G + G - 1) with the
// coefficients of channel c at c and, for the groups that wrap past C, of
// channel c - C at c (C <= c < C + kLanes). Centered: y = (x - mh)*s + b;
// else mh is 0 for every channel and y = x*s + b, one permutation fewer (see
// ColumnNormalize::set_channels).
template <typename S, bool centered>
void normalize_groups(const S* x, S* y, int64_t q0, int64_t q1, const Geometry& g,
                      const float* mh, const float* s, const float* b, bool stream) {
    const int64_t G = group_planes(g), V = g.inner * G / kLanes;
    std::vector<i32x16> lanes(V);
    for (int64_t k = 0; k < V; ++k)
        for (int l = 0; l < kLanes; ++l) lanes[k][l] = int32_t((k * kLanes + l) / g.inner);
    int64_t c = q0 * G % g.C;
    for (int64_t q = q0; q < q1; ++q) {
        f32x16 gm{}, gs, gb;  // the group's channels c to c + G - 1, lane by lane
        if (centered) std::memcpy(&gm, mh + c, sizeof(gm));
        std::memcpy(&gs, s + c, sizeof(gs));
        std::memcpy(&gb, b + c, sizeof(gb));
        const S* xq = x + q * G * g.inner;
        S* yq = y + q * G * g.inner;
        for (int64_t k = 0; k < V; ++k) {
            const i32x16 l = lanes[k];
            const f32x16 v = centered ? ld(xq + k * kLanes) - permute(gm, l) : ld(xq + k * kLanes);
            store_out(yq + k * kLanes, fused(v, permute(gs, l), permute(gb, l)), stream);
        }
        c += G;
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
    const bool stream = numel * int64_t(sizeof(S)) >= stream_eval_bytes(g);
    const EvalTraversal how = eval_traversal<S>(g, team);
    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const bool columns_are_channels = !g.planes() && W == C;  // then no tail either
    std::vector<Affine<T>> per(columns_are_channels ? 0 : C);
    for (size_t c = 0; c < per.size(); ++c) per[c] = affine_of(mean[c], invstd[c], w, b, c);
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
