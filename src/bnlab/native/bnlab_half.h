// Storage types of the batch-norm kernels and their conversions to the type
// they compute in: float and double compute in themselves; bfloat16 and
// float16 are stored as 16 bits and computed in float (torch's rule for
// reduced-precision batch norm: float accumulation, output in the input's
// dtype).
//
// Elem<S> is the one place that knows a storage type:
//   T           the compute type
//   load(p)     kLanes values at p, widened to a vector of T
//   store(p,v)  kLanes values narrowed to S and written (around the caches if asked)
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
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

struct bf16 {
    uint16_t bits;
};
struct f16 {
    uint16_t bits;
};

// The kernels compute in vectors as wide as the target's registers: 16 floats
// with AVX-512, 8 with AVX, 4 otherwise (SSE, NEON). A generic vector wider
// than the registers is not only split: GCC builds and stores many of its
// pieces through the stack (a scalar broadcast became 16 scalar stores and two
// reloads), and an AVX2 build of 16-lane kernels ran 0.06-0.99x torch's
// speed in 16 bits.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float f32v __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16v __attribute__((vector_size(kLanes * 2)));
typedef uint32_t u32v __attribute__((vector_size(kLanes * 4)));
typedef int32_t i32v __attribute__((vector_size(kLanes * 4)));

// A register written to p: around the caches when asked and p is aligned to it.
#if defined(__AVX512F__)
inline void store_register(void* p, __m512i v, bool stream) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(p);
    if (stream && (at & 63) == 0) {
        _mm512_stream_si512(static_cast<__m512i*>(p), v);
    } else if (stream && (at & 31) == 0) {  // half a line each
        _mm256_stream_si256(static_cast<__m256i*>(p), _mm512_castsi512_si256(v));
        _mm256_stream_si256(static_cast<__m256i*>(p) + 1, _mm512_extracti64x4_epi64(v, 1));
    } else {
        _mm512_storeu_si512(p, v);
    }
}
#endif
#if defined(__AVX__)
inline void store_register(void* p, __m256i v, bool stream) {
    if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0)
        _mm256_stream_si256(static_cast<__m256i*>(p), v);
    else
        _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
#endif
#if defined(__SSE2__)
inline void store_register(void* p, __m128i v, bool stream) {
    if (stream && (reinterpret_cast<uintptr_t>(p) & 15) == 0)
        _mm_stream_si128(static_cast<__m128i*>(p), v);
    else
        _mm_storeu_si128(static_cast<__m128i*>(p), v);
}
#endif

// Writes the vector v (of any element type) to p, around the caches when
// asked: one register from the register it is in (through memcpy, GCC
// spilled it to the stack first), a wider one (kLanes doubles) by halves.
template <typename V>
inline void store_vector(void* p, V v, bool stream) {
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64) return store_register(p, (__m512i)v, stream);
#endif
#if defined(__AVX__)
    if constexpr (sizeof(V) == 32) return store_register(p, (__m256i)v, stream);
#endif
#if defined(__SSE2__)
    if constexpr (sizeof(V) == 16) return store_register(p, (__m128i)v, stream);
#endif
    if constexpr (sizeof(V) > kLanes * 4) {
        typedef std::remove_reference_t<decltype(v[0])> E;
        typedef E H __attribute__((vector_size(sizeof(V) / 2)));
        H lo, hi;
        std::memcpy(&lo, &v, sizeof(H));
        std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
        store_vector(p, lo, stream);
        store_vector(static_cast<char*>(p) + sizeof(H), hi, stream);
        return;
    }
    std::memcpy(p, &v, sizeof(V));
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

// ---- vector conversions (kLanes lanes) ---------------------------------------------------

inline f32v widen_bf16(u16v h) {
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
    return (f32v)_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_load_si512(kWord), wide);
#elif defined(__AVX512F__)
    // One vpmovzxwd over the whole vector: GCC lowers the generic form below
    // as two half-width widenings and an insert, a third slower end to end.
    return (f32v)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#elif defined(__AVX2__)
    return (f32v)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
    const u32v u = __builtin_convertvector(h, u32v) << 16;
    return (f32v)u;
#endif
}

// The bfloat16 nearest v (rounded to nearest even, NaN kept a quiet NaN), in
// the low 16 bits of each 32-bit lane.
inline u32v round_to_bf16(f32v v) {
    const u32v u = (u32v)v;
    const u32v r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    // One unordered compare and a blend; an unsigned compare of the bits
    // took six instructions on AVX2, which compares only signed integers.
    return v != v ? u32v{} + 0x7fc0u : r;
}

inline u16v narrow_bf16(f32v v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return (u16v)_mm512_cvtneps_pbh((__m512)v);
#elif defined(__AVX2__) && !defined(__AVX512F__)
    // The low words of the eight lanes, in order (vpackusdw packs within each
    // 128-bit half; the values fit in 16 bits, so nothing saturates).
    const __m256i r = (__m256i)round_to_bf16(v);
    return (u16v)_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
#else
    return __builtin_convertvector(round_to_bf16(v), u16v);
#endif
}

inline f32v widen_half(u16v h) {
#if defined(__AVX512F__)
    return (f32v)_mm512_cvtph_ps((__m256i)h);
#elif defined(__F16C__) && defined(__AVX__)
    return (f32v)_mm256_cvtph_ps((__m128i)h);
#else
    f32v out;
    for (int k = 0; k < kLanes; ++k) out[k] = half_to_float(h[k]);
    return out;
#endif
}

inline u16v narrow_half(f32v v) {
#if defined(__AVX512F__)
    __m256i r = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Into a register, then stored: GCC folds a store that follows into
    // vcvtps2ph's memory form, which ran at half the rate on an AMD Zen 4
    // (1.08 against 0.58 ns per 16 values written to L1). The empty asm
    // hides where r goes next.
    asm("" : "+v"(r));
    return (u16v)r;
#elif defined(__F16C__) && defined(__AVX__)
    return (u16v)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    u16v out;
    for (int k = 0; k < kLanes; ++k) out[k] = float_to_half(v[k]);
    return out;
#endif
}

// ---- the storage types ----------------------------------------------------------------------

template <typename S>
struct Elem;

// float and double: stored as computed.
template <typename S>
struct Native {
    typedef S T;
    typedef S V __attribute__((vector_size(kLanes * sizeof(S))));
    static V load(const S* p) {
        V v;
        std::memcpy(&v, p, sizeof(V));
        return v;
    }
    static void store(S* p, V v, bool stream) { store_vector(p, v, stream); }
    static S up(S s) { return s; }
    static S down(S t) { return t; }
};
template <>
struct Elem<float> : Native<float> {};
template <>
struct Elem<double> : Native<double> {};

// bfloat16 and float16: 16 bits, computed in float.
template <typename S, f32v (*Widen)(u16v), u16v (*Narrow)(f32v), float (*Up)(uint16_t),
          uint16_t (*Down)(float)>
struct Half {
    typedef float T;
    typedef f32v V;
    static V load(const S* p) {
        u16v h;
        std::memcpy(&h, p, sizeof(h));
        return Widen(h);
    }
    static void store(S* p, V v, bool stream) { store_vector(p, Narrow(v), stream); }
    static float up(S s) { return Up(s.bits); }
    static S down(float t) { return S{Down(t)}; }
};
template <>
struct Elem<bf16> : Half<bf16, widen_bf16, narrow_bf16, bf16_to_float, float_to_bf16> {};
template <>
struct Elem<f16> : Half<f16, widen_half, narrow_half, half_to_float, float_to_half> {};

// Pair<S>::store(p, a, b, stream): two vectors narrowed to S and written at
// p and p + kLanes, with one instruction for both where the type has one
// (`joint`): AVX512-BF16's vcvtne2ps2bf16 narrows 32 floats to bfloat16 at
// once, and one 64-byte store writes them; without AVX-512, one pack of words
// takes two vectors of bfloat16.
template <typename S>
struct Pair {
    typedef typename Elem<S>::V V;
    static constexpr bool joint = false;
    static void store(S* p, V a, V b, bool stream) {
        Elem<S>::store(p, a, stream);
        Elem<S>::store(p + kLanes, b, stream);
    }
};

#if defined(__AVX512BF16__) && defined(__AVX512F__)
template <>
struct Pair<bf16> {
    typedef f32v V;
    static constexpr bool joint = true;
    static void store(bf16* p, V a, V b, bool stream) {
        store_register(p, (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a), stream);
    }
};
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// One pack and one permutation (both on the one shuffle port of many x86
// cores) narrow 16 values, where a vector at a time takes both for 8.
template <>
struct Pair<bf16> {
    typedef f32v V;
    static constexpr bool joint = true;
    static void store(bf16* p, V a, V b, bool stream) {
        const __m256i ra = (__m256i)round_to_bf16(a), rb = (__m256i)round_to_bf16(b);
        store_register(p, _mm256_permute4x64_epi64(_mm256_packus_epi32(ra, rb), 0xD8), stream);
    }
};
#endif

}  // namespace
