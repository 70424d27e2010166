// The elementwise passes over periodic rows, y and dx, with the columns' coefficients in
// registers. Part of the batch-norm CPU kernels: cpu_kernels.h describes the whole.

#pragma once

#include "rows.h"

namespace {

// Rows [r0, r1) of width W, columns [j0, j1): apply(f, coef(j)) at each
// whole vector, f the flat index of column j and coef(j) the coefficient
// vectors of columns [j, j + kLanes); scalar(e, j) at each column past them.
// The elementwise passes' rows() call it with their coefficients and pointers
// copied into the closures: read through the object, GCC reloaded them after
// every store (which may alias it) and, gathering a single row's coefficients
// into registers, spilled them; 16-bit channels_last inference of 2048
// channels ran at half the copy bandwidth.
//
// With `pairs`, rows go two at a time, each coefficient vector loaded once
// for both, Vecs vectors (a cache line of S) at a time, so a streamed output
// line is written whole before the next row's (pair_rows says when).
template <typename S>
constexpr int kRowGroup = kLineValues<S> > kLanes ? int(kLineValues<S> / kLanes) : 1;

template <int Vecs, typename Coef, typename Apply, typename Scalar>
inline void for_rows(int64_t r0, int64_t r1, int64_t j0, int64_t j1, int64_t W, bool pairs,
                     Coef coef, Apply apply, Scalar scalar) {
    const int64_t jv = j0 + (j1 - j0) / kLanes * kLanes;
    const int64_t jg = j0 + (j1 - j0) / (Vecs * kLanes) * (Vecs * kLanes);
    const auto rest_of_row = [&](int64_t o, int64_t from) {
        for (int64_t j = from; j < jv; j += kLanes) apply(o + j, coef(j));
        for (int64_t j = jv; j < j1; ++j) scalar(o + j, j);
    };
    int64_t r = r0;
    if (pairs)
        for (; r + 2 <= r1; r += 2) {
            const int64_t o = r * W;
            for (int64_t j = j0; j < jg; j += Vecs * kLanes) {
                decltype(coef(j)) c[Vecs];
                for (int u = 0; u < Vecs; ++u) c[u] = coef(j + u * kLanes);
                for (int i = 0; i < 2; ++i)
                    for (int u = 0; u < Vecs; ++u) apply(o + i * W + j + u * kLanes, c[u]);
            }
            rest_of_row(o, jg);
            rest_of_row(o + W, jg);
        }
    for (; r < r1; ++r) rest_of_row(r * W, j0);
}

// Rows one by one read each row's coefficients again. Once a sweep's
// coefficient arrays (`arrays` of W values of T) take more than half of a
// 32 KiB L1 data cache, those reads come from L2 and outnumber the data's:
// rows then go in pairs (for_rows). Wide rows measured in-process, paired
// against one by one: channels_last ResNet stage 4 (2048 channels) training
// 1.06-1.15x and (1024, 4096) float16 training and inference 1.2x faster;
// (2048, 1536) training 1.05-1.07x. At 1024 channels (16 KiB of gradient
// coefficients) pairs ran 0.74-0.88x, and 1024-channel inference 0.4x.
constexpr int64_t kPairCoefBytes = int64_t(16) << 10;

template <typename T>
bool pair_rows(int arrays, int64_t W) {
    return arrays * W * int64_t(sizeof(T)) > kPairCoefBytes;
}


// Affine coefficients per column, and y = (x - mh)*s + b over rows. The
// coefficients of columns [j0, j1) are set by set(), as their channels' statistics come.
template <typename S>
struct ColumnNormalize {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const std::vector<int64_t>* chan;  // null: column j is channel j
    std::vector<T> mh, s, b;
    bool centered = false;  // some column's mh is not 0 (see set_channels); sticky
    const S* x;
    S* y;
    int64_t W;
    bool stream;
    ColumnNormalize(const std::vector<int64_t>* chan_, int64_t W_, const S* x_, S* y_,
                    bool stream_)
        : chan(chan_), mh(W_), s(W_), b(W_), x(x_), y(y_), W(W_), stream(stream_) {}
    ColumnNormalize& set(int64_t j0, int64_t j1, const std::vector<Affine<T>>& per) {
        centered = true;
        for (int64_t j = j0; j < j1; ++j) {
            const Affine<T>& a = per[(*chan)[j]];
            mh[j] = a.mh;
            s[j] = a.s;
            b[j] = a.b;
        }
        return *this;
    }
    // Columns that are channels: the coefficients straight from the statistics
    // (affine_of's, in one loop the compiler vectorizes; wide layers have
    // thousands of channels).
    //
    // Where every channel's |mean|*invstd is at most 1, the coefficients are
    // uncentered: mh = 0 and b = beta - mean*s (in float64), so y = x*s + b.
    // That form rounds s and b, whose errors reach y scaled by |x|*invstd and
    // |mean|*invstd, within an ulp or two of y then, as the centered form's;
    // and rows() then reads two arrays instead of three (float32 wide-row
    // inference 10% faster). Far from zero (|mean| >> std) the centered form
    // keeps its accuracy. run<U> needs no branch: x - 0 is x.
    ColumnNormalize& set_channels(int64_t c0, int64_t c1, const double* __restrict mean,
                                  const double* __restrict invstd, const T* __restrict weight,
                                  const T* __restrict bias) {
        T* __restrict m = mh.data();
        T* __restrict sc = s.data();
        T* __restrict bb = b.data();
        // The largest |mean|*invstd, as 8 running maxima: std::fmax was a libm
        // call per channel (15% of a (1, 4096) inference call), and one running
        // maximum a chain of dependent steps (another 15%); GCC's vectors of
        // this loop ran slower than the 8 scalar chains. NaN statistics give
        // NaN outputs either way.
        double lane[8] = {};
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8)
            for (int k = 0; k < 8; ++k) {
                const double d = std::fabs(mean[c + k] * invstd[c + k]);
                lane[k] = d > lane[k] ? d : lane[k];
            }
        double far = 0;
        for (; c < c1; ++c) far = std::max(far, std::fabs(mean[c] * invstd[c]));
        for (double d : lane) far = std::max(far, d);
        const bool centered_here = !(far <= 1.0);
        centered = centered || centered_here;
        for (c = c0; c < c1; ++c) {
            const Affine<T> q = affine_of(mean[c], invstd[c], weight, bias, c, centered_here);
            m[c] = q.mh;
            sc[c] = q.s;
            bb[c] = q.b;
        }
        return *this;
    }
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V vmh[U], vs[U], vb[U];
        for (int u = 0; u < U; ++u) {
            vmh[u] = Elem<T>::load(mh.data() + j + u * kLanes);
            vs[u] = Elem<T>::load(s.data() + j + u * kLanes);
            vb[u] = Elem<T>::load(b.data() + j + u * kLanes);
        }
        // Members in locals: the stores may alias *this as far as the compiler
        // knows, which made it reload x, y, W and stream after every vector.
        const S* const xs = x;
        S* const ys = y;
        const int64_t w = W;
        const bool st = stream;
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * w + j + u * kLanes;
                store_out(ys + e, V((ld(xs + e) - vmh[u]) * vs[u] + vb[u]), st);
            }
    }
    // Rows [r0, r1), columns [j0, j1): one by one, or in pairs (for_rows).
    void rows(int64_t r0, int64_t r1, int64_t j0, int64_t j1) const {
        const T *const m = mh.data(), *const sc = s.data(), *const bb = b.data();
        const S* const xs = x;
        S* const ys = y;
        const bool st = stream;
        const auto last = [=](int64_t e, int64_t j) {
            ys[e] = down<S>((up(xs[e]) - m[j]) * sc[j] + bb[j]);
        };
        if (!centered)
            return for_rows<kRowGroup<S>>(
                r0, r1, j0, j1, W, pair_rows<T>(2, W),
                [=](int64_t j) {
                    return std::array<V, 2>{Elem<T>::load(sc + j), Elem<T>::load(bb + j)};
                },
                [=](int64_t f, const std::array<V, 2>& c) {
                    store_out(ys + f, V(ld(xs + f) * c[0] + c[1]), st);
                },
                last);
        for_rows<kRowGroup<S>>(
            r0, r1, j0, j1, W, pair_rows<T>(3, W),
            [=](int64_t j) {
                return std::array<V, 3>{Elem<T>::load(m + j), Elem<T>::load(sc + j),
                                        Elem<T>::load(bb + j)};
            },
            [=](int64_t f, const std::array<V, 3>& c) {
                store_out(ys + f, V((ld(xs + f) - c[0]) * c[1] + c[2]), st);
            },
            last);
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            y[e] = down<S>((up(x[e]) - mh[j]) * s[j] + b[j]);
        }
    }
};

// Gradient coefficients per column, and dx = a*dy - k*(x - mh) + c0 over
// rows; set() as in ColumnNormalize.
template <typename S>
struct ColumnGrad {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const std::vector<int64_t>& chan;
    std::vector<T> mh, a, k, c0;
    const S *dy, *x;
    S* dx;
    int64_t W;
    bool stream;
    ColumnGrad(const std::vector<int64_t>& chan_, const S* dy_, const S* x_, S* dx_, bool stream_)
        : chan(chan_), mh(chan_.size()), a(chan_.size()), k(chan_.size()), c0(chan_.size()),
          dy(dy_), x(x_), dx(dx_), W(int64_t(chan_.size())), stream(stream_) {}
    ColumnGrad& set(int64_t j0, int64_t j1, const std::vector<GradCoef<T>>& per) {
        for (int64_t j = j0; j < j1; ++j) {
            const GradCoef<T>& q = per[chan[j]];
            mh[j] = q.mh;
            a[j] = q.a;
            k[j] = q.k;
            c0[j] = q.c0;
        }
        return *this;
    }
    // Columns [lo, hi) that are channels: dbeta, dgamma and the coefficients
    // straight from the column sums (sdy, and sdyx_mh = sum dy*(x - mh)), as
    // grad_coef has them, in one loop the compiler vectorizes.
    ColumnGrad& set_channels(int64_t lo, int64_t hi, const double* __restrict sdy,
                             const double* __restrict sdyx_mh, const double* __restrict mean,
                             const double* __restrict invstd, const T* __restrict weight,
                             T* __restrict dweight, T* __restrict dbias, double n,
                             bool batch_stats) {
        T* __restrict cm = mh.data();
        T* __restrict ca = a.data();
        T* __restrict ck = k.data();
        T* __restrict cc = c0.data();
        for (int64_t c = lo; c < hi; ++c) {
            const double dgamma = dgamma_of<T>(sdy[c], sdyx_mh[c], mean[c], invstd[c]);
            const GradCoef<T> q = grad_coef(mean[c], invstd[c], weight, c, sdy[c], dgamma, n,
                                            batch_stats);
            dbias[c] = static_cast<T>(sdy[c]);
            dweight[c] = static_cast<T>(dgamma);
            cm[c] = q.mh;
            ca[c] = q.a;
            ck[c] = q.k;
            cc[c] = q.c0;
        }
        return *this;
    }
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V vmh[U], va[U], vk[U], vc[U];
        for (int u = 0; u < U; ++u) {
            vmh[u] = Elem<T>::load(mh.data() + j + u * kLanes);
            va[u] = Elem<T>::load(a.data() + j + u * kLanes);
            vk[u] = Elem<T>::load(k.data() + j + u * kLanes);
            vc[u] = Elem<T>::load(c0.data() + j + u * kLanes);
        }
        const S* const dys = dy;  // in locals, as in ColumnNormalize::run
        const S* const xs = x;
        S* const dxs = dx;
        const int64_t w = W;
        const bool st = stream;
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * w + j + u * kLanes;
                V t = ld(xs + e) - vmh[u];
                store_out(dxs + e, V(ld(dys + e) * va[u] + (vc[u] - t * vk[u])), st);
            }
    }
    // Rows [r0, r1), columns [j0, j1): one by one, or in pairs (for_rows).
    void rows(int64_t r0, int64_t r1, int64_t j0, int64_t j1) const {
        const T *const m = mh.data(), *const ca = a.data(), *const ck = k.data();
        const T* const cc = c0.data();
        const S *const dys = dy, *const xs = x;
        S* const dxs = dx;
        const bool st = stream;
        for_rows<kRowGroup<S>>(
            r0, r1, j0, j1, W, pair_rows<T>(4, W),
            [=](int64_t j) {
                return std::array<V, 4>{Elem<T>::load(m + j), Elem<T>::load(ca + j),
                                        Elem<T>::load(ck + j), Elem<T>::load(cc + j)};
            },
            [=](int64_t f, const std::array<V, 4>& c) {
                const V t = ld(xs + f) - c[0];
                store_out(dxs + f, V(ld(dys + f) * c[1] + (c[3] - t * c[2])), st);
            },
            [=](int64_t e, int64_t j) {
                dxs[e] = down<S>(up(dys[e]) * ca[j] + (cc[j] - (up(xs[e]) - m[j]) * ck[j]));
            });
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            dx[e] = down<S>(up(dy[e]) * a[j] + (c0[j] - (up(x[e]) - mh[j]) * k[j]));
        }
    }
};

// The elementwise passes (ColumnNormalize, ColumnGrad) over a block of rows:
// RB == 1, rows one by one in one loop each; else for_column_blocks.
template <typename S, typename Sweep>
void elementwise_blocks(const Block& k, int64_t W, const Sweep& sweep, int64_t RB) {
    if (RB == 1) return sweep.rows(k.r0, k.r1, k.j0, k.j1);
    for_column_blocks<S>(k, W, sweep, RB);
}

}  // namespace
