// Storage types of the batch-norm kernels and their conversions to the type
// they compute in: float and double compute in themselves; bfloat16 and
// float16 are stored as 16 bits and computed in float (torch's rule for
// reduced-precision batch norm: float accumulation, output in the input's
// dtype).
//
// Elem<S> is the one place that knows a storage type:
//   T           the compute type
//   load(p)     16 values at p, widened to a vector of T
//   store(p,v)  16 values narrowed to S and written (around the caches if asked)
//   up(s), down(t)  the same for one value
// and Pair<S> (below) loads and stores 32 values at a time, in an order of
// lanes of its own where that is faster (bfloat16 on AVX512-BF16).
//
// Narrowing rounds to nearest even, as torch's conversions do. Vector
// conversions use the CPU's instructions where the compiler targets them
// (AVX512-BF16's vcvtneps2bf16, F16C's vcvtph2ps/vcvtps2ph) and bit
// arithmetic otherwise. (vcvtneps2bf16 treats subnormal inputs as zero; a
// batch-norm output below 1e-38 in magnitude is that close to zero anyway.)

#pragma once

#include "bnlab_native.h"

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct bf16 {
    uint16_t bits;
};
struct f16 {
    uint16_t bits;
};

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x16 __attribute__((vector_size(128)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// Writes `bytes` (a multiple of 32) from `from` to p; around the caches when
// asked and p is 32-byte aligned.
inline void store_bytes(void* p, const void* from, size_t bytes, bool stream) {
#if defined(__AVX__)
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
        for (size_t k = 0; k < bytes; k += 32) {
            __m256i v;
            std::memcpy(&v, static_cast<const char*>(from) + k, 32);
            _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(p) + k), v);
        }
        return;
    }
#else
    (void)stream;
#endif
    std::memcpy(p, from, bytes);
}

// ---- scalar conversions ----------------------------------------------------------------

inline float bf16_to_float(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays a (quiet) NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7fffu;
    uint32_t u;
    if (em >= 0x7c00u) {
        u = 0x7f800000u | ((em & 0x3ffu) << 13);  // infinity, NaN
    } else if (em >= 0x400u) {
        u = (em << 13) + 0x38000000u;  // normal: exponent bias 15 -> 127
    } else {
        const float f = float(em) * 5.9604644775390625e-8f;  // subnormal: em * 2^-24
        std::memcpy(&u, &f, 4);
    }
    u |= sign;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;       // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;      // rounds to infinity (|f| >= 65520)
    if (a < 0x38800000u) {                           // below 2^-14: a subnormal half
        // f + 0.5 has an ulp of 2^-24, the subnormal step: the addition rounds
        // to nearest even for us, and the low bits are the half's.
        float af;
        std::memcpy(&af, &a, 4);
        const float r = af + 0.5f;
        uint32_t ru;
        std::memcpy(&ru, &r, 4);
        return sign | uint16_t(ru - 0x3f000000u);
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);  // exponent bias 127 -> 15, round to nearest even
    return sign | uint16_t(a >> 13);
#endif
}

// ---- vector conversions (16 lanes) -------------------------------------------------------

inline f32x16 bf16x16_to_float(u16x16 h) {
#if defined(__AVX512F__)
    // One vpmovzxwd over the whole vector: GCC lowers the generic form below
    // as two half-width widenings and an insert, a third slower end to end.
    return (f32x16)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#else
    const u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    return (f32x16)u;
#endif
}

inline u16x16 float_to_bf16x16(f32x16 v) {
#if defined(__AVX512BF16__)
    const __m256bh r = _mm512_cvtneps_pbh((__m512)v);
    u16x16 out;
    std::memcpy(&out, &r, 32);
    return out;
#else
    const u32x16 u = (u32x16)v;
    u32x16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const i32x16 nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
    r = (r & ~u32x16(nan)) | (u32x16(nan) & 0x7fc0u);
    return __builtin_convertvector(r, u16x16);
#endif
}

inline f32x16 half16_to_float(u16x16 h) {
#if defined(__AVX512F__)
    const __m512 r = _mm512_cvtph_ps((__m256i)h);
    return (f32x16)r;
#elif defined(__F16C__)
    const __m256i w = (__m256i)h;
    const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(w));
    const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(w, 1));
    f32x16 out;
    std::memcpy(&out, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
    return out;
#else
    f32x16 out;
    for (int k = 0; k < 16; ++k) out[k] = half_to_float(h[k]);
    return out;
#endif
}

inline u16x16 float_to_half16(f32x16 v) {
#if defined(__AVX512F__)
    const __m256i r = _mm512_cvtps_ph((__m512)v,
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (u16x16)r;
#elif defined(__F16C__)
    __m256 lo, hi;
    std::memcpy(&lo, &v, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    const __m128i a = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
    const __m128i b = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT);
    u16x16 out;
    std::memcpy(&out, &a, 16);
    std::memcpy(reinterpret_cast<char*>(&out) + 16, &b, 16);
    return out;
#else
    u16x16 out;
    for (int k = 0; k < 16; ++k) out[k] = float_to_half(v[k]);
    return out;
#endif
}

// ---- the storage types ----------------------------------------------------------------------

template <typename S>
struct Elem;

#if defined(__AVX512F__)
// A float vector is one register: stored with one instruction. Through
// store_bytes (its address taken for memcpy) GCC spilled it to the stack
// first, a store and a reload more per vector.
inline void store_f32x16(float* p, f32x16 v, bool stream) {
    const __m512 m = (__m512)v;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (stream && (a & 63) == 0) {
        _mm512_stream_ps(p, m);
    } else if (stream && (a & 31) == 0) {
        const __m512d d = _mm512_castps_pd(m);
        _mm256_stream_pd(reinterpret_cast<double*>(p), _mm512_castpd512_pd256(d));
        _mm256_stream_pd(reinterpret_cast<double*>(p + 8), _mm512_extractf64x4_pd(d, 1));
    } else {
        _mm512_storeu_ps(p, m);
    }
}
#endif

// float and double: stored as computed.
template <typename S>
struct Native {
    typedef S T;
    typedef S V __attribute__((vector_size(16 * sizeof(S))));
    static V load(const S* p) {
        V v;
        std::memcpy(&v, p, sizeof(V));
        return v;
    }
    static void store(S* p, V v, bool stream) { store_bytes(p, &v, sizeof(V), stream); }
    static S up(S s) { return s; }
    static S down(S t) { return t; }
};
template <>
struct Elem<float> : Native<float> {
#if defined(__AVX512F__)
    static void store(float* p, V v, bool stream) { store_f32x16(p, v, stream); }
#endif
};
template <>
struct Elem<double> : Native<double> {};

// bfloat16 and float16: 16 bits, computed in float.
template <typename S, f32x16 (*Widen)(u16x16), u16x16 (*Narrow)(f32x16), float (*Up)(uint16_t),
          uint16_t (*Down)(float)>
struct Half {
    typedef float T;
    typedef f32x16 V;
    static V load(const S* p) {
        u16x16 h;
        std::memcpy(&h, p, 32);
        return Widen(h);
    }
    static void store(S* p, V v, bool stream) {
        const u16x16 h = Narrow(v);
        store_bytes(p, &h, 32, stream);
    }
    static float up(S s) { return Up(s.bits); }
    static S down(float t) { return S{Down(t)}; }
};
template <>
struct Elem<bf16> : Half<bf16, bf16x16_to_float, float_to_bf16x16, bf16_to_float, float_to_bf16> {};
template <>
struct Elem<f16> : Half<f16, half16_to_float, float_to_half16, half_to_float, float_to_half> {};

// Pair<S>: the 32 values at p as two vectors, load(p, a, b), and back,
// store(p, a, b, stream), in an order of lanes that may differ from memory's
// where a type widens and narrows faster so. The order is the same for every
// pointer and store undoes it, so an elementwise pass or a sum over pairs need
// not know it; `reordered` says whether there is one.
template <typename S>
struct Pair {  // one vector, then the next
    typedef typename Elem<S>::V V;
    static constexpr bool reordered = false;
    static void load(const S* p, V& a, V& b) {
        a = Elem<S>::load(p);
        b = Elem<S>::load(p + 16);
    }
    static void store(S* p, V a, V b, bool stream) {
        Elem<S>::store(p, a, stream);
        Elem<S>::store(p + 16, b, stream);
    }
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bfloat16 widens without crossing 128-bit lanes: interleaving zeros below
// each value (vpunpck[lh]wd) puts values 8l..8l+3 of each 128-bit lane l in a
// and 8l+4..8l+7 in b. store narrows both in one vcvtne2ps2bf16 and puts the
// values back in place with one vpermw. The batch-norm kernels take pairs
// over planes; in-process against one vector at a time, bfloat16 training
// steps over 28x28 to 112x112 planes ran 1.10-1.22x faster (1 and 2
// threads), 10x10 and 14x14 inference 1.13-1.24x, and the backward over 7x7
// and 10x10 planes 0.93-0.98x.
template <>
struct Pair<bf16> {
    typedef f32x16 V;
    static constexpr bool reordered = true;
    static void load(const bf16* p, V& a, V& b) {
        const __m512i v = _mm512_loadu_si512(p);
        a = (V)_mm512_unpacklo_epi16(_mm512_setzero_si512(), v);
        b = (V)_mm512_unpackhi_epi16(_mm512_setzero_si512(), v);
    }
    static void store(bf16* p, V a, V b, bool stream) {
        // kPlace[j]: the word of vcvtne2ps2bf16(b, a) that holds value j.
        alignas(64) static const uint16_t kPlace[32] = {
            0, 1, 2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
            8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
        const __m512i narrow = (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a);
        const __m512i v = _mm512_permutexvar_epi16(_mm512_load_si512(kPlace), narrow);
        if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
        else
            _mm512_storeu_si512(p, v);
    }
};
#endif

}  // namespace
