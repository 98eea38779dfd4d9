// Per-block logic of the gather GEMMs, written once for the CUDA kernels
// (csrc/kernels/gather_*.cu) and their CPU emulation (csrc/emulation/cpu_emulation.cpp).
//
// Grid: (column tile, row tile, mask k). A block reads counts[k] on the device, turns it into the
// live extent counts[k] * group and, when its tile starts at or beyond that extent, writes its
// zeros and exits before touching x or w. Otherwise it runs a BM x BN x BK tiled GEMM with
// fp32 accumulation: tensor cores (WMMA 16x16x16) for fp16/bf16, plain FMA for fp32.
//
//   gather-rows  y[k, m, j] = sum_d x[k, m, d] * w[row(j), d] (+ bias[row(j)])  for j < live
//   swiglu       y[k, m, j] = silu(x[k,m] . w_gate[idx_k[j]]) * (x[k,m] . w_up[idx_k[j]])
//   gather-cols  y[k, m, n] = sum_{kk < live} h[k, m, kk] * w[n, row(kk)] (+ residual[k, m, n])
//
// with row(j) = idx_k[j / group] * group + j % group (units expanded inside the GEMM).
#pragma once

#include <cmath>
#include <type_traits>

#include "probprune/common.h"

namespace probprune {
namespace gemm {

// ---- index expansion and tile bounds --------------------------------------------------------

// Compact position j of mask k -> weight row (gather-rows) or column (gather-cols).
PP_HD int expand_index(const int* idx_k, int j, int group) {
  return idx_k[j / group] * group + j % group;
}

// Number of live compact positions of a mask: counts[k] units of `group` rows each.
PP_HD int live_extent(int count, int group) { return count * group; }

// A tile starting at `start` has nothing to compute when it begins at or beyond `live`.
PP_HD bool tile_dead(int start, int live) { return start >= live; }

// Weight row of compact position j, or -1 when j is beyond the live extent (loads give zero).
PP_HD int gathered_row(const int* idx_k, int j, int live, int group) {
  return j < live ? expand_index(idx_k, j, group) : -1;
}

PP_HD int num_k_tiles(int reduce_len, int bk) { return ceil_div(reduce_len, bk); }

// ---- tensor-core (WMMA) tiling: fp16 / bf16 ----------------------------------------------------

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_>
struct TcConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int WARPS = WARPS_M * WARPS_N;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int FM = WM / 16, FN = WN / 16;            // 16x16 fragments per warp
  static constexpr int VEC = 8;                               // 16-byte chunks of 2-byte elements
  static constexpr int LDS = BK + 8;                          // smem row stride (elements)
  static constexpr int CHUNKS_PER_ROW = BK / VEC;
  static constexpr int A_CHUNKS = BM * BK / VEC / THREADS;    // per thread and stage
  static constexpr int B_CHUNKS = BN * BK / VEC / THREADS;
  static constexpr int A_STAGE = BM * LDS, B_STAGE = BN * LDS;  // elements per smem stage
  static constexpr int SCRATCH = 16 * 16;                     // floats per warp and fragment
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0, "warp tiles of 16x16");
  static_assert(BK % 16 == 0 && BK % VEC == 0, "BK must hold whole k16 steps and chunks");
  static_assert((BM * BK / VEC) % THREADS == 0 && (BN * BK / VEC) % THREADS == 0,
                "every thread loads the same number of chunks");
  static_assert((LDS * 2) % 16 == 0, "rows stay 16-byte aligned");
  static_assert((16 * LDS * 2) % 32 == 0, "fragment pointers stay 256-bit aligned");
};

// Warp `warp` owns warp tile (wm, wn).
template <class Cfg>
PP_HD void warp_coord(int warp, int& wm, int& wn) {
  wm = warp / Cfg::WARPS_N;
  wn = warp % Cfg::WARPS_N;
}

// Load slot `slot` of thread `tid`: tile row `row`, columns [col, col + VEC). Consecutive threads
// take consecutive chunks of a row so that global loads coalesce.
template <class Cfg>
PP_HD void chunk_coord(int tid, int slot, int& row, int& col) {
  const int c = slot * Cfg::THREADS + tid;
  row = c / Cfg::CHUNKS_PER_ROW;
  col = (c % Cfg::CHUNKS_PER_ROW) * Cfg::VEC;
}

// The same slots for a B operand read k-major (gather-cols over a column-major weight, i.e. a
// row-major wt [Din, Dout]): a chunk is VEC consecutive tile rows (output features, contiguous in
// wt) at one reduction column `col`. KRUN consecutive threads take KRUN reduction columns and the
// next KRUN the following chunk of rows, so a warp reads 32/KRUN chunks of each gathered row of wt:
// whole 32-byte sectors, while its transposed smem stores spread over the banks.
template <class Cfg>
PP_HD void chunk_coord_kmajor(int tid, int slot, int& row, int& col) {
  constexpr int KRUN = Cfg::BK < 16 ? Cfg::BK : 16;
  constexpr int ROW_CHUNKS = Cfg::BN / Cfg::VEC;
  static_assert(Cfg::BK % KRUN == 0 && Cfg::BN % Cfg::VEC == 0, "k-major chunks tile B");
  const int c = slot * Cfg::THREADS + tid;
  const int run = c / KRUN;
  row = (run % ROW_CHUNKS) * Cfg::VEC;
  col = (run / ROW_CHUNKS) * KRUN + c % KRUN;
}

// Loader::B_KMAJOR (B staged with chunk_coord_kmajor), false for a loader that does not define it.
template <class L, class = void>
struct BKMajor : std::false_type {};
template <class L>
struct BKMajor<L, std::void_t<decltype(L::B_KMAJOR)>> : std::bool_constant<L::B_KMAJOR> {};

// smem element offset of a tile element (row-major, stride LDS) in a stage.
template <class Cfg>
PP_HD int smem_offset(int row, int col) { return row * Cfg::LDS + col; }

// smem offsets of the A fragment (fi, k16 step kk) and B fragment (fj, kk) of warp (wm, wn).
// A is row-major M x K; B is stored as [BN][LDS], i.e. the K x N operand in column-major order.
template <class Cfg>
PP_HD int a_frag_offset(int wm, int fi, int kk) {
  return smem_offset<Cfg>(wm * Cfg::WM + fi * 16, kk * 16);
}
template <class Cfg>
PP_HD int b_frag_offset(int wn, int fj, int kk) {
  return smem_offset<Cfg>(wn * Cfg::WN + fj * 16, kk * 16);
}

// Tile row / column of element (0, 0) of accumulator fragment (fi, fj) of warp (wm, wn).
template <class Cfg>
PP_HD int frag_row0(int wm, int fi) { return wm * Cfg::WM + fi * 16; }
template <class Cfg>
PP_HD int frag_col0(int wn, int fj) { return wn * Cfg::WN + fj * 16; }

// Epilogue: an accumulator fragment is stored row-major (ld 16) in the warp's fp32 scratch, and
// lane `lane` then handles elements e = 0..7 at (r, c) of it.
PP_HD void scratch_lane_coord(int lane, int e, int& r, int& c) {
  r = lane >> 1;
  c = (lane & 1) * 8 + e;
}

// ---- FMA tiling: fp32 ---------------------------------------------------------------------------

template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct FmaConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int TY = BM / TM, TX = BN / TN;             // thread grid of the block
  static constexpr int THREADS = TY * TX;
  static constexpr int VEC = 4;                                // 16-byte chunks of fp32
  static constexpr int LDS = BK + 1;                           // odd stride: no bank conflicts
  static constexpr int CHUNKS_PER_ROW = BK / VEC;
  static constexpr int A_CHUNKS = BM * BK / VEC / THREADS;
  static constexpr int B_CHUNKS = BN * BK / VEC / THREADS;
  static constexpr int A_STAGE = BM * LDS, B_STAGE = BN * LDS;
  static_assert(BM % TM == 0 && BN % TN == 0 && BK % VEC == 0, "tile shape");
  static_assert((BM * BK / VEC) % THREADS == 0 && (BN * BK / VEC) % THREADS == 0,
                "every thread loads the same number of chunks");
};

// Thread `tid` computes tile rows fma_row(tid, i), i < TM, and columns fma_col(tid, j), j < TN
// (strided by the thread grid, so a warp's stores of one row are contiguous).
template <class Cfg>
PP_HD int fma_row(int tid, int i) { return tid / Cfg::TX + i * Cfg::TY; }
template <class Cfg>
PP_HD int fma_col(int tid, int j) { return tid % Cfg::TX + j * Cfg::TX; }

// ---- the configurations the kernels use ---------------------------------------------------------

using RowsTc = TcConfig<128, 128, 32, 2, 4>;     // 8 warps, warp tile 64 x 32
using SwigluTc = TcConfig<128, 64, 32, 4, 2>;    // 8 warps, warp tile 32 x 32, gate + up
using ColsTc = TcConfig<128, 128, 32, 2, 4>;
using RowsFma = FmaConfig<64, 64, 16, 4, 4>;     // 256 threads, 4 x 4 outputs each
using SwigluFma = FmaConfig<64, 64, 16, 4, 4>;
using ColsFma = FmaConfig<64, 64, 16, 4, 4>;

// ---- epilogue math --------------------------------------------------------------------------------

// silu(g) * u in fp32 (g and u already rounded to the storage dtype, as the reference does).
PP_HD float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

}  // namespace gemm
}  // namespace probprune
