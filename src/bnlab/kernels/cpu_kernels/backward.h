// The backward: dweight, dbias and dx, with batch or running statistics. Part of the
// batch-norm CPU kernels: cpu_kernels.h describes the whole.

#pragma once

#include "plane_group_sums.h"
#include "row_sums.h"
#include "row_elementwise.h"

namespace {

template <typename S, typename T = Compute<S>>
void backward(const S* dy, const S* x, S* dx, const T* w, const double* mean, const double* invstd,
              T* dw, T* db, bool batch_stats, const Geometry& g, int threads) {
    const int64_t C = g.C, inner = g.inner, numel = g.numel();
    const double n = static_cast<double>(g.n());
    const int team = team_size(numel, threads);
    const bool stream = numel * int64_t(sizeof(S)) >= kStreamBytes;
    // mh first (the sums need it); the rest once the sums are known. The sums
    // give sum dy*(x - mh); sum dy*(x - mean) is that minus ml*sum dy.
    std::vector<GradCoef<T>> coef(C);
    for (int64_t c = 0; c < C; ++c) coef[c] = grad_coef(mean[c], invstd[c], w, c, 0, 0, n, false);
    auto finish = [&](int64_t c, double sdy, double sdyx_mh) {
        const double dgamma = dgamma_of<T>(sdy, sdyx_mh, mean[c], invstd[c]);
        db[c] = static_cast<T>(sdy);
        dw[c] = static_cast<T>(dgamma);
        coef[c] = grad_coef(mean[c], invstd[c], w, c, sdy, dgamma, n, batch_stats);
    };

    if (g.planes()) {
        std::vector<double> partial;
        parallel(team, [&](const int t, const int T_) {
            if (split_of(g, sizeof(S), T_) == kByChannel) {
                int64_t c0, c1;
                split(C, t, T_, 1, &c0, &c1);
                const FetchAhead ahead = fetch_ahead<S>(g);
                // Channel c's sums over its runs (the next channel's fetched
                // ahead unless c is the thread's last), and its coefficients.
                auto channel_sums = [&](int64_t c) {
                    const bool next = ahead.reads && c + 1 < c1;
                    Sums<T> sums;
                    for (int64_t o = 0; o < g.outer; ++o) {
                        const int64_t off = (o * C + c) * inner;
                        if (next) {
                            prefetch_run(dy + off + inner, inner, false);
                            prefetch_run(x + off + inner, inner, false);
                        }
                        grad_sums(dy + off, x + off, inner, coef[c].mh, sums);
                    }
                    double sdy = 0, sdyx = 0;
                    sums.add_to(&sdy, &sdyx);
                    finish(c, sdy, sdyx);
                };
                int64_t c = c0;
                if constexpr (std::is_same<T, float>::value) {
                    // Short planes in groups, as the training forward takes
                    // them: a block's sums (plane_group_sums.h), then its dx.
                    // Against a run at a time, the groups' dx ran 1.1-1.2x
                    // faster over 16-bit 7x7 and 6x6 planes, 1.25-1.5x over
                    // float32's.
                    if (trains_in_groups<S>(g, kBackwardPass)) {
                        const PlaneGroup pg(g);
                        const GradTerms<S> terms{dy, x};
                        GroupGradCoef q;
                        T mh[kLanes] = {};
                        double sdy[kLanes], sdyx[kLanes];
                        c = in_channel_groups(
                            pg, g, c0, c1,
                            [&](int64_t c) {
                                for (int64_t j = 0; j < pg.G; ++j) mh[j] = coef[c + j].mh;
                                group_sums(terms, pg, g, c, mh, ahead.reads, sdy, sdyx);
                                for (int64_t j = 0; j < pg.G; ++j) {
                                    finish(c + j, sdy[j], sdyx[j]);
                                    q.set(j, coef[c + j]);
                                }
                            },
                            [&](int64_t off) {
                                grad_group(dy + off, x + off, dx + off, pg, q, stream);
                            });
                    }
                }
                channels_run_by_run(c, c1, g, dx, ahead.writes, channel_sums, [&](int64_t ch) {
                    const GradCoef<T> q = coef[ch];
                    return [=](int64_t off) {
                        grad_run(dy + off, x + off, dx + off, inner, q, stream);
                    };
                });
            } else {
                planes_by_element<T>(
                    g, t, T_, partial,
                    [&](int64_t c, int64_t off, int64_t len, Sums<T>& sums) {
                        grad_sums(dy + off, x + off, len, coef[c].mh, sums);
                    },
                    finish,
                    [&](int64_t c, int64_t off, int64_t len) {
                        grad_run(dy + off, x + off, dx + off, len, coef[c], stream);
                    });
            }
        });
        return;
    }

    const int64_t W = g.width(), rows = numel / W, tail = rows * W;
    const std::vector<int64_t> chan = column_channels(g, W);
    const std::vector<T> MH = columns<T>(chan, [&](int64_t c) { return coef[c].mh; });
    std::vector<double> partial;
    ColumnGrad<S>* grad = nullptr;
    parallel(team, [&](const int t, const int T_) {
        if (split_of(g, sizeof(S), T_) == kByColumn) {  // as in forward_train
            int64_t c0, c1;
            split(C, t, T_, inner == 1 ? kAlign : 1, &c0, &c1);
            std::vector<double> acc(size_t(2 * W), 0.0);
            ColumnGrad<S> grad_cols(chan, dy, x, dx, stream);
            const int64_t pc = panel_channels(g, rows, 2 * sizeof(S));  // dy and x
            for (int64_t p0 = c0; p0 < c1; p0 += pc) {
                const int64_t p1 = min64(c1, p0 + pc);
                const Block k{0, rows, p0 * inner, p1 * inner};
                for_column_blocks<S>(
                    k, W, ColumnGradSums<S>{dy, x, W, MH.data(), acc.data(), acc.data() + W},
                    kBlock);
                if (inner == 1) {  // a column is a channel
                    grad_cols.set_channels(p0, p1, acc.data(), acc.data() + W, mean, invstd, w,
                                           dw, db, n, batch_stats);
                } else {
                    for (int64_t c = p0; c < p1; ++c) {
                        double sdy = 0, sdyx = 0;
                        for (int64_t j = c * inner; j < (c + 1) * inner; ++j) {
                            sdy += acc[j];
                            sdyx += acc[W + j];
                        }
                        finish(c, sdy, sdyx);
                    }
                    grad_cols.set(k.j0, k.j1, coef);
                }
                for_column_blocks<S>(k, W, grad_cols, kBlock);
            }
            return;
        }
#pragma omp single
        partial.assign(size_t(T_) * 2 * W, 0.0);
        double* acc = partial.data() + int64_t(t) * 2 * W;
        int64_t r0, r1;
        split(rows, t, T_, 1, &r0, &r1);
        const Block k{r0, r1, 0, W};
        periodic_grad_sums(ColumnGradSums<S>{dy, x, W, MH.data(), acc, acc + W}, k);
#pragma omp barrier
#pragma omp single
        {
            std::vector<double> sdy(C, 0.0), sdyx(C, 0.0);
            for (int u = 0; u < T_; ++u)
                for (int64_t j = 0; j < W; ++j) {
                    sdy[chan[j]] += partial[u * 2 * W + j];
                    sdyx[chan[j]] += partial[u * 2 * W + W + j];
                }
            for (int64_t e = tail; e < numel; ++e) {
                const int64_t c = chan[e - tail];
                const T g_ = up(dy[e]);
                sdy[c] += static_cast<double>(g_);
                sdyx[c] += static_cast<double>(g_ * (up(x[e]) - coef[c].mh));
            }
            for (int64_t c = 0; c < C; ++c) finish(c, sdy[c], sdyx[c]);
            grad = &(new ColumnGrad<S>(chan, dy, x, dx, stream))->set(0, W, coef);
        }
        elementwise_blocks<S>(k, W, *grad, elementwise_rows<S>(W, numel));
    });
    delete grad;
    for (int64_t e = tail; e < numel; ++e) {
        const GradCoef<T>& q = coef[chan[e - tail]];
        dx[e] = down<S>(up(dy[e]) * q.a + (q.c0 - (up(x[e]) - q.mh) * q.k));
    }
}

}  // namespace
