// Per-block logic of the fused lm_head + cross-entropy, written once for the CUDA kernels
// (csrc/kernels/lm_head_ce.cu) and their CPU emulation (csrc/emulation/cpu_emulation.cpp).
//
//   z[k, m, v] = h[k, m] . w[v]                       (fp32 accumulation, never stored globally)
//   nll[k, m]  = logsumexp_v z[k, m, v] - z[k, m, labels[k, m]]
//   loss[k]    = mean of nll[k, m] over the rows whose label is not ignore_index (NaN if none)
//
// Two kernels. The partial kernel, grid (row tile, mask k, vocabulary slice s): a block owns BM
// rows of one mask and the slice [s * span, min((s + 1) * span, V)); it walks the slice in BN-wide
// vocabulary tiles, each a GEMM on the engine of csrc/kernels/gemm_engine.cuh (A = the rows of h,
// B = the rows of w), stores the fp32 logit tile in shared memory and folds it into a running
// (max, sum) per row with the online softmax of attention_logic.h (log2 units), plus the logit at
// the row's label. It writes (max, sum, target) per row and slice to a workspace [3][K][S][M].
// The merge kernel, one block per mask: each thread folds the S partials of its rows the same way
// and the block averages the counted rows.
//
// The slices are the longest that still give the grid kCtasPerSm blocks per SM (M = 508 rows of
// K = 2 masks are 16 row tiles: without the split, 16 blocks each streaming the whole vocabulary),
// but at least kMinSplitTiles vocabulary tiles long; large M needs no split. The Triton kernel
// plans its slices the same way (probprune_kernels/triton/lm_head_ce.py: vocab_splits).
#pragma once

#include <cmath>

#include "probprune/attention_logic.h"
#include "probprune/common.h"
#include "probprune/gemm_logic.h"

namespace probprune {
namespace lm_head {

constexpr int kCtasPerSm = 4;
constexpr int kMinSplitTiles = 2;
constexpr int kMergeThreads = 256;
constexpr float kLn2 = 0.6931471805599453f;

// Both engines' tiles are BM x BN = 64 x 128: the fp32 logit tile (64 x 132 floats) overlays the
// finished GEMM stages in shared memory.
using Tc = gemm::TcConfig<64, 128, 32, 2, 4>;     // 8 warps, warp tile 32 x 32
using Fma = gemm::FmaConfig<64, 128, 16, 4, 8>;   // 256 threads, 4 x 8 outputs each

template <class Cfg>
struct Tile {
  static constexpr int LD = Cfg::BN + 4;           // row stride of the logit tile (floats)
  static constexpr int BYTES = Cfg::BM * LD * 4;
  static constexpr int WARPS = Cfg::THREADS / 32;
  static constexpr int ROWS_PER_WARP = Cfg::BM / WARPS;
  static constexpr int COLS_PER_LANE = Cfg::BN / 32;
  static_assert(Cfg::BM % WARPS == 0 && Cfg::BN % 32 == 0, "rows per warp, columns per lane");
  static_assert(LD % 4 == 0, "wmma stores need a row stride of whole 16-byte units");
};
static_assert(Tc::BM == Fma::BM && Tc::BN == Fma::BN, "one split plan for both engines");

// Vocabulary slices for K masks of M rows over V entries on sm_count SMs; the span of each slice
// (a whole number of BN tiles) comes from span_of.
PP_HD int num_splits(int K, int M, int V, int sm_count) {
  const int tiles = imax(ceil_div(V, Tc::BN), 1);
  const int row_blocks = imax(ceil_div(M, Tc::BM) * K, 1);
  const int want = ceil_div(kCtasPerSm * imax(sm_count, 1), row_blocks);
  const int per_split = imin(imax(tiles / want, kMinSplitTiles), tiles);
  return ceil_div(tiles, per_split);
}

// Vocabulary entries per slice for S slices: every slice starts inside V.
PP_HD int span_of(int V, int splits) {
  return ceil_div(imax(ceil_div(V, Tc::BN), 1), splits) * Tc::BN;
}

// The vocabulary range [begin, end) of slice s.
PP_HD void split_range(int s, int span, int V, int& begin, int& end) {
  begin = s * span;
  end = imin(begin + span, V);
}

// Offset of (quantity q, mask k, slice s, row m) in the [3][K][S][M] workspace; q = 0 the max
// (log2 units), 1 the sum, 2 the logit at the label.
PP_HD index_t part_offset(int q, int k, int s, int m, int K, int S, int M) {
  return ((static_cast<index_t>(q) * K + k) * S + s) * static_cast<index_t>(M) + m;
}

// Lane `lane` reads column col_of(lane, j), j < COLS_PER_LANE, of a row (consecutive lanes,
// consecutive columns: no bank conflicts).
PP_HD int col_of(int lane, int j) { return lane + 32 * j; }

// Tile row `i` of warp `warp`.
template <class Cfg>
PP_HD int row_of(int warp, int i) { return warp * Tile<Cfg>::ROWS_PER_WARP + i; }

// Running (max, sum) of a row after a tile (or a slice) whose own max is part_max and sum,
// relative to it, part_sum. part_max is finite: every tile and slice holds a vocabulary entry.
PP_HD void lse_fold(float& m, float& l, float part_max, float part_sum) {
  float m_new;
  const float alpha = attn::softmax_rescale(m, part_max, &m_new);
  l = attn::softmax_sum(l, alpha, part_sum * exp2f(part_max - m_new));
  m = m_new;
}

// nll of a row from its merged (max, sum) in log2 units and its logit at the label.
PP_HD float row_nll(float m, float l, float target) { return (m + log2f(l)) * kLn2 - target; }

PP_HD bool counted(long long label, long long ignore_index) { return label != ignore_index; }

PP_HD float mean_or_nan(float total, int count) { return count > 0 ? total / count : NAN; }

}  // namespace lm_head
}  // namespace probprune
