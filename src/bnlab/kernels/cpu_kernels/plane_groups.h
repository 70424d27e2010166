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
// Inference (eval.h) and the training forward (forward.h) normalize so. Against
// the straddling vectors of eval.h's normalize_range, inference ran 1.3-1.9x
// faster over 16-bit 7x7, 6x6, 5x5 and 4x6 planes and float32 6x6 and 7x7 in
// cache; 4x4 planes (G = 1: a group is one vector) ran 0.66-0.76x, so planes
// that are whole vectors never group. Needs a one-instruction permutation
// (AVX-512); elsewhere planes never group.

#pragma once

#include "planes.h"

namespace {

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

// Whether the elementwise passes over g's planes go in groups.
template <typename S>
bool by_groups(const Geometry& g) {
    const int64_t G = group_planes(g);
    return kPlaneGroups && std::is_same<Compute<S>, float>::value && g.planes() &&
           g.inner < kPlaneMin && G > 1 && g.outer * g.C >= G;
}

// The lanes' planes in each vector of a group of g's planes.
struct PlaneGroup {
    int64_t G, V, values;  // planes, vectors, values
    std::vector<i32x16> lanes;
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
    f32x16 gm{}, gs, gb;
    if (centered) std::memcpy(&gm, mh, sizeof(gm));
    std::memcpy(&gs, s, sizeof(gs));
    std::memcpy(&gb, b, sizeof(gb));
    for (int64_t k = 0; k < pg.V; ++k) {
        const i32x16 l = pg.lanes[k];
        const f32x16 v = centered ? ld(x + k * kLanes) - permute(gm, l) : ld(x + k * kLanes);
        store_out(y + k * kLanes, fused(v, permute(gs, l), permute(gb, l)), stream);
    }
}

}  // namespace
