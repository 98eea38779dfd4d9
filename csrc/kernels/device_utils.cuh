// Device-only helpers shared by the kernels: dtype dispatch and conversion, 16-byte chunk loads
// with bounds, warp reductions. The index logic itself lives in csrc/probprune/*_logic.h (host +
// device).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "probprune/common.h"
#include "probprune/gemm_logic.h"
#include "probprune/launchers.h"

namespace probprune {
namespace dev {

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for the element type T of a float dtype (fp32, fp16, bf16): how a launcher
// picks its kernel instance. Other dtypes give cudaErrorInvalidValue.
template <class F>
cudaError_t with_float_type(DType dt, const F& f) {
  switch (dt) {
    case DType::F32:
      return f(TypeTag<float>{});
    case DType::F16:
      return f(TypeTag<__half>{});
    case DType::BF16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round an fp32 value to T and back (mirrors the reference's intermediate dtype rounding).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// VEC elements moved as one 16-byte access when aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zero_pack() {
  Pack<T, VEC> p;
#pragma unroll
  for (int e = 0; e < VEC; ++e) p.v[e] = from_f<T>(0.0f);
  return p;
}

// Elements [c0, c0 + VEC) of the contiguous row `src` (null: a row outside the problem), zero at
// and beyond `limit`. `vec_ok` says the row start is 16-byte aligned (the launcher checks the
// base pointer and the row stride), so a chunk entirely inside the row loads in one access.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_row_chunk(const T* src, int c0, int limit,
                                                       bool vec_ok) {
  if (src == nullptr) return zero_pack<T, VEC>();
  if (vec_ok && chunk_in_bounds(c0, VEC, limit)) {
    return *reinterpret_cast<const Pack<T, VEC>*>(src + c0);
  }
  Pack<T, VEC> p;
#pragma unroll
  for (int e = 0; e < VEC; ++e) p.v[e] = (c0 + e < limit) ? src[c0 + e] : from_f<T>(0.0f);
  return p;
}

// Stores a chunk at dst (16-byte aligned smem when ALIGNED, else element by element).
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void store_chunk(T* dst, const Pack<T, VEC>& p) {
  if (ALIGNED) {
    *reinterpret_cast<Pack<T, VEC>*>(dst) = p;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = p.v[e];
  }
}

// Stores a chunk down a column of a smem tile with row stride LDS: element e at dst[e * LDS].
template <typename T, int VEC, int LDS>
__device__ __forceinline__ void store_chunk_down(T* dst, const Pack<T, VEC>& p) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) dst[e * LDS] = p.v[e];
}

// Elements [n0, n0 + VEC) of row expand_index(idx_k, kk, group) of wt [din, dout] (the gathered
// column kk of the column-major w = wt^T), zero at and beyond dout and for kk at and beyond
// `live`. `vec_ok`: wt and its row stride are 16-byte aligned, so (n0 being a multiple of VEC) a
// chunk inside the row is one vector load.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_gathered_row_chunk(const T* wt, const int* idx_k,
                                                                int kk, int live, int group,
                                                                int n0, int dout, bool vec_ok) {
  if (kk >= live) return zero_pack<T, VEC>();
  const T* row = wt + static_cast<index_t>(gemm::expand_index(idx_k, kk, group)) * dout;
  return load_row_chunk<T, VEC>(row, n0, dout, vec_ok);
}

// Elements [kk0, kk0 + VEC) of the gathered row w_row[expand_index(idx_k, kk, group)] (gather on
// the reduction dimension), zero at and beyond `live`. With `vec_ok` (group a multiple of VEC,
// aligned rows) a chunk stays inside one unit, so its columns are contiguous in w_row.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_gathered_chunk(const T* w_row, const int* idx_k,
                                                            int kk0, int live, int group,
                                                            bool vec_ok) {
  if (w_row == nullptr) return zero_pack<T, VEC>();
  if (vec_ok && chunk_in_bounds(kk0, VEC, live)) {
    return *reinterpret_cast<const Pack<T, VEC>*>(w_row + gemm::expand_index(idx_k, kk0, group));
  }
  Pack<T, VEC> p;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int kk = kk0 + e;
    p.v[e] = kk < live ? w_row[gemm::expand_index(idx_k, kk, group)] : from_f<T>(0.0f);
  }
  return p;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 16-byte vector access is allowed for rows of `row_elems` elements of `elem_bytes` starting at
// `base` (every row start aligned).
inline bool rows_vectorizable(const void* base, long long row_elems, int elem_bytes) {
  return (reinterpret_cast<unsigned long long>(base) % 16 == 0) &&
         ((row_elems * elem_bytes) % 16 == 0);
}

}  // namespace dev
}  // namespace probprune
