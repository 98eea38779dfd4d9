// Masked causal attention on tensor cores (fp16 / bf16, head_dim <= 128), flash-style: one block
// per (query tile of 64, query head, k * B + b), 4 warps of 16 query rows each; S = Q K^T and
// O += P V with WMMA 16x16x16 (fp32 accumulators), online softmax in fp32 with O kept in smem so
// that each row can be rescaled. Block logic: csrc/probprune/attention_logic.h.
#include <mma.h>

#include "kernels/attention_impl.h"

namespace probprune {
namespace {

using namespace attn;
using dev::from_f;
namespace wmma = nvcuda::wmma;

// acc += sum_kk a[kk] * B_kk for one 16 x 16 fragment of the warp's strip, where the B fragment
// B_kk (layout of FragB) starts at b + kk * b_step (ld ldb): the inner loop of S = Q K^T (K as a
// column-major B) and of O += P V (V row-major).
template <class FragB, class FragC, class FragA, int KF, typename T>
__device__ __forceinline__ void mma_accumulate(FragC& acc, const FragA (&a)[KF], const T* b,
                                               int b_step, int ldb) {
#pragma unroll
  for (int kk = 0; kk < KF; ++kk) {
    FragB bf;
    wmma::load_matrix_sync(bf, b + kk * b_step, ldb);
    wmma::mma_sync(acc, a[kk], bf, acc);
  }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(TcAttnConfig<DMAX>::THREADS)
    masked_attention_tc_kernel(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const int* __restrict__ q_counts,
                               const int* __restrict__ kv_slot, T* __restrict__ o, int B, int T_,
                               int Hq, int Hkv, int D, float scale_log2, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only launches this path on sm_80+
#else
  using Cfg = TcAttnConfig<DMAX>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  constexpr unsigned kFull = 0xffffffffu;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int h, kb, q0, kvh;
  if (!detail::enter_query_tile<Cfg>(q_counts, kv_slot, o, B, T_, Hq, D, h, kb, q0, kvh)) return;

  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + Cfg::K_OFF);
  T* Vs = reinterpret_cast<T*>(smem + Cfg::V_OFF);
  T* Qs = reinterpret_cast<T*>(smem + Cfg::Q_OFF);
  float* Ss = reinterpret_cast<float*>(smem + Cfg::S_OFF);
  T* Ps = reinterpret_cast<T*>(smem + Cfg::P_OFF);
  float* Os = reinterpret_cast<float*>(smem + Cfg::O_OFF);
  float* Ls = reinterpret_cast<float*>(smem + Cfg::L_OFF);

  // Stage the query tile (zero rows beyond T and columns beyond D), zero the output accumulator.
  for (int c = tid; c < Cfg::BQ * Cfg::CHUNKS_PER_ROW; c += Cfg::THREADS) {
    int r, col;
    attn_chunk_coord<Cfg>(c, r, col);
    const T* src = q0 + r < T_ ? q + bthd_offset(kb, q0 + r, h, 0, T_, Hq, D) : nullptr;
    dev::store_chunk<T, Cfg::VEC, true>(Qs + r * Cfg::LDQ + col,
                                        dev::load_row_chunk<T, Cfg::VEC>(src, col, D, vec));
  }
  for (int e = tid; e < Cfg::BQ * Cfg::LDO; e += Cfg::THREADS) Os[e] = 0.0f;
  __syncthreads();
  const int strip = warp * Cfg::ROWS_PER_WARP;  // the warp's 16 tile rows
  FragA qf[Cfg::FD];
#pragma unroll
  for (int dd = 0; dd < Cfg::FD; ++dd)
    wmma::load_matrix_sync(qf[dd], Qs + strip * Cfg::LDQ + dd * 16, Cfg::LDQ);

  int srow, c0, d0;
  softmax_lane_coord<Cfg>(lane, srow, c0, d0);
  const int row_first = q0 + strip, row_last = row_first + Cfg::ROWS_PER_WARP - 1;
  const int qpos = row_first + srow;
  float m_run = -INFINITY, l_run = 0.0f;
  const int n_kv = kv_end(q0, Cfg::BQ, T_);

  for (int kv0 = 0; kv0 < n_kv; kv0 += Cfg::BKV) {
    __syncthreads();  // previous K / V tile (and the Q staging area) no longer read
    for (int c = tid; c < Cfg::BKV * Cfg::CHUNKS_PER_ROW; c += Cfg::THREADS) {
      int r, col;
      attn_chunk_coord<Cfg>(c, r, col);
      const bool in = kv0 + r < T_;
      const T* ks = in ? k + bthd_offset(kb, kv0 + r, kvh, 0, T_, Hkv, D) : nullptr;
      const T* vs = in ? v + bthd_offset(kb, kv0 + r, kvh, 0, T_, Hkv, D) : nullptr;
      dev::store_chunk<T, Cfg::VEC, true>(Ks + r * Cfg::LDQ + col,
                                          dev::load_row_chunk<T, Cfg::VEC>(ks, col, D, vec));
      dev::store_chunk<T, Cfg::VEC, true>(Vs + r * Cfg::LDQ + col,
                                          dev::load_row_chunk<T, Cfg::VEC>(vs, col, D, vec));
    }
    __syncthreads();
    if (!rows_see_tile(row_first, row_last, kv0, T_)) continue;  // warp-uniform skip

    // S = Q K^T for the warp's strip (fp32, unscaled)
#pragma unroll
    for (int j = 0; j < Cfg::FKV; ++j) {
      FragC s;
      wmma::fill_fragment(s, 0.0f);
      mma_accumulate<FragBc>(s, qf, Ks + (j * 16) * Cfg::LDQ, 16, Cfg::LDQ);
      wmma::store_matrix_sync(Ss + strip * Cfg::LDS + j * 16, s, Cfg::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: this lane holds row srow, key columns [c0, c0 + BKV/2).
    const float* s_row = Ss + (strip + srow) * Cfg::LDS;
    float tmax = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < Cfg::BKV / 2; ++c) {
      const int col = c0 + c;
      if (key_visible(qpos, kv0 + col, T_)) tmax = fmaxf(tmax, s_row[col] * scale_log2);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(kFull, tmax, 1));
    float m_new;
    const float alpha = softmax_rescale(m_run, tmax, &m_new);
    T* p_row = Ps + (strip + srow) * Cfg::LDP;
    float psum = 0.0f;
#pragma unroll 8
    for (int c = 0; c < Cfg::BKV / 2; ++c) {
      const int col = c0 + c;
      const float p = softmax_prob(s_row[col] * scale_log2, m_new, key_visible(qpos, kv0 + col, T_));
      psum += p;
      p_row[col] = from_f<T>(p);
    }
    psum += __shfl_xor_sync(kFull, psum, 1);
    l_run = softmax_sum(l_run, alpha, psum);
    m_run = m_new;
    float* o_row = Os + (strip + srow) * Cfg::LDO;
#pragma unroll 8
    for (int d = 0; d < Cfg::DMAX / 2; ++d) o_row[d0 + d] *= alpha;
    __syncwarp();

    // O += P V
    FragA pf[Cfg::FKV];
#pragma unroll
    for (int kk = 0; kk < Cfg::FKV; ++kk)
      wmma::load_matrix_sync(pf[kk], Ps + strip * Cfg::LDP + kk * 16, Cfg::LDP);
#pragma unroll
    for (int f = 0; f < Cfg::FD; ++f) {
      FragC oc;
      wmma::load_matrix_sync(oc, Os + strip * Cfg::LDO + f * 16, Cfg::LDO, wmma::mem_row_major);
      mma_accumulate<FragBr>(oc, pf, Vs + f * 16, 16 * Cfg::LDQ, Cfg::LDQ);
      wmma::store_matrix_sync(Os + strip * Cfg::LDO + f * 16, oc, Cfg::LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // O / l, row by row (lanes along head_dim: coalesced stores)
  if ((lane & 1) == 0) Ls[strip + srow] = softmax_finish(l_run);
  __syncwarp();
  for (int r = 0; r < Cfg::ROWS_PER_WARP; ++r) {
    const int t = row_first + r;
    if (t >= T_) break;
    const float inv = Ls[strip + r];
    for (int d = lane; d < D; d += 32)
      o[bthd_offset(kb, t, h, d, T_, Hq, D)] = from_f<T>(Os[(strip + r) * Cfg::LDO + d] * inv);
  }
#endif
}

template <typename scalar_t, int DMAX>
cudaError_t launch_tc(const void* q, const void* k, const void* v, const int* q_counts,
                      const int* kv_slot, void* o, int K, int B, int T, int Hq, int Hkv, int D,
                      float scale_log2, cudaStream_t stream, bool* ran) {
  using Cfg = TcAttnConfig<DMAX>;
  *ran = false;
  if (detail::max_dynamic_smem() < Cfg::SMEM_BYTES) return cudaSuccess;
  auto kernel = masked_attention_tc_kernel<scalar_t, DMAX>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Cfg::SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const bool vec = dev::rows_vectorizable(q, D, sizeof(scalar_t)) &&
                   dev::rows_vectorizable(k, D, sizeof(scalar_t)) &&
                   dev::rows_vectorizable(v, D, sizeof(scalar_t));
  const dim3 grid(ceil_div(T, Cfg::BQ), Hq, K * B);
  using S = scalar_t;
  kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(
      static_cast<const S*>(q), static_cast<const S*>(k), static_cast<const S*>(v), q_counts,
      kv_slot, static_cast<S*>(o), B, T, Hq, Hkv, D, scale_log2, vec);
  *ran = true;
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_tc_d(const void* q, const void* k, const void* v, const int* q_counts,
                        const int* kv_slot, void* o, int K, int B, int T, int Hq, int Hkv, int D,
                        float scale_log2, cudaStream_t stream, bool* ran) {
  if (D <= 64) {
    return launch_tc<scalar_t, 64>(q, k, v, q_counts, kv_slot, o, K, B, T, Hq, Hkv, D, scale_log2,
                                   stream, ran);
  }
  return launch_tc<scalar_t, 128>(q, k, v, q_counts, kv_slot, o, K, B, T, Hq, Hkv, D, scale_log2,
                                  stream, ran);
}

}  // namespace

namespace detail {

cudaError_t attention_tc(DType dt, const void* q, const void* k, const void* v,
                         const int* q_counts, const int* kv_slot, void* o, int K, int B, int T,
                         int Hq, int Hkv, int D, float scale_log2, cudaStream_t stream, bool* ran) {
  *ran = false;
  if (D > 128) return cudaSuccess;
  if (dt == DType::F16)
    return launch_tc_d<__half>(q, k, v, q_counts, kv_slot, o, K, B, T, Hq, Hkv, D, scale_log2,
                               stream, ran);
  if (dt == DType::BF16)
    return launch_tc_d<__nv_bfloat16>(q, k, v, q_counts, kv_slot, o, K, B, T, Hq, Hkv, D,
                                      scale_log2, stream, ran);
  return cudaSuccess;
}

}  // namespace detail
}  // namespace probprune
