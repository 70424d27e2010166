// The training forward: batch statistics, the running update, and y. Part of the batch-
// norm CPU kernels: cpu_kernels.h describes the whole.

#pragma once

#include "row_elementwise.h"
#include "plane_group_sums.h"
#include "row_sums.h"

namespace {

template <typename S, typename T = Compute<S>>
void forward_train(const S* x, S* y, const T* w, const T* b, const Stats& stats, const Running& run,
                   double eps, const Geometry& g, int threads) {
    const int64_t C = g.C, inner = g.inner, numel = g.numel();
    const double n = static_cast<double>(g.n());
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(S)) >= kStreamBytes;
    const std::vector<T> K = shifts(x, g);

    if (g.planes()) {
        std::vector<double> partial;  // (threads, 2, C): element split only
        parallel(team, [&](const int t, const int T_) {
            if (split_of(g, sizeof(S), T_) == kByChannel) {
                int64_t c0, c1;
                split(C, t, T_, 1, &c0, &c1);
                const FetchAhead ahead = fetch_ahead<S>(g);
                // Channel c's sums over its runs (the next channel's fetched
                // ahead unless c is the thread's last), statistics and running update.
                auto channel_stats = [&](int64_t c) {
                    const bool next = ahead.reads && c + 1 < c1;
                    Sums<T> sums;
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        if (next) prefetch_run(x + off + inner, inner, false);
                        shifted_sums(x + off, inner, K[c], sums);
                    }
                    double s1 = 0, s2 = 0;
                    sums.add_to(&s1, &s2);
                    finish_channel(c, n, K.data(), s1, s2, eps, run, stats);
                };
                int64_t c = c0;
                if constexpr (std::is_same<T, float>::value) {
                    // Short planes: a block of G channels' statistics at a
                    // time (plane_group_sums.h), then the block's planes image
                    // by image in groups (plane_groups.h). Against a run at a
                    // time, the groups' y ran 1.1-1.4x faster over 16-bit 7x7,
                    // 6x6 and 4x5 planes, 1.2-1.8x over float32's, (32, 2048,
                    // 7, 7) included (1.46-1.75x). Taking every channel's
                    // statistics first, then y in one pass, ran 0.74-0.98x at
                    // 2-8 MB on an Intel Xeon (16-bit 6x6, and 10x10 on two
                    // threads: 0.99-1.03x); it had measured 1.15-1.2x on an
                    // AMD EPYC, with run-at-a-time sums. Fetching the next
                    // image's group of y ahead, as the runs do, ran float32
                    // 0.72-0.9x and 16-bit no faster.
                    if (trains_in_groups<S>(g, kForwardPass)) {
                        const PlaneGroup pg(g);
                        const ShiftedTerms<S> terms{x};
                        T Kg[kLanes] = {}, mh[kLanes] = {}, s[kLanes] = {}, bb[kLanes] = {};
                        double s1[kLanes], s2[kLanes];
                        // The block's statistics and coefficients.
                        auto block_coefficients = [&](int64_t c) {
                            for (int64_t j = 0; j < pg.G; ++j) Kg[j] = K[c + j];
                            group_sums(terms, pg, g, c, Kg, ahead.reads, s1, s2);
                            for (int64_t j = 0; j < pg.G; ++j) {
                                finish_channel(c + j, n, K.data(), s1[j], s2[j], eps, run, stats);
                                const Affine<T> a =
                                    affine_of(stats.mean[c + j], stats.invstd[c + j], w, b, c + j);
                                mh[j] = a.mh;
                                s[j] = a.s;
                                bb[j] = a.b;
                            }
                        };
                        c = in_channel_groups(pg, g, c0, c1, block_coefficients, [&](int64_t off) {
                            normalize_group<S, true>(x + off, y + off, pg, mh, s, bb, stream);
                        });
                    }
                }
                channels_run_by_run(c, c1, g, y, ahead.writes, channel_stats, [&](int64_t ch) {
                    const Affine<T> a = affine_of(stats.mean[ch], stats.invstd[ch], w, b, ch);
                    return [=](int64_t off) { normalize_run(x + off, y + off, inner, a, stream); };
                });
            } else {
                planes_by_element<T>(
                    g, t, T_, partial,
                    [&](int64_t c, int64_t off, int64_t len, Sums<T>& sums) {
                        shifted_sums(x + off, len, K[c], sums);
                    },
                    [&](int64_t c, double s1, double s2) {
                        finish_channel(c, n, K.data(), s1, s2, eps, run, stats);
                    },
                    [&](int64_t c, int64_t off, int64_t len) {
                        normalize_run(x + off, y + off, len,
                                      affine_of(stats.mean[c], stats.invstd[c], w, b, c), stream);
                    });
            }
        });
        return;
    }

    // Periodic rows of width W, then the last numel % W elements one by one.
    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const std::vector<int64_t> chan = column_channels(g, W);
    const std::vector<T> KW = columns<T>(chan, [&](int64_t c) { return K[c]; });
    std::vector<double> partial;
    std::vector<Affine<T>> per(C);
    ColumnNormalize<S>* norm = nullptr;
    parallel(team, [&](const int t, const int T_) {
        if (split_of(g, sizeof(S), T_) == kByColumn) {
            // A row is one period (rows = outer, no tail): this thread's
            // channels own the columns [c0*inner, c1*inner) of every row,
            // taken a panel at a time so the second pass finds it in cache.
            int64_t c0, c1;
            split(C, t, T_, inner == 1 ? kAlign : 1, &c0, &c1);
            std::vector<double> acc(size_t(2 * W), 0.0);
            ColumnNormalize<S> norm(&chan, W, x, y, stream);
            const int64_t pc = panel_channels(g, rows, sizeof(S));
            for (int64_t p0 = c0; p0 < c1; p0 += pc) {
                const int64_t p1 = min64(c1, p0 + pc);
                const Block k{0, rows, p0 * inner, p1 * inner};
                for_column_blocks<S>(
                    k, W, ColumnSums<S>{x, W, KW.data(), acc.data(), acc.data() + W}, kBlock);
                if (inner == 1) {  // a column is a channel
                    finish_stats(p0, p1, n, K.data(), acc.data(), acc.data() + W, eps, run, stats);
                    norm.set_channels(p0, p1, stats.mean, stats.invstd, w, b);
                } else {
                    for (int64_t c = p0; c < p1; ++c) {
                        double s1 = 0, s2 = 0;
                        for (int64_t j = c * inner; j < (c + 1) * inner; ++j) {
                            s1 += acc[j];
                            s2 += acc[W + j];
                        }
                        finish_channel(c, n, K.data(), s1, s2, eps, run, stats);
                        per[c] = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
                    }
                    norm.set(k.j0, k.j1, per);
                }
                for_column_blocks<S>(k, W, norm, kBlock);
            }
            return;
        }
#pragma omp single
        partial.assign(size_t(T_) * 2 * W, 0.0);
        double* acc = partial.data() + int64_t(t) * 2 * W;
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        const Block k{r0, r1, 0, W};
        periodic_sums(ColumnSums<S>{x, W, KW.data(), acc, acc + W}, k);
#pragma omp barrier
#pragma omp single
        {
            std::vector<double> s1(C, 0.0), s2(C, 0.0);
            for (int u = 0; u < T_; ++u)
                for (int64_t j = 0; j < W; ++j) {
                    s1[chan[j]] += partial[u * 2 * W + j];
                    s2[chan[j]] += partial[u * 2 * W + W + j];
                }
            for (int64_t e = tail; e < numel; ++e) {
                const int64_t c = chan[e - tail];
                const double d = static_cast<double>(up(x[e]) - K[c]);
                s1[c] += d;
                s2[c] += d * d;
            }
            finish_stats(0, C, n, K.data(), s1.data(), s2.data(), eps, run, stats);
            for (int64_t c = 0; c < C; ++c)
                per[c] = affine_of(stats.mean[c], stats.invstd[c], w, b, c);
            norm = &(new ColumnNormalize<S>(&chan, W, x, y, stream))->set(0, W, per);
        }
        elementwise_blocks<S>(k, W, *norm, elementwise_rows<S>(W, numel));
    });
    delete norm;
    for (int64_t e = tail; e < numel; ++e) {
        const Affine<T>& a = per[chan[e - tail]];
        y[e] = down<S>((up(x[e]) - a.mh) * a.s + a.b);
    }
}

}  // namespace
