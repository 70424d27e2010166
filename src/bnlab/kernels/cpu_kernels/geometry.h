// The geometry of one call, how a team of threads splits it, and the first touch of fresh
// outputs. Part of the batch-norm CPU kernels: cpu_kernels.h describes the whole.

#pragma once

#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// The shape of one call: memory is (outer, C, inner), contiguous.
struct Geometry {
    int64_t outer, C, inner;
    int64_t numel() const { return outer * C * inner; }
    int64_t n() const { return outer * inner; }  // values per channel
    int64_t period() const { return C * inner; }
    // Planes when a channel's runs are long, or at least a vector long where
    // a periodic row would be too wide to be whole vectors (wide-channel,
    // small-spatial NCHW such as ResNet's 7x7 stages).
    bool planes() const { return inner >= kPlaneMin || (inner >= kLanes && period() > kMaxWidth); }
    // Width of a periodic row: a multiple of the period, whole vectors when affordable.
    int64_t width() const {
        int64_t p = period();
        int64_t w = p / gcd(p, kLanes) * kLanes;
        return w <= kMaxWidth ? w : p;
    }
};

// Whether inference writes its output of S around the caches: planes from
// kStreamEvalBytes, rows from kStreamBytes. Rows whose vectors are narrowed to
// 16 bytes (16-bit values in 8 lanes) never: built for AVX2, (8192, 1024)
// bfloat16 inference ran 1.35x faster so and channels_last inference the same
// (0.99-1.05x).
template <typename S>
bool streams_inference(const Geometry& g) {
    const int64_t bytes = g.numel() * int64_t(sizeof(S));
    if (g.planes()) return bytes >= kStreamEvalBytes;
    return bytes >= kStreamBytes && kLanes * sizeof(S) >= 32;
}

enum Split { kByChannel, kByElement, kByRow, kByColumn };
const char* const kSplitNames[] = {"planes by channel", "planes by element", "rows by row",
                                   "rows by column"};

// How a team of T threads shares the work of g (elements of `bytes` each).
Split split_of(const Geometry& g, int64_t bytes, int T) {
    if (g.planes()) {
        // Whole channels per thread when that balances: every thread the same number, or many.
        return g.C % T == 0 || g.C >= 8 * T ? kByChannel : kByElement;
    }
    // Columns map to channels one to one only when a row is one period.
    const int64_t W = g.width();
    const bool one_period = W == g.period();
    // ... and only for few rows: a panel of 16 vectors of columns must take
    // all rows within kPanelBytes, or the strided reads would not stream.
    const bool few_rows = g.outer * 16 * kLanes * bytes <= kPanelBytes;
    return one_period && few_rows && g.C >= T && W * bytes >= kColumnShareBytes * T ? kByColumn
                                                                                     : kByRow;
}

// Fresh outputs are first touched here; on Linux, huge pages make that several
// times cheaper for large tensors (one fault per 2 MiB instead of per 4 KiB).
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = uintptr_t(1) << 21;
    if (bytes < int64_t(4 * huge)) return;
    uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
    uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

}  // namespace
