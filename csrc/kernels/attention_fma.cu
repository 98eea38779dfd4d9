// Masked causal attention with plain FMA (fp32, and fp16 / bf16 with head_dim > 128): one block
// per (query tile of 16, query head, k * B + b), 4 warps of 4 query rows; a key tile of 32 gives
// one key per lane, online softmax in fp32, each lane accumulates head_dim / 32 output columns.
// Also the entry point launch_masked_attention, which picks the path.
// Block logic: csrc/probprune/attention_logic.h.
#include "kernels/attention_impl.h"

namespace probprune {
namespace {

using namespace attn;
using dev::from_f;
using dev::to_f;

template <typename T>
__global__ void __launch_bounds__(FmaAttnConfig::THREADS)
    masked_attention_fma_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, const int* __restrict__ q_counts,
                                const int* __restrict__ kv_slot, T* __restrict__ o, int B,
                                int T_, int Hq, int Hkv, int D, float scale_log2) {
  using Cfg = FmaAttnConfig;
  constexpr unsigned kFull = 0xffffffffu;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int h, kb, q0, kvh;
  if (!detail::enter_query_tile<Cfg>(q_counts, kv_slot, o, B, T_, Hq, D, h, kb, q0, kvh)) return;
  extern __shared__ float fsm[];
  const int ld = fma_attn_ld(D);
  float* Qs = fsm;
  float* Ks = Qs + Cfg::BQ * ld;
  float* Vs = Ks + Cfg::BKV * ld;
  for (int e = tid; e < Cfg::BQ * D; e += Cfg::THREADS) {
    int r, d;
    tile_elem_coord(e, D, r, d);
    Qs[r * ld + d] = q0 + r < T_ ? to_f(q[bthd_offset(kb, q0 + r, h, d, T_, Hq, D)]) : 0.0f;
  }
  float acc[Cfg::ROWS_PER_WARP][Cfg::DPL];
  float m_run[Cfg::ROWS_PER_WARP], l_run[Cfg::ROWS_PER_WARP];
#pragma unroll
  for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) {
    m_run[rr] = -INFINITY;
    l_run[rr] = 0.0f;
#pragma unroll
    for (int i = 0; i < Cfg::DPL; ++i) acc[rr][i] = 0.0f;
  }
  const int n_kv = kv_end(q0, Cfg::BQ, T_);
  for (int kv0 = 0; kv0 < n_kv; kv0 += Cfg::BKV) {
    __syncthreads();  // previous K / V tile no longer read (and Q staged)
    for (int e = tid; e < Cfg::BKV * D; e += Cfg::THREADS) {
      int r, d;
      tile_elem_coord(e, D, r, d);
      const bool in = kv0 + r < T_;
      const index_t off = in ? bthd_offset(kb, kv0 + r, kvh, d, T_, Hkv, D) : 0;
      Ks[r * ld + d] = in ? to_f(k[off]) : 0.0f;
      Vs[r * ld + d] = in ? to_f(v[off]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) {
      const int row = fma_attn_row(warp, rr);
      const int qpos = q0 + row;
      if (!rows_see_tile(qpos, qpos, kv0, T_)) continue;  // warp-uniform
      const bool vis = key_visible(qpos, kv0 + lane, T_);
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s = fmaf(Qs[row * ld + d], Ks[lane * ld + d], s);
      s *= scale_log2;
      const float tmax = dev::warp_max(vis ? s : -INFINITY);
      float m_new;
      const float alpha = softmax_rescale(m_run[rr], tmax, &m_new);
      const float p = softmax_prob(s, m_new, vis);
      l_run[rr] = softmax_sum(l_run[rr], alpha, dev::warp_sum(p));
      m_run[rr] = m_new;
#pragma unroll
      for (int i = 0; i < Cfg::DPL; ++i) acc[rr][i] *= alpha;
      for (int j = 0; j < Cfg::BKV; ++j) {
        const float pj = __shfl_sync(kFull, p, j);
#pragma unroll
        for (int i = 0; i < Cfg::DPL; ++i) {
          const int d = fma_attn_dim(lane, i);
          if (d < D) acc[rr][i] = fmaf(pj, Vs[j * ld + d], acc[rr][i]);
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) {
    const int qpos = q0 + fma_attn_row(warp, rr);
    if (qpos >= T_) continue;
    const float inv = softmax_finish(l_run[rr]);
#pragma unroll
    for (int i = 0; i < Cfg::DPL; ++i) {
      const int d = fma_attn_dim(lane, i);
      if (d < D) o[bthd_offset(kb, qpos, h, d, T_, Hq, D)] = from_f<T>(acc[rr][i] * inv);
    }
  }
}

template <typename scalar_t>
cudaError_t launch_fma(const void* q, const void* k, const void* v, const int* q_counts,
                       const int* kv_slot, void* o, int K, int B, int T, int Hq, int Hkv, int D,
                       float scale_log2, cudaStream_t stream) {
  using Cfg = FmaAttnConfig;
  const int smem = fma_attn_smem_bytes(D);
  auto kernel = masked_attention_fma_kernel<scalar_t>;
  if (smem > 48 * 1024) {
    if (detail::max_dynamic_smem() < smem) return cudaErrorInvalidConfiguration;
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(ceil_div(T, Cfg::BQ), Hq, K * B);
  using S = scalar_t;
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(static_cast<const S*>(q), static_cast<const S*>(k),
                                               static_cast<const S*>(v), q_counts, kv_slot,
                                               static_cast<S*>(o), B, T, Hq, Hkv, D, scale_log2);
  return cudaGetLastError();
}

}  // namespace

namespace detail {

int max_dynamic_smem() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  return bytes;
}

cudaError_t attention_fma(DType dt, const void* q, const void* k, const void* v,
                          const int* q_counts, const int* kv_slot, void* o, int K, int B, int T,
                          int Hq, int Hkv, int D, float scale_log2, cudaStream_t stream) {
  return dev::with_float_type(dt, [&](auto t) {
    return launch_fma<typename decltype(t)::type>(q, k, v, q_counts, kv_slot, o, K, B, T, Hq, Hkv,
                                                  D, scale_log2, stream);
  });
}

}  // namespace detail

cudaError_t launch_masked_attention(DType dt, const void* q, const void* k, const void* v,
                                    const int* q_counts, const int* kv_slot, void* o, int K,
                                    int B, int T, int Hq, int Hkv, int D, float scale,
                                    cudaStream_t stream) {
  if (K == 0 || B == 0 || T == 0 || Hq == 0 || D == 0) return cudaSuccess;
  if (D > kMaxHeadDim || Hkv < 0) return cudaErrorInvalidValue;
  const float scale_log2 = scale * attn::kLog2e;
  if (dt == DType::F16 || dt == DType::BF16) {
    bool ran = false;
    const cudaError_t err = detail::attention_tc(dt, q, k, v, q_counts, kv_slot, o, K, B, T, Hq,
                                                 Hkv, D, scale_log2, stream, &ran);
    if (err != cudaSuccess || ran) return err;
  }
  return detail::attention_fma(dt, q, k, v, q_counts, kv_slot, o, K, B, T, Hq, Hkv, D, scale_log2,
                               stream);
}

}  // namespace probprune
