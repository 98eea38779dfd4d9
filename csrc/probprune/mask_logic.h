// Per-block logic of mask sampling and compaction, written once for the CUDA kernel
// (csrc/kernels/mask_kernels.cu) and its CPU emulation (csrc/emulation/cpu_emulation.cpp).
//
// One block per mask k. The block walks the n units in chunks of kThreads * kItems; thread `tid`
// owns kItems consecutive units of each chunk, counts its kept ones, and a block-wide exclusive
// prefix sum (Hillis-Steele over shared memory, log2(kThreads) steps) gives where its kept ids go.
// Ids at positions >= capacity are dropped (counts still report the true number, as the
// reference does); positions from counts[k] to capacity are zero-filled.
#pragma once

#include "probprune/common.h"

namespace probprune {
namespace mask {

constexpr int kThreads = 256;          // threads per block (a power of two: the scan needs it)
constexpr int kItems = 4;              // consecutive units per thread and chunk
constexpr int kChunk = kThreads * kItems;
constexpr int kScanSteps = 8;          // log2(kThreads)
static_assert((1 << kScanSteps) == kThreads, "kScanSteps must be log2(kThreads)");
static_assert(kScanSteps % 2 == 0, "an even number of scan steps leaves the result in buffer 0");

// Bernoulli draw shared by sample_masks and sample_compact: keep unit when u < p.
template <typename F>
PP_HD bool sample_bit(F u, F p) { return u < p; }

// Unit handled by thread `tid`, item `item` of the chunk starting at `base`.
PP_HD int chunk_unit(int base, int tid, int item) { return base + tid * kItems + item; }

// One Hillis-Steele step of an inclusive scan: dst[tid] = src[tid] + src[tid - offset].
// The kernel runs it for offset = 1, 2, 4, ... with a barrier after each step, swapping buffers.
PP_HD void scan_step(const int* src, int* dst, int tid, int offset) {
  dst[tid] = src[tid] + (tid >= offset ? src[tid - offset] : 0);
}

// Buffer holding the scan result after `steps` steps started from buffer 0.
PP_HD int scan_result_buffer(int steps) { return steps & 1; }

// First output position of thread `tid`'s kept units: running total of earlier chunks plus the
// exclusive prefix (inclusive scan minus the thread's own count).
PP_HD int first_position(int running, int inclusive, int local) { return running + inclusive - local; }

// Writes kept unit `unit` at position `pos` of the mask's index row when it fits the capacity.
PP_HD void emit_index(int* idx_row, int capacity, int pos, int unit) {
  if (pos < capacity) idx_row[pos] = unit;
}

// Position `p` of the index row is padding (zero) when it is at or beyond the kept count.
PP_HD bool is_padding(int p, int count) { return p >= count; }

}  // namespace mask
}  // namespace probprune
