// Short planes in groups whose values are whole vectors. Part of the batch-norm CPU kernels:
// cpu_kernels.h describes the whole.
//
// Planes shorter than kPlaneMin (wide layers' 7x7 to 4x4 maps) that are not
// whole vectors go G = kLanes/gcd(inner, kLanes) at a time: G planes are
// V = inner*G/kLanes whole vectors, and lane l of a group's vector k lies in
// plane (k*kLanes + l)/inner of the group, the same in every group. So the
// coefficients of a group's G channels fill one vector each, and every vector
// takes its own from those by one lane permutation (vpermps) per coefficient:
// no branch on where planes end, no lane masks, no partial vectors.
//
// Every elementwise pass over such planes goes so: inference's (eval.h), the
// training forward's (forward.h) and the backward's (backward.h); the last two
// take a thread's channels G at a time, and also 10x10 and 14x14 planes from
// 16 images (trains_in_groups: float32's, and 16-bit ones in the forward).
// Against the straddling vectors of eval.h's normalize_range, inference ran
// 1.3-1.9x faster over 16-bit 7x7, 6x6, 5x5 and 4x6 planes and float32 6x6
// and 7x7 in cache; 4x4 planes (G = 1: a group is one vector) ran 0.66-0.76x,
// so planes that are whole vectors never group. Needs a one-instruction
// permutation (AVX-512's or AVX2's vpermps); elsewhere planes never group.

#pragma once

#include "planes.h"

namespace {

#if defined(__AVX512F__)
constexpr bool kPlaneGroups = true;
inline f32v permute(f32v v, i32v lane) {
    return (f32v)_mm512_permutexvar_ps((__m512i)lane, (__m512)v);
}
// a*b + c rounded once (GCC leaves a product and a sum of permuted operands apart).
inline f32v fused(f32v a, f32v b, f32v c) {
    return (f32v)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr bool kPlaneGroups = true;
inline f32v permute(f32v v, i32v lane) {
    return (f32v)_mm256_permutevar8x32_ps((__m256)v, (__m256i)lane);
}
inline f32v fused(f32v a, f32v b, f32v c) {
    return (f32v)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
#else
constexpr bool kPlaneGroups = false;
inline f32v permute(f32v v, i32v lane) {
    f32v r;
    for (int k = 0; k < kLanes; ++k) r[k] = v[lane[k] & (kLanes - 1)];
    return r;
}
inline f32v fused(f32v a, f32v b, f32v c) { return a * b + c; }
#endif

inline int64_t group_planes(const Geometry& g) { return kLanes / gcd(g.inner, kLanes); }

// Whether the elementwise passes over g's planes go in groups.
template <typename S>
bool by_groups(const Geometry& g) {
    const int64_t G = group_planes(g);
    return kPlaneGroups && std::is_same<Compute<S>, float>::value && g.planes() &&
           g.inner < kPlaneMin && G > 1 && g.outer * g.C >= G;
}

// Whether a training pass (the forward, or the backward) takes g's planes in
// groups: where inference does, and also planes of kPlaneMin values or more
// whose groups are fewer than kPlaneMin vectors (10x10, 14x14) from 16 images,
// float32's in both passes and 16-bit ones in the forward. Against a run at a
// time, such float32 planes (16-64 images, 256-2048 channels) trained
// 1.16-1.48x faster forward, 1.06-1.52x backward, at 8 images 0.92-1.08x and
// at 2 images 0.77-0.79x; 16-bit ones 1.12-1.29x forward and 0.94-1.05x
// backward. Inference over them ran 0.73-1.2x, and stays by range.
enum TrainingPass { kForwardPass, kBackwardPass };
template <typename S>
bool trains_in_groups(const Geometry& g, TrainingPass pass) {
    const int64_t G = group_planes(g);
    const bool longer_planes = std::is_same<S, float>::value ||
                               (pass == kForwardPass && std::is_same<Compute<S>, float>::value);
    return by_groups<S>(g) || (kPlaneGroups && longer_planes && g.planes() && G > 1 &&
                               g.inner * G < kLanes * kPlaneMin && g.outer >= 16);
}

// The lanes' planes in each vector of a group of g's planes.
struct PlaneGroup {
    int64_t G, V, values;  // planes, vectors, values
    std::vector<i32v> lanes;
    explicit PlaneGroup(const Geometry& g)
        : G(group_planes(g)), V(g.inner * G / kLanes), values(g.inner * G), lanes(V) {
        for (int64_t k = 0; k < V; ++k)
            for (int l = 0; l < kLanes; ++l) lanes[k][l] = int32_t((k * kLanes + l) / g.inner);
    }
};

// y = (x - mh)*s + b over one group of planes, whose channels' coefficients
// are mh[0..G), s[0..G), b[0..G) (kLanes of each readable). Not centered: mh
// is 0 for every channel, so y = x*s + b, one permutation fewer.
template <typename S, bool centered>
inline void normalize_group(const S* x, S* y, const PlaneGroup& pg, const float* mh,
                            const float* s, const float* b, bool stream) {
    f32v gm{}, gs, gb;
    if (centered) std::memcpy(&gm, mh, sizeof(gm));
    std::memcpy(&gs, s, sizeof(gs));
    std::memcpy(&gb, b, sizeof(gb));
    for (int64_t k = 0; k < pg.V; ++k) {
        const i32v l = pg.lanes[k];
        const f32v v = centered ? ld(x + k * kLanes) - permute(gm, l) : ld(x + k * kLanes);
        store_out(y + k * kLanes, fused(v, permute(gs, l), permute(gb, l)), stream);
    }
}

// The gradient coefficients of a group's G channels (grad_coef's), a vector's
// worth of each.
struct GroupGradCoef {
    float mh[kLanes] = {}, a[kLanes] = {}, k[kLanes] = {}, c0[kLanes] = {};
    void set(int64_t j, const GradCoef<float>& q) {
        mh[j] = q.mh;
        a[j] = q.a;
        k[j] = q.k;
        c0[j] = q.c0;
    }
};

// dx = a*dy + (c0 - (x - mh)*k) over one group of planes with its channels'
// coefficients q.
template <typename S>
inline void grad_group(const S* dy, const S* x, S* dx, const PlaneGroup& pg,
                       const GroupGradCoef& q, bool stream) {
    f32v gm, ga, gk, gc;
    std::memcpy(&gm, q.mh, sizeof(gm));
    std::memcpy(&ga, q.a, sizeof(ga));
    std::memcpy(&gk, q.k, sizeof(gk));
    std::memcpy(&gc, q.c0, sizeof(gc));
    for (int64_t k = 0; k < pg.V; ++k) {
        const i32v l = pg.lanes[k];
        const f32v d = ld(x + k * kLanes) - permute(gm, l);
        const f32v rest = fused(-d, permute(gk, l), permute(gc, l));
        store_out(dx + k * kLanes, fused(ld(dy + k * kLanes), permute(ga, l), rest), stream);
    }
}

// The by-channel passes over channels [c0, c1) of short planes, G channels at
// a time: per_block(c) for each block of G channels from c (their sums and
// coefficients), then group(off) for every image's G planes of the block
// (off: where they start), still in cache from the block's sums. Returns the
// first channel left, fewer than G before c1.
template <typename PerBlock, typename Group>
int64_t in_channel_groups(const PlaneGroup& pg, const Geometry& g, int64_t c0, int64_t c1,
                          PerBlock per_block, Group group) {
    int64_t c = c0;
    for (; c + pg.G <= c1; c += pg.G) {
        per_block(c);
        for (int64_t o = 0; o < g.outer; ++o) group((o * g.C + c) * g.inner);
    }
    return c;
}

}  // namespace
