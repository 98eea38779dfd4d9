// Per-block logic of masked causal attention, written once for the CUDA kernels
// (csrc/kernels/attention_*.cu) and their CPU emulation (csrc/emulation/cpu_emulation.cpp).
//
// One kernel per path, the general (query-head) form: q [K, B, T, Hq, D], k / v [K, B, T, Hkv, D],
// q_counts [K] active query slots, kv_slot [K, Hq] the compact KV head of each slot (any map: a
// KV group may keep some of its query heads only; Hq need not be a multiple of Hkv). The KV-group
// form (counts KV heads, slot h reading h / G) is converted to it on the host
// (probprune_kernels/_shapes.py: group_slots).
//
// Grid: (query tile, query slot h, k * B + b). A block whose slot is not active for mask k
// (h >= q_counts[k]) writes zeros and exits without reading q, k, v or its kv_slot entry (which
// may be garbage); otherwise it reads KV head kv_slot[k, h] and walks the key tiles the causal
// mask lets its queries see, keeping a running max m and sum l per query row (online softmax,
// scores in log2 units): for a new tile with row max t,
//   m' = max(m, t), alpha = 2^(m - m'), p_j = 2^(s_j - m'), l' = l * alpha + sum_j p_j,
//   O' = O * alpha + P V,
// and finally O / l.
#pragma once

#include <cmath>

#include "probprune/common.h"

namespace probprune {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

// ---- heads, positions, causal bounds ------------------------------------------------------------

PP_HD bool head_active(int h, int q_count) { return h < q_count; }
// The KV head query slot h of mask k reads; only for active slots.
PP_HD int kv_head(const int* kv_slot, int k, int h, int Hq) {
  return kv_slot[static_cast<index_t>(k) * Hq + h];
}

// Keys a query tile [q0, q0 + bq) can see: [0, kv_end).
PP_HD int kv_end(int q0, int bq, int T) { return imin(T, q0 + bq); }

// Key position kpos is visible from query position qpos (both inside the sequence, causal).
PP_HD bool key_visible(int qpos, int kpos, int T) { return qpos < T && kpos < T && kpos <= qpos; }

// Rows [row_first, row_last] (sequence positions) need the key tile starting at kv0: some row is
// inside the sequence and at or after kv0. A warp whose rows do not skips the tile (alpha = 1).
PP_HD bool rows_see_tile(int row_first, int row_last, int kv0, int T) {
  return row_first < T && kv0 <= row_last;
}

// Offset of element d of head h at (kb = k * B + b, t) in a [K, B, T, H, D] tensor.
PP_HD index_t bthd_offset(int kb, int t, int h, int d, int T, int H, int D) {
  return ((static_cast<index_t>(kb) * T + t) * H + h) * static_cast<index_t>(D) + d;
}

// ---- online softmax ----------------------------------------------------------------------------

// New running max for a tile whose (masked) row max is tile_max; returns alpha, the factor that
// rescales the old sum and output. A row that has seen no visible key yet keeps m = -inf and
// alpha = 1 (its sum and output are still zero).
PP_HD float softmax_rescale(float m_old, float tile_max, float* m_new) {
  const float m = fmaxf(m_old, tile_max);
  *m_new = m;
  if (m == -INFINITY) return 1.0f;
  return exp2f(m_old - m);  // m_old = -inf gives 0
}

PP_HD float softmax_prob(float s, float m_new, bool visible) {
  return visible ? exp2f(s - m_new) : 0.0f;
}

PP_HD float softmax_sum(float l_old, float alpha, float tile_sum) { return l_old * alpha + tile_sum; }

// 1 / l, or 0 for a row that saw no key (only rows beyond the sequence; never written).
PP_HD float softmax_finish(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }

// ---- tensor-core (WMMA) path: fp16 / bf16, head_dim <= DMAX ------------------------------------

template <int DMAX_>
struct TcAttnConfig {
  static constexpr int DMAX = DMAX_;
  static constexpr int BQ = 64, BKV = 64;
  static constexpr int WARPS = 4, THREADS = 32 * WARPS;
  static constexpr int ROWS_PER_WARP = BQ / WARPS;             // 16: one fragment row
  static constexpr int VEC = 8;                                // 16-byte chunks
  static constexpr int LDQ = DMAX + 8;                         // Q, K, V rows (2-byte elements)
  static constexpr int LDS = BKV + 4;                          // scores (fp32)
  static constexpr int LDP = BKV + 8;                          // probabilities (2-byte)
  static constexpr int LDO = DMAX + 4;                         // output accumulator (fp32)
  static constexpr int FD = DMAX / 16, FKV = BKV / 16;         // fragments along D and keys
  static constexpr int CHUNKS_PER_ROW = DMAX / VEC;
  static_assert(ROWS_PER_WARP == 16, "one 16-row fragment strip per warp");
  static_assert(DMAX % 16 == 0, "DMAX");

  static constexpr int align128(int b) { return (b + 127) / 128 * 128; }
  // Byte offsets of the shared-memory regions (dynamic shared memory). Q is staged once and kept
  // in registers (fragments) afterwards, so its staging area is the score area: the barrier that
  // opens every key tile separates the last Q fragment load from the first score store.
  static constexpr int K_OFF = 0;
  static constexpr int V_OFF = K_OFF + align128(BKV * LDQ * 2);
  static constexpr int S_OFF = V_OFF + align128(BKV * LDQ * 2);
  static constexpr int Q_OFF = S_OFF;
  static constexpr int P_OFF = S_OFF + align128(BQ * LDS * 4);
  static constexpr int O_OFF = P_OFF + align128(BQ * LDP * 2);
  static constexpr int L_OFF = O_OFF + align128(BQ * LDO * 4);
  static constexpr int SMEM_BYTES = L_OFF + align128(BQ * 4);
  static_assert(BQ * LDQ * 2 <= P_OFF - S_OFF, "Q staging fits in the score area");
};

// Chunk c of a [rows][DMAX] tile load: tile row and first column.
template <class Cfg>
PP_HD void attn_chunk_coord(int c, int& row, int& col) {
  row = c / Cfg::CHUNKS_PER_ROW;
  col = (c % Cfg::CHUNKS_PER_ROW) * Cfg::VEC;
}

// Softmax lanes: lane handles row lane/2 of its warp's strip, key columns [c0, c0 + BKV/2) and
// output columns [d0, d0 + DMAX/2).
template <class Cfg>
PP_HD void softmax_lane_coord(int lane, int& row, int& c0, int& d0) {
  row = lane >> 1;
  c0 = (lane & 1) * (Cfg::BKV / 2);
  d0 = (lane & 1) * (Cfg::DMAX / 2);
}

// ---- FMA path: fp32 (and fp16/bf16 with head_dim > 128), head_dim <= 256 ----------------------

struct FmaAttnConfig {
  static constexpr int BQ = 16, BKV = 32;
  static constexpr int WARPS = 4, THREADS = 32 * WARPS;
  static constexpr int ROWS_PER_WARP = BQ / WARPS;             // 4 query rows per warp
  static constexpr int DMAX = 256;
  static constexpr int DPL = DMAX / 32;                        // output dims per lane
  static_assert(BKV == 32, "one key per lane");
};

// Odd smem row stride (floats) for head_dim D: lane j reading row j of K hits distinct banks.
PP_HD int fma_attn_ld(int D) { return D | 1; }
PP_HD int fma_attn_smem_bytes(int D) {
  return (FmaAttnConfig::BQ + 2 * FmaAttnConfig::BKV) * fma_attn_ld(D) * 4;
}
// Tile row handled by warp w, slot rr; output dim of lane, slot i.
PP_HD int fma_attn_row(int w, int rr) { return w * FmaAttnConfig::ROWS_PER_WARP + rr; }
PP_HD int fma_attn_dim(int lane, int i) { return lane + 32 * i; }

}  // namespace attn
}  // namespace probprune
