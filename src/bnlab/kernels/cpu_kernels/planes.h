// Passes over contiguous runs of one channel (the plane traversal). Part of the batch-norm
// CPU kernels: cpu_kernels.h describes the whole.

#pragma once

#include "statistics.h"

namespace {

// Shifted sums of one run: s1 += sum(x - K), s2 += sum((x - K)^2).
template <typename S, typename T = Compute<S>>
__attribute__((always_inline)) inline void shifted_sums(const S* x, int64_t len, T K, Sums<T>& s) {
    typedef VecOf<S> V;
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        V d = ld(x + i) - K, e = ld(x + i + kLanes) - K;
        s.a1 += d;
        s.a2 += d * d;
        s.b1 += e;
        s.b2 += e * e;
        s.step();
    }
    if (i + kLanes <= len) {
        V d = ld(x + i) - K;
        s.a1 += d;
        s.a2 += d * d;
        i += kLanes;
    }
    if (i < len && len >= kLanes) {
        V d = (ld(x + len - kLanes) - K) * tail_ones<T>(len - i);
        s.b1 += d;
        s.b2 += d * d;
    } else {
        for (; i < len; ++i) {
            double d = static_cast<double>(up(x[i]) - K);
            s.r1 += d;
            s.r2 += d * d;
        }
    }
    s.step();
}

// Gradient sums of one run: s1 += sum(dy), s2 += sum(dy*(x - mh)).
template <typename S, typename T = Compute<S>>
__attribute__((always_inline)) inline void grad_sums(const S* dy, const S* x, int64_t len, T mh, Sums<T>& s) {
    typedef VecOf<S> V;
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        V g = ld(dy + i), h = ld(dy + i + kLanes);
        s.a1 += g;
        s.a2 += g * (ld(x + i) - mh);
        s.b1 += h;
        s.b2 += h * (ld(x + i + kLanes) - mh);
        s.step();
    }
    if (i + kLanes <= len) {
        V g = ld(dy + i);
        s.a1 += g;
        s.a2 += g * (ld(x + i) - mh);
        i += kLanes;
    }
    if (i < len && len >= kLanes) {
        const int64_t last = len - kLanes;
        V g = ld(dy + last) * tail_ones<T>(len - i);
        s.b1 += g;
        s.b2 += g * (ld(x + last) - mh);
    } else {
        for (; i < len; ++i) {
            const T g = up(dy[i]);
            s.r1 += static_cast<double>(g);
            s.r2 += static_cast<double>(g * (up(x[i]) - mh));
        }
    }
    s.step();
}

// Runs of a streamed output shorter than this take ordinary stores: 14x14
// bfloat16 planes (392 bytes) ran 0.8x streamed, 14x14 float32 ones (784
// bytes) 1.25-1.5x, ResNet's 28x28 stage 1.3-1.9x (by-channel training passes
// on 1 and 2 threads; elementwise_run writes no line both ways).
constexpr int64_t kStreamRunBytes = 512;

// A channel of (outer, C, inner) is `outer` runs a plane apart. When runs are
// short (ResNet's 56x56 stage in 16 bits, its 28x28, 14x14 and 7x7 stages:
// 6272 to 98 bytes), each is too short and too far from the last for the
// hardware prefetchers, and the by-channel passes wait on memory at every
// run. The next channel's run o lies right after this channel's, so while a
// channel is summed, the same runs of its successor are fetched into L2; while
// it is written, the lines its successor's outputs go to are fetched into L1
// (runs shorter than kStreamRunBytes always take ordinary stores).
constexpr int64_t kPrefetchRunBytes = 8192;  // fp32 56x56 planes (12544 bytes) ran 8% slower
// Smaller tensors stay in a core's L2 between passes, where the requests only
// cost: LeNet-5's conv1 (1.2 MB) ran 10% slower with them, ResNet's stages
// (6-13 MB) 10-45% faster.
constexpr int64_t kPrefetchMinBytes = kBeyondL2Bytes;

// What the by-channel passes fetch of a channel's successor: its inputs'
// runs, and the lines of its outputs.
struct FetchAhead {
    bool reads, writes;
};
template <typename S>
inline FetchAhead fetch_ahead(const Geometry& g) {
    const int64_t run = g.inner * int64_t(sizeof(S));
    const bool reads =
        run < kPrefetchRunBytes && g.numel() * int64_t(sizeof(S)) >= kPrefetchMinBytes;
    return FetchAhead{reads, reads && run < kStreamRunBytes};
}

template <typename S>
inline void prefetch_run(const S* p, int64_t len, bool for_write) {
    constexpr uintptr_t line = kLineBytes;
    uintptr_t q = reinterpret_cast<uintptr_t>(p) & ~(line - 1);
    const uintptr_t end = reinterpret_cast<uintptr_t>(p + len);
    for (; q < end; q += line) {
        if (for_write)
            __builtin_prefetch(reinterpret_cast<const void*>(q), 1, 3);
        else
            __builtin_prefetch(reinterpret_cast<const void*>(q), 0, 2);
    }
}

// Ordinary stores of out[i, e) of a run of len values (len >= kLanes), f giving
// the vector at an index; none writes outside [i, e). A ragged end is taken
// from a vector inside the run and copied through a buffer.
template <typename S, typename Vector>
inline void store_span(S* out, int64_t i, int64_t e, int64_t len, Vector f) {
    for (; i + kLanes <= e; i += kLanes) store_out(out + i, f(i), false);
    if (i < e) {
        const int64_t v = min64(i, len - kLanes);  // v <= i and e <= v + kLanes
        alignas(64) S part[kLanes];
        store_out(part, f(v), false);
        std::memcpy(out + i, part + (i - v), size_t(e - i) * sizeof(S));
    }
}

// out[i] = f(i) over a run of len values (len >= kLanes), streamed: the cache
// lines that lie wholly inside the run are written around the caches, and the
// part lines at its ends with ordinary stores that reach no further. A line
// written both ways (a streamed vector, then an overlapping ordinary one)
// leaves the line half-written in the write-combining buffer, which cost more
// than the streaming saved ((32, 256, 18, 18) float32 training, 1296-byte
// runs: 0.6x). Not inlined: in elementwise_run's loop, GCC then compiled the
// ordinary stores of 16-bit inference 1.2-1.4x slower.
template <typename S, typename Vector>
__attribute__((noinline)) void streamed_run(S* out, int64_t len, Vector f) {
    constexpr int64_t L = kLineValues<S>;
    const uintptr_t to_line =
        (kLineBytes - (reinterpret_cast<uintptr_t>(out) & (kLineBytes - 1))) & (kLineBytes - 1);
    const int64_t head = min64(len, int64_t(to_line / sizeof(S)));
    const int64_t body = head + (len - head) / L * L;  // [head, body): whole lines
    store_span(out, 0, head, len, f);
    int64_t i = head;
    if constexpr (Pair<S>::joint)
        for (; i + 2 * kLanes <= body; i += 2 * kLanes)
            Pair<S>::store(out + i, f(i), f(i + kLanes), true);
    for (; i + kLanes <= body; i += kLanes) store_out(out + i, f(i), true);
    store_span(out, i, len, len, f);  // the tail (and float64's last line of half a vector)
}

// out[i] = f(i) over one run, f giving a vector at i (or a value, scalar). A
// ragged end recomputes an overlapping vector. Runs of kStreamRunBytes or
// more are streamed when asked (streamed_run). Types that narrow two vectors
// in one instruction (Pair<S>::joint) store them two at a time.
template <typename S, typename Vector, typename Scalar>
inline void elementwise_run(S* out, int64_t len, bool stream, Vector f, Scalar f1) {
    if (len < kLanes) {
        for (int64_t i = 0; i < len; ++i) out[i] = down<S>(f1(i));
        return;
    }
    if (stream && len * int64_t(sizeof(S)) >= kStreamRunBytes) return streamed_run(out, len, f);
    int64_t i = 0;
    if constexpr (Pair<S>::joint) {
        for (; i + 2 * kLanes <= len; i += 2 * kLanes)
            Pair<S>::store(out + i, f(i), f(i + kLanes), false);
        if (i == len) return;
    }
    for (;; i += kLanes) {
        if (i > len - kLanes) i = len - kLanes;
        store_out(out + i, f(i), false);
        if (i == len - kLanes) break;
    }
}

// y = (x - mh)*s + b over one run; y = x*s + b where mh is 0 (uncentered
// coefficients, affine_of), one subtraction fewer per vector.
template <typename S, typename T = Compute<S>>
void normalize_run(const S* x, S* y, int64_t len, Affine<T> c, bool stream) {
    typedef VecOf<S> V;
    if (c.mh == T(0))
        return elementwise_run(
            y, len, stream, [&](int64_t i) { return V(ld(x + i) * c.s + c.b); },
            [&](int64_t i) { return up(x[i]) * c.s + c.b; });
    elementwise_run(
        y, len, stream, [&](int64_t i) { return V((ld(x + i) - c.mh) * c.s + c.b); },
        [&](int64_t i) { return (up(x[i]) - c.mh) * c.s + c.b; });
}

// dx = a*dy - k*(x - mh) + c0 over one run.
template <typename S, typename T = Compute<S>>
void grad_run(const S* dy, const S* x, S* dx, int64_t len, GradCoef<T> q, bool stream) {
    typedef VecOf<S> V;
    elementwise_run(
        dx, len, stream,
        [&](int64_t i) { return V(ld(dy + i) * q.a + (q.c0 - (ld(x + i) - q.mh) * q.k)); },
        [&](int64_t i) { return up(dy[i]) * q.a + (q.c0 - (up(x[i]) - q.mh) * q.k); });
}

// The by-channel passes' channels [c, c1), one at a time: sums(c) (the
// channel's sums over its runs, and what follows from them), then run(off) over
// each of its runs for run = elementwise(c), the next channel's runs of `out`
// fetched ahead for writing where `fetch_out` says (FetchAhead::writes).
template <typename S, typename ChannelSums, typename Elementwise>
inline void channels_run_by_run(int64_t c, int64_t c1, const Geometry& g, const S* out,
                                bool fetch_out, ChannelSums sums, Elementwise elementwise) {
    for (; c < c1; ++c) {
        const bool next_out = fetch_out && c + 1 < c1;
        sums(c);
        const auto run = elementwise(c);
        for (int64_t o = 0; o < g.outer; ++o) {
            const int64_t off = (o * g.C + c) * g.inner;
            if (next_out) prefetch_run(out + off + g.inner, g.inner, true);
            run(off);
        }
    }
}

// fn(channel, offset, length) for the pieces of planes inside elements [e0, e1).
template <typename F>
inline void for_plane_pieces(const Geometry& g, int64_t e0, int64_t e1, F fn) {
    for (int64_t e = e0; e < e1;) {
        int64_t plane = e / g.inner;
        int64_t stop = min64((plane + 1) * g.inner, e1);
        fn(plane % g.C, e, stop - e);
        e = stop;
    }
}

// The by-element split of a pass over planes, as thread t of T runs it inside
// the team's parallel region: equal element ranges; sum(c, off, len, sums)
// into the thread's per-channel sums over its pieces of planes; after a
// barrier, one thread combines every thread's (through `partial`, shared:
// (T, 2, C) in float64) and calls finish(c, s1, s2) for each channel; then
// elementwise(c, off, len) over the thread's pieces.
template <typename T, typename Sum, typename Finish, typename Elementwise>
void planes_by_element(const Geometry& g, int t, int T_, std::vector<double>& partial, Sum sum,
                       Finish finish, Elementwise elementwise) {
    const int64_t C = g.C;
#pragma omp single
    partial.assign(size_t(T_) * 2 * C, 0.0);
    std::vector<Sums<T>> sums(C);
    int64_t e0, e1;
    split(g.numel(), t, T_, kAlign, &e0, &e1);
    for_plane_pieces(g, e0, e1,
                     [&](int64_t c, int64_t off, int64_t len) { sum(c, off, len, sums[c]); });
    double* mine = partial.data() + int64_t(t) * 2 * C;
    for (int64_t c = 0; c < C; ++c) sums[c].add_to(mine + c, mine + C + c);
#pragma omp barrier
#pragma omp single
    for (int64_t c = 0; c < C; ++c) {
        double s1 = 0, s2 = 0;
        for (int u = 0; u < T_; ++u) {
            s1 += partial[u * 2 * C + c];
            s2 += partial[u * 2 * C + C + c];
        }
        finish(c, s1, s2);
    }
    for_plane_pieces(g, e0, e1, elementwise);
}

}  // namespace
