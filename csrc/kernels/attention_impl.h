// What the two attention paths (csrc/kernels/attention_*.cu) share: their internal entry points
// and the device code both run.
#pragma once

#include "kernels/device_utils.cuh"
#include "probprune/attention_logic.h"
#include "probprune/launchers.h"

namespace probprune {
namespace detail {

// Tensor-core path for fp16 / bf16 with head_dim <= 128. Sets *ran = false (and enqueues nothing)
// when the device cannot give the kernel its shared memory; the caller then takes the FMA path.
cudaError_t attention_tc(DType dt, const void* q, const void* k, const void* v,
                         const int* q_counts, const int* kv_slot, void* o, int K, int B, int T,
                         int Hq, int Hkv, int D, float scale_log2, cudaStream_t stream, bool* ran);

// FMA path: any dtype, head_dim <= kMaxHeadDim.
cudaError_t attention_fma(DType dt, const void* q, const void* k, const void* v,
                          const int* q_counts, const int* kv_slot, void* o, int K, int B, int T,
                          int Hq, int Hkv, int D, float scale_log2, cudaStream_t stream);

// Largest dynamic shared memory a block of the current device may opt in to.
int max_dynamic_smem();

// Where a block of either path works (grid: query tile, query slot h, kb = k * B + b): sets h,
// kb, the tile's first query q0 and the KV head kvh that h reads. A block whose slot is inactive
// for its mask writes zeros in its tile's rows of o (those inside the sequence), without reading
// q, k, v or kv_slot, and gets false.
template <class Cfg, typename T>
__device__ __forceinline__ bool enter_query_tile(const int* q_counts, const int* kv_slot, T* o,
                                                 int B, int T_, int Hq, int D, int& h, int& kb,
                                                 int& q0, int& kvh) {
  h = blockIdx.y;
  kb = blockIdx.z;
  q0 = blockIdx.x * Cfg::BQ;
  if (!attn::head_active(h, q_counts[kb / B])) {
    for (int e = threadIdx.x; e < Cfg::BQ * D; e += Cfg::THREADS) {
      int r, d;
      tile_elem_coord(e, D, r, d);
      if (q0 + r < T_) o[attn::bthd_offset(kb, q0 + r, h, d, T_, Hq, D)] = dev::from_f<T>(0.0f);
    }
    return false;
  }
  kvh = attn::kv_head(kv_slot, kb / B, h, Hq);
  return true;
}

}  // namespace detail
}  // namespace probprune
