// Sums over periodic rows, per column: the shifted sums of x, and the sums of dy and
// dy*(x - mh). Part of the batch-norm CPU kernels: cpu_kernels.h describes the whole.

#pragma once

#include "rows.h"

namespace {

// acc1[j] += sum_r (x[r, j] - K[j]), acc2[j] += sum_r (x[r, j] - K[j])^2.
template <typename S>
struct ColumnSums {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const S* x;
    int64_t W;
    const T* K;
    double *acc1, *acc2;
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V k[U], a1[U], a2[U];
        for (int u = 0; u < U; ++u) {
            k[u] = Elem<T>::load(K + j + u * kLanes);
            a1[u] = V{};
            a2[u] = V{};
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                V d = ld(x + r * W + j + u * kLanes) - k[u];
                a1[u] += d;
                a2[u] += d * d;
            }
        for (int u = 0; u < U; ++u) {
            double* p1 = acc1 + j + u * kLanes;
            double* p2 = acc2 + j + u * kLanes;
            store<kLanes>(p1, vd(load<kLanes>(p1) + to_double<T>(a1[u])));
            store<kLanes>(p2, vd(load<kLanes>(p2) + to_double<T>(a2[u])));
        }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            double d = static_cast<double>(up(x[r * W + j]) - K[j]);
            acc1[j] += d;
            acc2[j] += d * d;
        }
    }
};

// Streamed rows: add(rows, r, j, p1, p2) adds the vectors of columns j of rows
// [r, r + rows) (rows a compile-time 4 or 1: four rows read side by side
// share one update of the partial sums) to the T-precision partial sums p1,
// p2 (arrays of W), carried into acc1, acc2 every kBlock rows. Columns past
// the last whole vector go to add_scalar(r, j, acc1 + j, acc2 + j).
// ahead(r, j) fetches the line at column j of rows [r, r + 4), called once per
// `line` columns for the next four rows: four rows read side by side are four
// streams a few KiB long, which the hardware prefetchers follow late (16-bit
// (8192, 1024) passes ran 1.2-1.3x faster with it; float32 unchanged).
template <typename T, typename Add, typename AddScalar, typename Ahead>
void stream_rows(const Block& k, int64_t W, double* acc1, double* acc2, Add add,
                 AddScalar add_scalar, Ahead ahead, int64_t line) {
    std::vector<T> p1(W), p2(W);
    const int64_t jv = k.j0 + (k.j1 - k.j0) / kLanes * kLanes;  // end of the whole vectors
    for (int64_t rb = k.r0; rb < k.r1; rb += kBlock) {
        const int64_t re = min64(k.r1, rb + kBlock);
        int64_t r = rb;
        for (; r + 4 <= re; r += 4) {
            const bool fetch = r + 8 <= k.r1;
            for (int64_t j = k.j0; j < jv; j += kLanes) {
                if (fetch && (j & (line - 1)) == 0) ahead(r + 4, j);  // line: a power of 2
                add(std::integral_constant<int, 4>{}, r, j, p1.data() + j, p2.data() + j);
            }
        }
        for (; r < re; ++r)
            for (int64_t j = k.j0; j < jv; j += kLanes)
                add(std::integral_constant<int, 1>{}, r, j, p1.data() + j, p2.data() + j);
        for (r = rb; r < re; ++r)
            for (int64_t j = jv; j < k.j1; ++j) add_scalar(r, j, acc1 + j, acc2 + j);
        for (int64_t j = k.j0; j < jv; ++j) {
            acc1[j] += static_cast<double>(p1[j]);
            acc2[j] += static_cast<double>(p2[j]);
            p1[j] = p2[j] = T(0);
        }
    }
}

template <typename S>
void periodic_sums(const ColumnSums<S>& s, const Block& k) {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    if (!stream_sums<S>(s.W, k)) return for_column_blocks<S>(k, s.W, s);
    // s's fields copied into the closures: read through s, they were reloaded
    // after every store to the partial sums, which may alias s for all the
    // compiler knows.
    const S* const x = s.x;
    const T* const K = s.K;
    const int64_t W = s.W;
    stream_rows<T>(
        k, W, s.acc1, s.acc2,
        [=](auto rows, int64_t r, int64_t j, T* p1, T* p2) {
            const V kv = Elem<T>::load(K + j);
            V a1 = V{}, a2 = V{};
            for (int i = 0; i < decltype(rows)::value; ++i) {
                V d = ld(x + (r + i) * W + j) - kv;
                a1 += d;
                a2 += d * d;
            }
            Elem<T>::store(p1, V(Elem<T>::load(p1) + a1), false);
            Elem<T>::store(p2, V(Elem<T>::load(p2) + a2), false);
        },
        [=](int64_t r, int64_t j, double* a1, double* a2) {
            double d = static_cast<double>(up(x[r * W + j]) - K[j]);
            *a1 += d;
            *a2 += d * d;
        },
        [=](int64_t r, int64_t j) {
            for (int i = 0; i < 4; ++i) __builtin_prefetch(x + (r + i) * W + j, 0, 2);
        },
        kLineValues<S>);
}

// acc1[j] += sum_r dy[r, j], acc2[j] += sum_r dy[r, j]*(x[r, j] - MH[j]).
template <typename S>
struct ColumnGradSums {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    const S *dy, *x;
    int64_t W;
    const T* MH;
    double *acc1, *acc2;
    template <int U>
    inline void run(int64_t rb, int64_t re, int64_t j) const {
        V mh[U], a1[U], a2[U];
        for (int u = 0; u < U; ++u) {
            mh[u] = Elem<T>::load(MH + j + u * kLanes);
            a1[u] = V{};
            a2[u] = V{};
        }
        for (int64_t r = rb; r < re; ++r)
            for (int u = 0; u < U; ++u) {
                const int64_t e = r * W + j + u * kLanes;
                V g = ld(dy + e);
                a1[u] += g;
                a2[u] += g * (ld(x + e) - mh[u]);
            }
        for (int u = 0; u < U; ++u) {
            double* p1 = acc1 + j + u * kLanes;
            double* p2 = acc2 + j + u * kLanes;
            store<kLanes>(p1, vd(load<kLanes>(p1) + to_double<T>(a1[u])));
            store<kLanes>(p2, vd(load<kLanes>(p2) + to_double<T>(a2[u])));
        }
    }
    inline void scalar(int64_t rb, int64_t re, int64_t j) const {
        for (int64_t r = rb; r < re; ++r) {
            const int64_t e = r * W + j;
            const T g = up(dy[e]);
            acc1[j] += static_cast<double>(g);
            acc2[j] += static_cast<double>(g * (up(x[e]) - MH[j]));
        }
    }
};

template <typename S>
void periodic_grad_sums(const ColumnGradSums<S>& s, const Block& k) {
    typedef Compute<S> T;
    typedef VecOf<S> V;
    if (!stream_sums<S>(s.W, k)) return for_column_blocks<S>(k, s.W, s);
    const S* const dy = s.dy;  // in the closures, as in periodic_sums
    const S* const x = s.x;
    const T* const MH = s.MH;
    const int64_t W = s.W;
    stream_rows<T>(
        k, W, s.acc1, s.acc2,
        [=](auto rows, int64_t r, int64_t j, T* p1, T* p2) {
            const V mh = Elem<T>::load(MH + j);
            V a1 = V{}, a2 = V{};
            for (int i = 0; i < decltype(rows)::value; ++i) {
                const int64_t e = (r + i) * W + j;
                V g = ld(dy + e);
                a1 += g;
                a2 += g * (ld(x + e) - mh);
            }
            Elem<T>::store(p1, V(Elem<T>::load(p1) + a1), false);
            Elem<T>::store(p2, V(Elem<T>::load(p2) + a2), false);
        },
        [=](int64_t r, int64_t j, double* a1, double* a2) {
            const int64_t e = r * W + j;
            const T g = up(dy[e]);
            *a1 += static_cast<double>(g);
            *a2 += static_cast<double>(g * (up(x[e]) - MH[j]));
        },
        [=](int64_t r, int64_t j) {
            for (int i = 0; i < 4; ++i) {
                __builtin_prefetch(x + (r + i) * W + j, 0, 2);
                __builtin_prefetch(dy + (r + i) * W + j, 0, 2);
            }
        },
        kLineValues<S>);
}

}  // namespace
