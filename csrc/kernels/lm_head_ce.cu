// Fused lm_head + cross-entropy, the vocabulary split over blocks: loss[k] = mean over the counted
// rows of logsumexp(h[k, m] @ w^T) - (h[k, m] . w[labels[k, m]]), no logits in global memory.
// Two launches on one stream: the partial kernel, grid (row tile, mask k, vocabulary slice), and
// the merge kernel, one block per mask.
// Block logic: csrc/probprune/lm_head_logic.h; GEMM engines: csrc/kernels/gemm_engine.cuh.
#include "kernels/gemm_engine.cuh"
#include "probprune/launchers.h"
#include "probprune/lm_head_logic.h"

namespace probprune {
namespace {

using namespace lm_head;

template <class Engine, typename T = typename Engine::Elem, class Cfg = typename Engine::Config>
__global__ void __launch_bounds__(Cfg::THREADS, 2)
    lm_head_partial_kernel(const T* __restrict__ h, const T* __restrict__ w,
                           const int64_t* __restrict__ labels, int64_t label_stride_k,
                           float* __restrict__ part, int M, int D, int V, int span, bool vec_h,
                           bool vec_w) {
  using Tl = Tile<Cfg>;
  // the logit tile overlays the GEMM stages: each is used only while the other is not
  constexpr int SMEM = Engine::SMEM_BYTES > Tl::BYTES ? Engine::SMEM_BYTES : Tl::BYTES;
  __shared__ __align__(128) unsigned char smem[SMEM];
  __shared__ int64_t lab_s[Cfg::BM];
  const int m0 = blockIdx.x * Cfg::BM, k = blockIdx.y, s = blockIdx.z;
  const int K = gridDim.y, S = gridDim.z;
  int v_begin, v_end;
  split_range(s, span, V, v_begin, v_end);
  for (int r = threadIdx.x; r < Cfg::BM; r += Cfg::THREADS)
    lab_s[r] = m0 + r < M ? labels[k * label_stride_k + m0 + r] : -1;

  dev::RowsLoader<T, Cfg, 1> ld;
  ld.din = D;
  ld.vec_a = vec_h;
  ld.vec_b = vec_w;
  const T* hk = h + static_cast<index_t>(k) * M * D;
  dev::slot_rows<Cfg>(ld.a_src, [&](int r) {
    return m0 + r < M ? hk + static_cast<index_t>(m0 + r) * D : nullptr;
  });
  float* tile = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Running (max in log2 units, sum, logit at the label) of each row, in shared memory rather
  // than replicated in every lane's registers (the accumulators need them). A row is read and
  // written by its warp only; lane 0 writes once every lane has read (__syncwarp).
  __shared__ float run_s[3][Cfg::BM];
  for (int r = threadIdx.x; r < Cfg::BM; r += Cfg::THREADS) {
    run_s[0][r] = -INFINITY;
    run_s[1][r] = 0.0f;
    run_s[2][r] = 0.0f;
  }
  __syncthreads();  // lab_s, run_s

  for (int n0 = v_begin; n0 < v_end; n0 += Cfg::BN) {
    dev::slot_rows<Cfg>(ld.b_src[0], [&](int r) {
      return n0 + r < v_end ? w + static_cast<index_t>(n0 + r) * D : nullptr;
    });
    typename Engine::Acc acc;
    Engine::zero(acc);
    Engine::mainloop(smem, ld, gemm::num_k_tiles(D, Cfg::BK), acc);  // ends on a barrier
    Engine::store(tile, Tl::LD, acc);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < Tl::ROWS_PER_WARP; ++i) {
      const int r = row_of<Cfg>(warp, i);
      float sc[Tl::COLS_PER_LANE];
      bool ok[Tl::COLS_PER_LANE];
      float tile_max = -INFINITY, target = 0.0f;
#pragma unroll
      for (int j = 0; j < Tl::COLS_PER_LANE; ++j) {
        const int c = col_of(lane, j);
        const float z = tile[r * Tl::LD + c];
        ok[j] = n0 + c < v_end;
        sc[j] = z * attn::kLog2e;
        if (ok[j]) tile_max = fmaxf(tile_max, sc[j]);
        if (ok[j] && n0 + c == lab_s[r]) target += z;
      }
      const float m_old = run_s[0][r], l_old = run_s[1][r], t_old = run_s[2][r];
      float m_new;
      const float alpha = attn::softmax_rescale(m_old, dev::warp_max(tile_max), &m_new);
      float psum = 0.0f;
#pragma unroll
      for (int j = 0; j < Tl::COLS_PER_LANE; ++j) psum += attn::softmax_prob(sc[j], m_new, ok[j]);
      const float l_new = attn::softmax_sum(l_old, alpha, dev::warp_sum(psum));
      const float t_new = t_old + dev::warp_sum(target);
      __syncwarp();
      if (lane == 0) {
        run_s[0][r] = m_new;
        run_s[1][r] = l_new;
        run_s[2][r] = t_new;
      }
    }
    __syncthreads();  // the next tile's stages overwrite the logit tile
  }
  for (int e = threadIdx.x; e < 3 * Cfg::BM; e += Cfg::THREADS) {
    int q, r;
    tile_elem_coord(e, Cfg::BM, q, r);
    if (m0 + r < M) part[part_offset(q, k, s, m0 + r, K, S, M)] = run_s[q][r];
  }
}

__global__ void __launch_bounds__(kMergeThreads)
    lm_head_merge_kernel(const float* __restrict__ part, const int64_t* __restrict__ labels,
                         int64_t label_stride_k, int64_t ignore_index, float* __restrict__ loss,
                         int S, int M) {
  constexpr int WARPS = kMergeThreads / 32;
  __shared__ float total_s[WARPS];
  __shared__ int count_s[WARPS];
  const int k = blockIdx.x, K = gridDim.x;
  float total = 0.0f;
  int count = 0;
  for (int m = threadIdx.x; m < M; m += kMergeThreads) {
    if (!counted(labels[k * label_stride_k + m], ignore_index)) continue;
    float mx = -INFINITY, sum = 0.0f, target = 0.0f;
    for (int s = 0; s < S; ++s) {
      lse_fold(mx, sum, part[part_offset(0, k, s, m, K, S, M)],
               part[part_offset(1, k, s, m, K, S, M)]);
      target += part[part_offset(2, k, s, m, K, S, M)];
    }
    total += row_nll(mx, sum, target);
    ++count;
  }
  total = dev::warp_sum(total);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
  if (threadIdx.x % 32 == 0) {
    total_s[threadIdx.x / 32] = total;
    count_s[threadIdx.x / 32] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    total = 0.0f;
    count = 0;
    for (int i = 0; i < WARPS; ++i) total += total_s[i], count += count_s[i];
    loss[k] = mean_or_nan(total, count);
  }
}

}  // namespace

int lm_head_ce_splits(int K, int M, int V, int sm_count) {
  return num_splits(K, M, V, sm_count);
}

cudaError_t launch_lm_head_ce(DType dt, const void* h, const void* w, const int64_t* labels,
                              int64_t label_stride_k, int64_t ignore_index, float* workspace,
                              float* loss, int K, int M, int D, int V, int splits,
                              cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  const cudaError_t err = dev::with_float_type(dt, [&](auto t) {
    using T = typename decltype(t)::type;
    using Engine = dev::EngineFor<T, Tc, Fma, 1>;
    using Cfg = typename Engine::Config;
    if (M == 0) return cudaSuccess;
    const dim3 grid(ceil_div(M, Cfg::BM), K, splits);
    lm_head_partial_kernel<Engine><<<grid, Cfg::THREADS, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(w), labels, label_stride_k, workspace, M,
        D, V, span_of(V, splits), dev::rows_vectorizable(h, D, sizeof(T)),
        dev::rows_vectorizable(w, D, sizeof(T)));
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  lm_head_merge_kernel<<<K, kMergeThreads, 0, stream>>>(workspace, labels, label_stride_k,
                                                        ignore_index, loss, splits, M);
  return cudaGetLastError();
}

}  // namespace probprune
