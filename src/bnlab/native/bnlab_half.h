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
// and Pair<S> (below) narrows and stores two vectors at once.
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
#if defined(__AVX512BW__)
    // One instruction: word k to the upper half of lane k, zeros below (a
    // permutation of words, vpermw, with the even words masked to zero), where
    // vpmovzxwd and a shift take two. With Pair<bf16> (below), in-process
    // against both: bfloat16 training steps over planes (ResNet's 56x56 and
    // 28x28 stages, one image, the 3d volume, (32, 256, 100)) ran 1.05-1.3x
    // faster on 1 and 2 threads, LeNet-5's conv1 inference 1.34x; periodic
    // rows and 7x7 planes unchanged within noise (0.98-1.05x).
    alignas(64) static const uint16_t kWord[32] = {0, 0, 1, 1, 2,  2,  3,  3,  4,  4,  5,
                                                   5, 6, 6, 7, 7,  8,  8,  9,  9,  10, 10,
                                                   11, 11, 12, 12, 13, 13, 14, 14, 15, 15};
    const __m512i wide = _mm512_castsi256_si512((__m256i)h);
    return (f32x16)_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_load_si512(kWord), wide);
#elif defined(__AVX512F__)
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
    __m256i r = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Into a register, then stored: GCC folds a store that follows into
    // vcvtps2ph's memory form, which ran at half the rate on an AMD Zen 4
    // (1.08 against 0.58 ns per 16 values written to L1). The empty asm
    // hides where r goes next.
    asm("" : "+v"(r));
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

// Pair<S>::store(p, a, b, stream): two vectors narrowed to S and written at
// p and p + 16, with one instruction for both where the type has one
// (`joint`): AVX512-BF16's vcvtne2ps2bf16 narrows 32 floats to bfloat16 at
// once, and one 64-byte store writes them.
template <typename S>
struct Pair {
    typedef typename Elem<S>::V V;
    static constexpr bool joint = false;
    static void store(S* p, V a, V b, bool stream) {
        Elem<S>::store(p, a, stream);
        Elem<S>::store(p + 16, b, stream);
    }
};

#if defined(__AVX512BF16__)
template <>
struct Pair<bf16> {
    typedef f32x16 V;
    static constexpr bool joint = true;
    static void store(bf16* p, V a, V b, bool stream) {
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a);
        if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
        else
            _mm512_storeu_si512(p, v);
    }
};
#endif

}  // namespace
