// Fused ReLU + 2x2 max pooling (stride 2, floor) on the CPU.
//
// y = max of relu over each 2x2 window = relu(max of the window): the numbers
// of ReLU followed by MaxPool2d(2), in one pass instead of two (ReLU, then the
// pool). The forward stores no indices: the backward finds each window's
// winner again from x and y, as torch's pool picks it (a later value wins
// only if greater, or NaN): where y > 0, the first position holding y; where
// y is NaN, the last NaN; where y is 0 (the maximum is <= 0), none, since ReLU
// passes no gradient. Storing a uint8 index per output made the forward's
// loops mix float and byte lanes, which compilers vectorize only for rows far
// longer than LeNet-5's; the float-only forward is several times faster
// (benchmarks/bench_pool.py), and the backward pays one extra read of x. Backward writes every dx value once: dy
// at the winner, 0 elsewhere, also in rows or columns past the last window.
//
// Layouts: NCHW walks planes of one channel; channels_last (memory N, H, W, C)
// walks rows of windows with the channels innermost. Both take the vertical
// maximum of a row pair first (one long contiguous loop), then the horizontal.
//
// Threads: rows of windows (or planes) are split across the OpenMP team (the
// caller passes torch.get_num_threads()); small inputs run on fewer.

#include "bnlab_native.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// Branch-free by construction: the winner is data-dependent, so jumps would
// mispredict about half the time on random data (benchmarks/bench_pool.py), and
// compilers turn plain ?: on floats back into jumps. pick() selects bits.
template <typename T>
inline T pick(bool take, T yes, T no) {
    typedef typename Bits<T>::u U;
    U a, b;
    std::memcpy(&a, &yes, sizeof(T));
    std::memcpy(&b, &no, sizeof(T));
    const U mask = U(0) - U(take);
    const U r = (a & mask) | (b & ~mask);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}

// The pool's running maximum: v replaces m if greater, or NaN.
template <typename T>
inline T pool_max(T m, T v) {
    return pick((v > m) | (v != v), v, m);
}

// ReLU of a window maximum: 0 where it is <= 0; NaN passes.
template <typename T>
inline T relu_of(T m) {
    return pick(m <= T(0), T(0), m);
}

struct PoolShape {
    int64_t N, C, H, W;
    int64_t Ho() const { return H / 2; }
    int64_t Wo() const { return W / 2; }
};

constexpr int64_t kPoolChunk = 1024;  // values of a row pair's vertical maximum kept on the stack

// f(std::integral_constant<int, lane>) for NCHW rows (lane 1) and the small
// channel counts of channels_last rows, f(std::integral_constant<int, 0>)
// (lane known at run time) otherwise. With the lane fixed, a pixel's channels
// compile to vector operations; with it unknown they stay scalar: LeNet-5's
// 6-channel pool backward ran 4x slower, and its NCHW backward 2x slower.
template <typename F>
inline void with_lane(int64_t lane, F f) {
    switch (lane) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        case 8: f(std::integral_constant<int, 8>{}); break;
        default: f(std::integral_constant<int, 0>{});
    }
}

// One row of windows: top and bottom input rows hold Wo windows of `lane`
// adjacent values each side by side (lane = 1 for NCHW, C for channels_last),
// and y gets Wo * lane outputs. Order within a window: top-left, top-right,
// bottom-left, bottom-right; the vertical maximum first is the same value
// (max is order-free, and any NaN makes the result NaN either way).
template <typename T, int FixedLane = 0>
void pool_row(const T* __restrict top, const T* __restrict bottom, T* __restrict y, int64_t Wo,
              int64_t runtime_lane) {
    const int64_t lane = FixedLane ? FixedLane : runtime_lane;
    T v[kPoolChunk];
    const int64_t per_chunk = kPoolChunk / (2 * lane) > 0 ? kPoolChunk / (2 * lane) : 1;
    for (int64_t j0 = 0; j0 < Wo; j0 += per_chunk) {
        const int64_t j1 = min64(j0 + per_chunk, Wo);
        if (2 * lane > kPoolChunk) {  // very wide channels: window by window
            for (int64_t j = j0; j < j1; ++j) {
                const T* p = top + 2 * j * lane;
                const T* q = bottom + 2 * j * lane;
                for (int64_t c = 0; c < lane; ++c)
                    y[j * lane + c] = relu_of(pool_max(pool_max(pool_max(p[c], p[lane + c]), q[c]),
                                                       q[lane + c]));
            }
            continue;
        }
        const int n = int(2 * (j1 - j0) * lane), l = int(lane);
        const T* __restrict p = top + 2 * j0 * lane;
        const T* __restrict q = bottom + 2 * j0 * lane;
        for (int e = 0; e < n; ++e) v[e] = pool_max(p[e], q[e]);
        T* __restrict out = y + j0 * lane;
        const int windows = int(j1 - j0);
        if (l == 1) {
            for (int j = 0; j < windows; ++j) out[j] = relu_of(pool_max(v[2 * j], v[2 * j + 1]));
        } else {
            for (int j = 0; j < windows; ++j)
                for (int c = 0; c < l; ++c)
                    out[j * l + c] = relu_of(pool_max(v[2 * j * l + c], v[(2 * j + 1) * l + c]));
        }
    }
}

// NCHW with an even width: `rows` rows of windows of one plane at once. The
// vertical maxima of all their row pairs lie side by side in v, so the
// horizontal pass is one long loop however short the rows (LeNet-5's 10-wide
// rows; benchmarks/bench_pool.py times (64, 16, 10, 10)).
template <typename T>
void pool_rows_nchw(const T* __restrict x, T* __restrict y, int64_t rows, int64_t W) {
    T v[kPoolChunk];
    for (int64_t i = 0; i < rows; ++i) {
        const T* __restrict p = x + 2 * i * W;
        const T* __restrict q = p + W;
        T* __restrict vi = v + i * W;
        for (int64_t k = 0; k < W; ++k) vi[k] = pool_max(p[k], q[k]);
    }
    const int64_t outs = rows * W / 2;
    for (int64_t o = 0; o < outs; ++o) y[o] = relu_of(pool_max(v[2 * o], v[2 * o + 1]));
}

template <typename T>
void relu_maxpool_forward(const T* x, T* y, const PoolShape& s, bool channels_last, int threads) {
    const int64_t Ho = s.Ho(), Wo = s.Wo(), H = s.H, W = s.W, C = s.C;
    if (!channels_last && W % 2 == 0 && W <= kPoolChunk) {
        const int64_t group = kPoolChunk / W;  // rows of windows per call
        parallel(team_size(s.N * C * H * W, threads), [&](int t, int T_) {
            int64_t begin, end;
            split(s.N * C, t, T_, 1, &begin, &end);
            for (int64_t plane = begin; plane < end; ++plane)
                for (int64_t i = 0; i < Ho; i += group)
                    pool_rows_nchw(x + (plane * H + 2 * i) * W, y + (plane * Ho + i) * Wo,
                                   min64(group, Ho - i), W);
        });
        return;
    }
    const int64_t rows = channels_last ? s.N * Ho : s.N * C * Ho;  // rows of windows
    const int64_t lane = channels_last ? C : 1;
    parallel(team_size(s.N * C * H * W, threads), [&](int t, int T_) {
        int64_t begin, end;
        split(rows, t, T_, 1, &begin, &end);
        with_lane(lane, [&](auto fixed) {
            // r = (n, i) for channels_last, (n, c, i) for NCHW: the same arithmetic,
            // with a "plane" of H rows of W * lane values.
            int64_t plane = begin / Ho, i = begin % Ho;
            for (int64_t r = begin; r < end; ++r) {
                const T* top = x + (plane * H + 2 * i) * W * lane;
                pool_row<T, decltype(fixed)::value>(top, top + W * lane, y + r * Wo * lane, Wo,
                                                    lane);
                if (++i == Ho) i = 0, ++plane;
            }
        });
    });
}

// dx of one window from its four inputs, its output m and the output gradient g.
// The general case, NaN included.
template <typename T>
inline void unpool_window(T a, T b, T c, T d, T m, T g, T* da, T* db, T* dc, T* dd) {
    const bool live = m > T(0);  // the window's maximum passed ReLU
    const bool ea = a == m, eb = b == m, ec = c == m, ed = d == m;  // all false for NaN m
    const bool na = a != a, nb = b != b, nc = c != c, nd = d != d;
    const bool nan = m != m;
    // first position holding m; last NaN
    const bool wa = (live & ea) | (nan & na & !nb & !nc & !nd);
    const bool wb = (live & eb & !ea) | (nan & nb & !nc & !nd);
    const bool wc = (live & ec & !ea & !eb) | (nan & nc & !nd);
    const bool wd = (live & ed & !ea & !eb & !ec) | (nan & nd);
    *da = pick(wa, g, T(0));
    *db = pick(wb, g, T(0));
    *dc = pick(wc, g, T(0));
    *dd = pick(wd, g, T(0));
}

// One row of windows without NaN outputs (so none in its inputs): the gradient
// g (0 where ReLU stopped it) goes to the first position holding m: a chain of
// branch-free selects.
template <typename T, int FixedLane = 0>
void unpool_row(const T* __restrict p, const T* __restrict q, const T* __restrict m,
                const T* __restrict g, T* __restrict dp, T* __restrict dq, int64_t Wo,
                int64_t lane) {
    const int wo = int(Wo), l = FixedLane ? FixedLane : int(lane);
    for (int j = 0; j < wo; ++j)
        for (int c = 0; c < l; ++c) {
            const int o = j * l + c, left = 2 * j * l + c, right = left + l;
            const T mo = m[o];
            T rest = pick(mo > T(0), g[o], T(0));
            const bool ea = p[left] == mo;
            dp[left] = pick(ea, rest, T(0));
            rest = pick(ea, T(0), rest);
            const bool eb = p[right] == mo;
            dp[right] = pick(eb, rest, T(0));
            rest = pick(eb, T(0), rest);
            const bool ec = q[left] == mo;
            dq[left] = pick(ec, rest, T(0));
            dq[right] = pick(ec, T(0), rest);
        }
}

template <typename T>
void relu_maxpool_backward(const T* dy, const T* x, const T* y, T* dx, const PoolShape& s,
                           bool channels_last, int threads) {
    const int64_t Ho = s.Ho(), Wo = s.Wo(), H = s.H, W = s.W, C = s.C;
    const int64_t planes = channels_last ? s.N : s.N * C;
    const int64_t lane = channels_last ? C : 1;
    parallel(team_size(s.N * C * H * W, threads), [&](int t, int T_) {
        int64_t begin, end;
        split(planes, t, T_, 1, &begin, &end);
        const int64_t row = W * lane, outs = Wo * lane;
        for (int64_t r = begin; r < end; ++r) {  // one image (channels_last) or plane (NCHW)
            const T* xs = x + r * H * row;
            T* ds = dx + r * H * row;
            for (int64_t i = 0; i < Ho; ++i) {
                const T* p = xs + 2 * i * row;
                const T* q = p + row;
                T* dp = ds + 2 * i * row;
                T* dq = dp + row;
                const T* m = y + (r * Ho + i) * outs;
                const T* g = dy + (r * Ho + i) * outs;
                bool nan = false;
                for (int64_t o = 0; o < outs; ++o) nan |= m[o] != m[o];
                if (!nan) {
                    with_lane(lane, [&](auto fixed) {
                        unpool_row<T, decltype(fixed)::value>(p, q, m, g, dp, dq, Wo, lane);
                    });
                } else {
                    for (int64_t j = 0; j < Wo; ++j)
                        for (int64_t c = 0; c < lane; ++c) {
                            const int64_t o = j * lane + c, left = 2 * j * lane + c;
                            const int64_t right = left + lane;
                            unpool_window(p[left], p[right], q[left], q[right], m[o], g[o],
                                          dp + left, dp + right, dq + left, dq + right);
                        }
                }
                if (W % 2) {  // the last column belongs to no window
                    for (int64_t c = 0; c < lane; ++c) dp[(W - 1) * lane + c] = dq[(W - 1) * lane + c] = T(0);
                }
            }
            for (int64_t e = 2 * Ho * row; e < H * row; ++e) ds[e] = T(0);  // the last odd row
        }
    });
}

// ---- Python functions ----------------------------------------------------------------------
//
// Called only through bnlab/speedups/_ext.py, which checks the tensors and
// derives every size and flag from them. x, y, dy and dx are float64 if
// is_double, else float32, all NCHW or all channels_last as the flag says.

// relu_maxpool_forward(x, y, is_double, N, C, H, W, channels_last, threads)
PyObject* py_relu_maxpool_forward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 9, "relu_maxpool_forward")) return nullptr;
    void *x = ptr(a[0]), *y = ptr(a[1]);
    const bool is_double = i64(a[2]) != 0;
    const PoolShape s{i64(a[3]), i64(a[4]), i64(a[5]), i64(a[6])};
    const bool channels_last = i64(a[7]) != 0;
    const int threads = int(i64(a[8]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(s.N * s.C * s.H * s.W);
    if (is_double)
        relu_maxpool_forward(static_cast<const double*>(x), static_cast<double*>(y), s,
                             channels_last, threads);
    else
        relu_maxpool_forward(static_cast<const float*>(x), static_cast<float*>(y), s,
                             channels_last, threads);
    Py_RETURN_NONE;
}

// relu_maxpool_backward(dy, x, y, dx, is_double, N, C, H, W, channels_last, threads)
PyObject* py_relu_maxpool_backward(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
    if (!check_nargs(nargs, 11, "relu_maxpool_backward")) return nullptr;
    void *dy = ptr(a[0]), *x = ptr(a[1]), *y = ptr(a[2]), *dx = ptr(a[3]);
    const bool is_double = i64(a[4]) != 0;
    const PoolShape s{i64(a[5]), i64(a[6]), i64(a[7]), i64(a[8])};
    const bool channels_last = i64(a[9]) != 0;
    const int threads = int(i64(a[10]));
    if (PyErr_Occurred()) return nullptr;
    MaybeReleaseGil gil(s.N * s.C * s.H * s.W);
    if (is_double)
        relu_maxpool_backward(static_cast<const double*>(dy), static_cast<const double*>(x),
                              static_cast<const double*>(y), static_cast<double*>(dx), s,
                              channels_last, threads);
    else
        relu_maxpool_backward(static_cast<const float*>(dy), static_cast<const float*>(x),
                              static_cast<const float*>(y), static_cast<float*>(dx), s,
                              channels_last, threads);
    Py_RETURN_NONE;
}

}  // namespace

// Added to the module by module.cpp.
PyMethodDef bnlab_relu_maxpool_methods[] = {
    {"relu_maxpool_forward", fastcall<py_relu_maxpool_forward>(), METH_FASTCALL,
     "ReLU then 2x2 max pooling, fused."},
    {"relu_maxpool_backward", fastcall<py_relu_maxpool_backward>(), METH_FASTCALL,
     "Gradient of the fused ReLU + 2x2 max pooling."},
    {nullptr, nullptr, 0, nullptr}};
