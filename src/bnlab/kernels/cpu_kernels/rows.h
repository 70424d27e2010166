// Periodic rows (channels_last, (N, C), (N, C, L) with short L): blocks of rows, when
// rows stream, panels, the channel of each column. Part of the batch-norm CPU kernels:
// cpu_kernels.h describes the whole.

#pragma once

#include "statistics.h"

namespace {

// Rows are taken in blocks (at most kBlock rows, about kBlockBytes) and, within
// a block, U vectors of columns at a time down the rows, so per-column
// coefficients and partial sums stay in registers. Wide rows (kWideRow bytes
// or more) are streamed one after the other instead, which memory serves
// faster than many short strided runs; their sums (and those of narrower rows
// read from memory, stream_sums) go through per-column partial sums in T that
// are carried into float64 every kBlock rows. Every
// sweep covers the rows [r0, r1) and columns [j0, j1) of its thread.

constexpr int64_t kBlockBytes = 16384;
constexpr int64_t kWideRow = 2048;

template <typename S>
bool wide_rows(int64_t W) {
    return W * int64_t(sizeof(S)) >= kWideRow;
}

template <typename T>
constexpr int kUnroll = sizeof(T) == 4 ? 4 : 2;  // vectors of columns per sweep

template <typename S>
int64_t rows_per_block(int64_t W) {
    if (wide_rows<S>(W)) return 1;
    int64_t r = kBlockBytes / (W * int64_t(sizeof(S)));
    return r < 1 ? 1 : (r > kBlock ? kBlock : r);
}

// A rectangle of a periodic array: rows [r0, r1), columns [j0, j1).
struct Block {
    int64_t r0, r1, j0, j1;
};

// Rows of kStreamRow bytes or more that come from memory are read whole, one
// after the other: memory serves them faster than a block's strided runs.
// The sums stream them when a thread's share of the rows is more than its L2
// holds (channels_last ResNet stages of 256 and 512 channels: backward sums
// 1.1-1.25x faster, float32 forward 1.1-1.2x, 16-bit forward 2-6% slower);
// a share the caches hold sums faster in registers.
constexpr int64_t kStreamRow = 512;
constexpr int64_t kStreamSumsShare = int64_t(1) << 20;

template <typename S>
bool stream_sums(int64_t W, const Block& k) {
    const int64_t row = W * int64_t(sizeof(S));
    return wide_rows<S>(W) || (row >= kStreamRow && (k.r1 - k.r0) * row > kStreamSumsShare);
}

// Rows per block of the elementwise passes over periodic rows. Tensors a
// core's L2 holds take blocks of kBlock rows (coefficients loaded once per
// block: (32, 4096) 16-bit inference ran 1.1-1.3x faster so than row by row).
// Beyond L2, rows of kStreamRow bytes or more are taken one by one
// (channels_last ResNet stages of 256 and 512 channels: backward 1.1-1.5x and
// inference 1.2-1.5x faster than in blocks of 16 rows; wide rows, 16 rows 4 KiB
// apart, also fall in one set of the L1 cache), narrower ones in blocks.
template <typename S>
int64_t elementwise_rows(int64_t W, int64_t numel) {
    const int64_t row = W * int64_t(sizeof(S)), bytes = numel * int64_t(sizeof(S));
    if (bytes < kBeyondL2Bytes) return kBlock;
    if (row >= kStreamRow) return 1;
    return bytes <= kStreamBytes ? kBlock : rows_per_block<S>(W);
}

// Rows by column: a thread takes its channels a panel at a time, a panel
// being as many columns as keep all its rows (of `bytes` per value, summed
// over the tensors read) within kPanelBytes (see its definition).

int64_t panel_channels(const Geometry& g, int64_t rows, int64_t bytes) {
    int64_t columns = kPanelBytes / (rows * bytes);
    if (columns < 4 * kLanes) columns = 4 * kLanes;
    int64_t channels = columns / g.inner;
    if (g.inner == 1) channels = channels / kAlign * kAlign;  // whole vectors
    return channels < 1 ? 1 : channels;
}

// The channel of each column of a periodic row of width W (a multiple of the
// period): column j holds channel (j % P) / inner. Counted, not divided.
std::vector<int64_t> column_channels(const Geometry& g, int64_t W) {
    std::vector<int64_t> chan(W);
    int64_t c = 0, i = 0;
    for (int64_t j = 0; j < W; ++j) {
        chan[j] = c;
        if (++i == g.inner) {
            i = 0;
            if (++c == g.C) c = 0;
        }
    }
    return chan;
}

// Per-column copies of a per-channel value.
template <typename T, typename F>
std::vector<T> columns(const std::vector<int64_t>& chan, F per_channel) {
    std::vector<T> out(chan.size());
    for (size_t j = 0; j < chan.size(); ++j) out[j] = per_channel(chan[j]);
    return out;
}

// Calls sweep.template run<U>(rb, re, j) over the block's rows, RB rows at a
// time (default: by the row's width), and whole vectors of its columns, then
// sweep.scalar(rb, re, j) for the columns left over.
template <typename S, typename Sweep>
void for_column_blocks(const Block& k, int64_t W, const Sweep& sweep, int64_t RB = 0) {
    constexpr int U = kUnroll<Compute<S>>;
    if (RB <= 0) RB = rows_per_block<S>(W);
    for (int64_t rb = k.r0; rb < k.r1; rb += RB) {
        const int64_t re = min64(k.r1, rb + RB);
        int64_t j = k.j0;
        for (; j + U * kLanes <= k.j1; j += U * kLanes) sweep.template run<U>(rb, re, j);
        for (; j + kLanes <= k.j1; j += kLanes) sweep.template run<1>(rb, re, j);
        for (; j < k.j1; ++j) sweep.scalar(rb, re, j);
    }
}

}  // namespace
