// Direct 2-D convolution on the CPU (stride 1, no dilation, one group, zero
// padding), for the layers torch's CPU convolutions handle worst: a handful of
// channels, small kernels, small images. LeNet-5's first layer (3 -> 6
// channels, 5x5, 32x32 input) runs at a third of the machine's arithmetic rate
// in torch's own kernels, because their vectors run along the channels.
//
// Here vectors run along an output row, so channel counts do not matter:
//
//   forward        for one output row, a block of OB output channels and NV
//                  vectors of columns live in OB*NV registers; every (c, kh, kw)
//                  adds weight * (the input row, shifted by kw) to them. Kernel
//                  rows that would read only padding are skipped.
//   weight grad    dw[o,c,kh,kw] = sum over images, rows, columns of
//                  dy[o] * x[c] shifted by (kh, kw): for one (c, kh), OB x KB
//                  (kw) vector accumulators run down the rows and columns of an
//                  image; their lanes are added to float64 lanes per image and
//                  summed across only at the end.
//   input grad     a forward pass of dy, padded by K-1-P, with the weights
//                  flipped and in and out channels swapped (the caller
//                  prepares them).
//
// Each image is first copied into a zero-padded [C][Hb][Wb] buffer (from
// NCHW or channels_last), so the inner loops read whole vectors past the
// right edge without a branch, and the image sits in L1/L2 while it is used.
// Output rows are written in either layout.
//
// Numerics: products are summed in the input's precision within one image
// (at most C*KH*KW terms per output in the forward; one image's rows and
// columns per weight in the weight grad); the weight and bias grads carry
// per-image sums in float64.
//
// Threads: images are split across the OpenMP team (the caller passes
// torch.get_num_threads()); each thread keeps its own weight-grad partials,
// added in thread order at the end.

#include "bnlab_native.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kRegisters = 32;  // vector registers the blocking may fill
#else
constexpr int kRegisters = 16;
#endif
constexpr int kMaxBlock = 6;  // most output channels per register block
constexpr int kMaxVecs = 4;   // most vectors of columns per forward block
constexpr int kMaxTaps = 4;   // most kernel columns per weight-grad block (best on 5x5: bench_conv.py)

// Vectors of 32 bytes (8 floats, 4 doubles): one AVX register.
template <typename T>
constexpr int64_t lanes() {
    return 32 / sizeof(T);
}
template <typename T>
using Vec32 = Vec<T, int(lanes<T>())>;
// Pins v to a register: without it, compilers fold a reused load into every
// multiply-add that reads it, and the weight-grad loop becomes load-bound.
template <typename V>
inline void in_register(V& v) {
#if defined(__AVX__) && (defined(__GNUC__) || defined(__clang__))  // a 32-byte register exists
    asm("" : "+v"(v));
#else
    (void)v;
#endif
}

// Every lane s. (Written out: `vec{} + s` would be an addition, as 0 + -0 is not -0.)
inline Vec32<float>::v splat(float s) { return Vec32<float>::v{s, s, s, s, s, s, s, s}; }
inline Vec32<double>::v splat(double s) { return Vec32<double>::v{s, s, s, s}; }
template <typename T>
inline double lane_sum(typename Vec32<T>::v v) {
    double s = 0.0;
    for (int k = 0; k < lanes<T>(); ++k) s += double(v[k]);
    return s;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct ConvShape {
    int64_t N, C, H, W;  // input
    int64_t O, KH, KW;   // output channels, kernel size
    int64_t PH, PW;      // zero padding on each side
    int64_t Ho() const { return H + 2 * PH - KH + 1; }
    int64_t Wo() const { return W + 2 * PW - KW + 1; }
    int64_t multiply_adds() const { return N * O * Ho() * Wo() * C * KH * KW; }
};

// One image into buf as [C][Hb][Wb]: (r, s) holds input (r - PH, s - PW), zero elsewhere.
template <typename T>
void pack_image(const T* x, bool channels_last, const ConvShape& s, int64_t Hb, int64_t Wb,
                T* buf) {
    std::fill(buf, buf + s.C * Hb * Wb, T(0));
    for (int64_t c = 0; c < s.C; ++c)
        for (int64_t h = 0; h < s.H; ++h) {
            T* row = buf + (c * Hb + h + s.PH) * Wb + s.PW;
            if (channels_last) {
                const T* from = x + h * s.W * s.C + c;
                for (int64_t w = 0; w < s.W; ++w) row[w] = from[w * s.C];
            } else {
                std::memcpy(row, x + (c * s.H + h) * s.W, s.W * sizeof(T));
            }
        }
}

// body(thread, first image, end image) on at most `threads` threads splitting N images.
template <typename Body>
void over_images(int64_t N, int threads, Body body) {
    parallel(int(std::min<int64_t>(std::max(threads, 1), N)), [&](int t, int T) {
        int64_t n0, n1;
        split(N, t, T, 1, &n0, &n1);
        body(t, n0, n1);
    });
}

// Output channels in blocks of at most `most`, as even as possible: O = 16, most 6 -> 5, 5, 6.
inline std::vector<int64_t> channel_blocks(int64_t O, int64_t most) {
    const int64_t count = ceil_div(O, most);
    std::vector<int64_t> starts;
    for (int64_t b = 0; b <= count; ++b) starts.push_back(b * O / count);
    return starts;
}

// ---- forward -------------------------------------------------------------------------------

// Output row h, channels [0, OB) of `w` (rows `wstride` apart), NV vectors from column w0,
// into tile[o][0, NV*L). Kernel rows whose input row is all padding are skipped: for
// an input gradient (padding K-1) that is a third of the work on LeNet-5's conv2.
template <typename T, int OB, int NV>
void forward_block(const T* buf, int64_t Hb, int64_t Wb, const ConvShape& s, const T* w,
                   int64_t wstride, const T* bias, int64_t h, int64_t w0, T* tile) {
    typedef typename Vec32<T>::v vec;
    constexpr int64_t L = lanes<T>();
    vec acc[OB][NV];
    for (int o = 0; o < OB; ++o)
        for (int v = 0; v < NV; ++v) acc[o][v] = splat(bias ? bias[o] : T(0));
    const int64_t kh0 = std::max<int64_t>(0, s.PH - h), kh1 = std::min(s.KH, s.PH + s.H - h);
    for (int64_t c = 0; c < s.C; ++c)
        for (int64_t kh = kh0; kh < kh1; ++kh) {
            const T* row = buf + (c * Hb + h + kh) * Wb + w0;
            const T* wk = w + (c * s.KH + kh) * s.KW;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
                vec xv[NV];
                for (int v = 0; v < NV; ++v) xv[v] = load<L>(row + kw + v * L);
                for (int o = 0; o < OB; ++o) {
                    const vec k = splat(wk[o * wstride + kw]);
                    for (int v = 0; v < NV; ++v) acc[o][v] += k * xv[v];
                }
            }
        }
    for (int o = 0; o < OB; ++o)
        for (int v = 0; v < NV; ++v) store<L>(tile + (o * NV + v) * L, acc[o][v]);
}

template <typename T>
using ForwardBlock = void (*)(const T*, int64_t, int64_t, const ConvShape&, const T*, int64_t,
                              const T*, int64_t, int64_t, T*);

template <typename T, int NV>
ForwardBlock<T> forward_block_for(int64_t ob) {
    switch (ob) {
        case 1: return forward_block<T, 1, NV>;
        case 2: return forward_block<T, 2, NV>;
        case 3: return forward_block<T, 3, NV>;
        case 4: return forward_block<T, 4, NV>;
        case 5: return forward_block<T, 5, NV>;
        default: return forward_block<T, 6, NV>;
    }
}

template <typename T>
ForwardBlock<T> forward_block_for(int64_t ob, int64_t nv) {
    switch (nv) {
        case 1: return forward_block_for<T, 1>(ob);
        case 2: return forward_block_for<T, 2>(ob);
        case 3: return forward_block_for<T, 3>(ob);
        default: return forward_block_for<T, 4>(ob);
    }
}

template <typename T>
void conv_forward(const T* x, const T* w, const T* bias, T* y, const ConvShape& s, bool x_cl,
                  bool y_cl, int threads) {
    constexpr int64_t L = lanes<T>();
    const int64_t Ho = s.Ho(), Wo = s.Wo(), O = s.O;
    const int64_t nv = std::min<int64_t>(ceil_div(Wo, L), kMaxVecs);
    const int64_t chunk = nv * L, chunks = ceil_div(Wo, chunk);
    const int64_t Hb = s.H + 2 * s.PH, Wb = chunks * chunk + s.KW - 1;
    // Registers: OB*NV accumulators, NV input vectors, one broadcast weight.
    const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kMaxBlock, (kRegisters - nv - 1) / nv));
    const std::vector<int64_t> blocks = channel_blocks(O, most);
    const int64_t wstride = s.C * s.KH * s.KW;

    over_images(s.N, threads, [&](int, int64_t n0, int64_t n1) {
        std::vector<T> buf(s.C * Hb * Wb), tile(kMaxBlock * chunk);
        for (int64_t n = n0; n < n1; ++n) {
            pack_image(x + n * s.C * s.H * s.W, x_cl, s, Hb, Wb, buf.data());
            T* yn = y + n * O * Ho * Wo;
            for (size_t b = 0; b + 1 < blocks.size(); ++b) {
                const int64_t o0 = blocks[b], ob = blocks[b + 1] - o0;
                const ForwardBlock<T> run = forward_block_for<T>(ob, nv);
                for (int64_t h = 0; h < Ho; ++h)
                    for (int64_t w0 = 0; w0 < Wo; w0 += chunk) {
                        run(buf.data(), Hb, Wb, s, w + o0 * wstride, wstride,
                            bias ? bias + o0 : nullptr, h, w0, tile.data());
                        const int64_t cols = std::min(chunk, Wo - w0);
                        for (int64_t o = 0; o < ob; ++o) {
                            const T* from = tile.data() + o * chunk;
                            if (y_cl) {
                                T* to = yn + (h * Wo + w0) * O + o0 + o;
                                for (int64_t j = 0; j < cols; ++j) to[j * O] = from[j];
                            } else {
                                std::memcpy(yn + ((o0 + o) * Ho + h) * Wo + w0, from,
                                            cols * sizeof(T));
                            }
                        }
                    }
            }
        }
    });
}

// ---- weight and bias gradients -------------------------------------------------------------

// Adds to dw[o][kw] (rows `dw_stride` apart; each entry L float64 lanes) the sums over one image of
// dy[o] * x[c] shifted by (kh, kw0 + kw). dy rows are Wd wide, zero past Wo;
// x columns past Wo + kw are masked out of the last vector, so an infinite
// input there cannot turn a zero product into NaN.
template <typename T, int OB, int KB>
void grad_weight_block(const T* xbuf, int64_t Hb, int64_t Wb, const T* dbuf, int64_t Ho,
                       int64_t Wo, int64_t Wd, int64_t c, int64_t kh, int64_t kw0, double* dw,
                       int64_t dw_stride) {
    typedef typename Vec32<T>::v vec;
    constexpr int64_t L = lanes<T>();
    const int64_t full = Wo / L * L;
    typedef typename Vec32<T>::bits bits;
    bits tail_mask;  // all ones in the lanes of the last vector that are columns < Wo
    for (int k = 0; k < L; ++k) tail_mask[k] = full + k < Wo ? -1 : 0;
    vec acc[OB][KB];
    for (int o = 0; o < OB; ++o)
        for (int k = 0; k < KB; ++k) acc[o][k] = vec{};
    for (int64_t h = 0; h < Ho; ++h) {
        const T* xr = xbuf + (c * Hb + h + kh) * Wb + kw0;
        const T* dr = dbuf + h * Wd;
        for (int64_t v = 0; v < full; v += L) {
            vec d[OB];
            for (int o = 0; o < OB; ++o) {
                d[o] = load<L>(dr + o * Ho * Wd + v);
                in_register(d[o]);
            }
            for (int k = 0; k < KB; ++k) {
                const vec xv = load<L>(xr + v + k);
                for (int o = 0; o < OB; ++o) acc[o][k] += d[o] * xv;
            }
        }
        if (full < Wo) {
            vec d[OB];
            for (int o = 0; o < OB; ++o) d[o] = load<L>(dr + o * Ho * Wd + full);
            for (int k = 0; k < KB; ++k) {
                const vec xv = (vec)((bits)load<L>(xr + full + k) & tail_mask);
                for (int o = 0; o < OB; ++o) acc[o][k] += d[o] * xv;
            }
        }
    }
    for (int o = 0; o < OB; ++o)
        for (int k = 0; k < KB; ++k) {
            double* lane = dw + (o * dw_stride + k) * L;  // lanes are summed once, at the end
            for (int j = 0; j < L; ++j) lane[j] += double(acc[o][k][j]);
        }
}

template <typename T>
using GradWeightBlock = void (*)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, double*, int64_t);

template <typename T, int KB>
GradWeightBlock<T> grad_weight_block_for(int64_t ob) {
    switch (ob) {
        case 1: return grad_weight_block<T, 1, KB>;
        case 2: return grad_weight_block<T, 2, KB>;
        case 3: return grad_weight_block<T, 3, KB>;
        case 4: return grad_weight_block<T, 4, KB>;
        case 5: return grad_weight_block<T, 5, KB>;
        default: return grad_weight_block<T, 6, KB>;
    }
}

template <typename T>
GradWeightBlock<T> grad_weight_block_for(int64_t ob, int64_t kb) {
    switch (kb) {
        case 1: return grad_weight_block_for<T, 1>(ob);
        case 2: return grad_weight_block_for<T, 2>(ob);
        case 3: return grad_weight_block_for<T, 3>(ob);
        case 4: return grad_weight_block_for<T, 4>(ob);
        default: return grad_weight_block_for<T, 5>(ob);
    }
}

template <typename T>
void conv_grad_weight(const T* x, const T* dy, T* dw, T* dbias, const ConvShape& s, bool x_cl,
                      bool dy_cl, int threads) {
    constexpr int64_t L = lanes<T>();
    const int64_t Ho = s.Ho(), Wo = s.Wo(), O = s.O, C = s.C, KH = s.KH, KW = s.KW;
    const int64_t Wd = ceil_div(Wo, L) * L;
    const int64_t Hb = s.H + 2 * s.PH, Wb = Wd + KW - 1;
    const ConvShape dy_shape{s.N, O, Ho, Wo, 0, 1, 1, 0, 0};  // dy packed as an unpadded image
    const int64_t kb_most = std::min<int64_t>(KW, kMaxTaps);
    // Registers: OB*KB accumulators, OB dy vectors, one input vector.
    const int64_t most =
        std::max<int64_t>(1, std::min<int64_t>(kMaxBlock, (kRegisters - 1) / (kb_most + 1)));
    const std::vector<int64_t> blocks = channel_blocks(O, most);
    const int64_t nw = O * C * KH * KW;

    int team = int(std::min<int64_t>(std::max(threads, 1), s.N));
    // Per thread: L float64 lanes per weight, then one float64 per bias.
    const int64_t per_thread = nw * L + O;
    std::vector<double> partial(size_t(team) * per_thread, 0.0);
    over_images(s.N, team, [&](int t, int64_t n0, int64_t n1) {
        double* pdw = partial.data() + t * per_thread;
        double* pdb = pdw + nw * L;
        std::vector<T> xbuf(C * Hb * Wb), dbuf(O * Ho * Wd);
        for (int64_t n = n0; n < n1; ++n) {
            pack_image(x + n * C * s.H * s.W, x_cl, s, Hb, Wb, xbuf.data());
            pack_image(dy + n * O * Ho * Wo, dy_cl, dy_shape, Ho, Wd, dbuf.data());
            for (int64_t o = 0; o < O; ++o) {
                typename Vec32<T>::v sum{};
                const T* d = dbuf.data() + o * Ho * Wd;
                for (int64_t e = 0; e < Ho * Wd; e += L) sum += load<L>(d + e);
                pdb[o] += lane_sum<T>(sum);
            }
            for (size_t b = 0; b + 1 < blocks.size(); ++b) {
                const int64_t o0 = blocks[b], ob = blocks[b + 1] - o0;
                for (int64_t c = 0; c < C; ++c)
                    for (int64_t kh = 0; kh < KH; ++kh)
                        for (int64_t kw0 = 0; kw0 < KW; kw0 += kMaxTaps) {
                            const int64_t kb = std::min<int64_t>(KW - kw0, kMaxTaps);
                            grad_weight_block_for<T>(ob, kb)(
                                xbuf.data(), Hb, Wb, dbuf.data() + o0 * Ho * Wd, Ho, Wo, Wd, c,
                                kh, kw0, pdw + (((o0 * C + c) * KH + kh) * KW + kw0) * L,
                                C * KH * KW);
                        }
            }
        }
    });
    for (int64_t e = 0; e < nw + O; ++e) {
        double total = 0.0;
        for (int t = 0; t < team; ++t) {
            const double* p = partial.data() + t * per_thread;
            if (e < nw)
                for (int64_t j = 0; j < L; ++j) total += p[e * L + j];
            else
                total += p[nw * L + e - nw];
        }
        if (e < nw)
            dw[e] = T(total);
        else if (dbias)
            dbias[e - nw] = T(total);
    }
}

// ---- Python functions ----------------------------------------------------------------------
//
// Called only through bnlab/speedups/_ext.py, which checks the tensors and
// derives every size and flag from them. Pointers are to memory of the dtype
// the is_double flag says (None for an absent bias); x, y and dy are NCHW or
// channels_last as their flags say; weights are contiguous (O, C, KH, KW).

// a[0..] = N, C, H, W, O, KH, KW, PH, PW
inline ConvShape shape_of(PyObject* const* a) {
    return ConvShape{i64(a[0]), i64(a[1]), i64(a[2]), i64(a[3]), i64(a[4]),
                     i64(a[5]), i64(a[6]), i64(a[7]), i64(a[8])};
}

// conv2d_forward(x, weight, bias, y, is_double, N, C, H, W, O, KH, KW, PH, PW,
//                x_channels_last, y_channels_last, threads)
PyObject* py_conv2d_forward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 17, "conv2d_forward")) return nullptr;
    void *x = ptr(a[0]), *w = ptr(a[1]), *b = ptr(a[2]), *y = ptr(a[3]);
    const bool is_double = i64(a[4]) != 0;
    const ConvShape s = shape_of(a + 5);
    const bool x_cl = i64(a[14]) != 0, y_cl = i64(a[15]) != 0;
    const int threads = int(i64(a[16]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(s.multiply_adds());
    if (is_double)
        conv_forward(static_cast<const double*>(x), static_cast<const double*>(w),
                     static_cast<const double*>(b), static_cast<double*>(y), s, x_cl, y_cl,
                     threads);
    else
        conv_forward(static_cast<const float*>(x), static_cast<const float*>(w),
                     static_cast<const float*>(b), static_cast<float*>(y), s, x_cl, y_cl,
                     threads);
    Py_RETURN_NONE;
}

// conv2d_grad_weight(x, dy, dweight, dbias, is_double, N, C, H, W, O, KH, KW, PH, PW,
//                    x_channels_last, dy_channels_last, threads)
PyObject* py_conv2d_grad_weight(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 17, "conv2d_grad_weight")) return nullptr;
    void *x = ptr(a[0]), *dy = ptr(a[1]), *dw = ptr(a[2]), *db = ptr(a[3]);
    const bool is_double = i64(a[4]) != 0;
    const ConvShape s = shape_of(a + 5);
    const bool x_cl = i64(a[14]) != 0, dy_cl = i64(a[15]) != 0;
    const int threads = int(i64(a[16]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(s.multiply_adds());
    if (is_double)
        conv_grad_weight(static_cast<const double*>(x), static_cast<const double*>(dy),
                         static_cast<double*>(dw), static_cast<double*>(db), s, x_cl, dy_cl,
                         threads);
    else
        conv_grad_weight(static_cast<const float*>(x), static_cast<const float*>(dy),
                         static_cast<float*>(dw), static_cast<float*>(db), s, x_cl, dy_cl,
                         threads);
    Py_RETURN_NONE;
}

}  // namespace

// Added to the module by module.cpp.
PyMethodDef bnlab_conv2d_methods[] = {
    {"conv2d_forward", fastcall<py_conv2d_forward>(), METH_FASTCALL,
     "Direct 2-D convolution, stride 1, zero padding."},
    {"conv2d_grad_weight", fastcall<py_conv2d_grad_weight>(), METH_FASTCALL,
     "Weight and bias gradients of conv2d_forward."},
    {nullptr, nullptr, 0, nullptr}};
