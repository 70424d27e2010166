// The sums of short planes in groups (plane_groups.h), vector position by vector position.
// Part of the batch-norm CPU kernels: cpu_kernels.h describes the whole.
//
// A run at a time, a 7x7 plane is three vectors and a ragged end, each run
// with its own loop, tail mask and flush: about 20 cycles for 49 values
// whatever the dtype, two thirds of a 16-bit training forward over ResNet's
// 7x7 stage. A group's G planes are instead V whole vectors per image, and
// lane l of vector k always belongs to the same channel of the group. So the
// sums go by vector position: M positions at a time, their accumulators in
// registers, down kBlock images; then each channel's lanes are summed into
// float64. Against a run at a time, over 7x7, 6x6, 5x5 and 4x6 planes in
// float32 and 16 bits, on 1 and 2 threads, in cache and beyond it: training
// forwards ran 1.1-1.57x faster, backwards 1.04-1.43x.

#pragma once

#include "plane_groups.h"

namespace {

// The training forward's terms: t1 = x - K, t2 = (x - K)^2 (K: the shift).
template <typename S>
struct ShiftedTerms {
    const S* x;
    void fetch(int64_t off, int64_t len) const { prefetch_run(x + off, len, false); }
    inline void add(int64_t off, f32v K, f32v& a1, f32v& a2) const {
        const f32v d = ld(x + off) - K;
        a1 += d;
        a2 = fused(d, d, a2);
    }
};

// The backward's terms: t1 = dy, t2 = dy*(x - mh).
template <typename S>
struct GradTerms {
    const S* dy;
    const S* x;
    void fetch(int64_t off, int64_t len) const {
        prefetch_run(dy + off, len, false);
        prefetch_run(x + off, len, false);
    }
    inline void add(int64_t off, f32v mh, f32v& a1, f32v& a2) const {
        a1 += ld(dy + off);
        a2 = fused(ld(dy + off), ld(x + off) - mh, a2);
    }
};

// Sums of the terms at M vector positions from `off` over n images (n <=
// kBlock, `stride` apart), per lane in float, into f1, f2; base: the
// positions' per-lane constant. With `ahead`, every image's next M positions
// are fetched first: the hardware does not follow reads an image apart.
template <int M, typename Terms>
inline void position_sums(const Terms& terms, int64_t off, int64_t stride, int64_t n,
                          const f32v* base, bool ahead, f32v* f1, f32v* f2) {
    f32v a1[M], a2[M];
    for (int j = 0; j < M; ++j) a1[j] = a2[j] = f32v{};
    for (int64_t o = 0; o < n; ++o, off += stride) {
        if (ahead) terms.fetch(off + M * kLanes, M * kLanes);
        for (int j = 0; j < M; ++j) terms.add(off + j * kLanes, base[j], a1[j], a2[j]);
    }
    for (int j = 0; j < M; ++j) {
        f1[j] = a1[j];
        f2[j] = a2[j];
    }
}

// The sums s1[j], s2[j] of the terms over the group of G channels from c
// (j < G), whose per-channel constants are per_channel[0..G) (kLanes
// readable).
template <typename Terms>
void group_sums(const Terms& terms, const PlaneGroup& pg, const Geometry& g, int64_t c,
                const float* per_channel, bool ahead, double* s1, double* s2) {
    typedef int32_t lane_mask __attribute__((vector_size(kLanes * sizeof(int32_t))));
    f32v channel_base;
    std::memcpy(&channel_base, per_channel, sizeof(channel_base));
    f32v base[kPlaneMin], f1[kPlaneMin], f2[kPlaneMin];  // V < kPlaneMin
    for (int64_t k = 0; k < pg.V; ++k) base[k] = permute(channel_base, pg.lanes[k]);
    vd d1[kLanes], d2[kLanes];
    for (int64_t j = 0; j < pg.G; ++j) d1[j] = d2[j] = vd{};
    const int64_t stride = g.C * g.inner;
    for (int64_t o = 0; o < g.outer; o += kBlock) {
        const int64_t n = min64(kBlock, g.outer - o), off = (o * g.C + c) * g.inner;
        int64_t k = 0;
        for (; k + 8 <= pg.V; k += 8)
            position_sums<8>(terms, off + k * kLanes, stride, n, base + k, ahead, f1 + k, f2 + k);
        for (; k + 4 <= pg.V; k += 4)
            position_sums<4>(terms, off + k * kLanes, stride, n, base + k, ahead, f1 + k, f2 + k);
        for (; k < pg.V; ++k)
            position_sums<1>(terms, off + k * kLanes, stride, n, base + k, ahead, f1 + k, f2 + k);
        // Channel j's lanes lie in vectors j*inner/kLanes to ((j+1)*inner - 1)/kLanes.
        for (int64_t j = 0; j < pg.G; ++j) {
            f32v a1{}, a2{};
            for (int64_t v = j * g.inner / kLanes; v <= ((j + 1) * g.inner - 1) / kLanes; ++v) {
                const lane_mask mine = pg.lanes[v] == int32_t(j);
                a1 += mine ? f1[v] : f32v{};
                a2 += mine ? f2[v] : f32v{};
            }
            d1[j] += to_double<float>(a1);
            d2[j] += to_double<float>(a2);
        }
    }
    for (int64_t j = 0; j < pg.G; ++j) {
        s1[j] = hsum(d1[j]);
        s2[j] = hsum(d2[j]);
    }
}

}  // namespace
