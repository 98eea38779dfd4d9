// Gather-rows GEMMs, one kernel for both ops (NB weight operands share the x tile):
//   NB = 1  y[k, :, j] = x[k] @ w[row(j)] (+ bias[row(j)])                      gather_rows_gemm
//   NB = 2  y[k, :, j] = silu(x[k] @ w_gate[idx_k[j]]) * (x[k] @ w_up[idx_k[j]])  gather_rows_swiglu
// for the live columns of each mask, zeros beyond; all K masks in one launch, grid (column tile,
// row tile, k). The fused SwiGLU has group 1 and no bias.
// Block logic: csrc/probprune/gemm_logic.h; engines: csrc/kernels/gemm_engine.cuh.
#include "kernels/gemm_engine.cuh"
#include "probprune/launchers.h"

namespace probprune {
namespace {

using namespace gemm;
using dev::from_f;
using dev::round_to;
using dev::to_f;

// w_up is read only when NB = 2 (the up projection; w is then the gate), bias only when NB = 1.
// Two blocks per SM cap a thread at 128 registers: the one-operand tensor-core tile (warp tile
// 64 x 32: 64 accumulator registers, four A fragments, the register prefetch) spills there on
// sm_90 (docs/gpu-static-checks.md), so it asks for one block; the fused SwiGLU (warp tile
// 32 x 32) and the FMA engine fit in 128 and keep two.
template <class Engine, int NB, typename T = typename Engine::Elem,
          class Cfg = typename Engine::Config>
__global__ void __launch_bounds__(Cfg::THREADS, NB == 1 && !std::is_same_v<T, float> ? 1 : 2)
    gather_rows_kernel(const T* __restrict__ x, const T* __restrict__ w,
                       const T* __restrict__ w_up, const int* __restrict__ idx,
                       const int* __restrict__ counts, const T* __restrict__ bias,
                       T* __restrict__ y, int M, int din, int capacity, int group, bool vec_x,
                       bool vec_w) {
  const int k = blockIdx.z;
  const int m0 = blockIdx.y * Cfg::BM, n0 = blockIdx.x * Cfg::BN;
  const int n_out = capacity * group;
  const int live = live_extent(counts[k], group);
  T* yk = y + static_cast<index_t>(k) * M * n_out;
  if (tile_dead(n0, live)) {  // nothing active here: zeros, no reads of x or w
    dev::fill_tile<Cfg>(yk, m0, n0, M, n_out, [](int, int) { return from_f<T>(0.0f); });
    return;
  }
  __shared__ __align__(128) unsigned char smem[Engine::SMEM_BYTES];
  __shared__ int rows_s[Cfg::BN];
  const int* idx_k = idx + static_cast<index_t>(k) * capacity;
  for (int j = threadIdx.x; j < Cfg::BN; j += Cfg::THREADS)
    rows_s[j] = gathered_row(idx_k, n0 + j, live, group);
  __syncthreads();

  // A: rows of x[k]; B: the gathered weight rows of each operand (the block's row table)
  dev::RowsLoader<T, Cfg, NB> ld;
  ld.din = din;
  ld.vec_a = vec_x;
  ld.vec_b = vec_w;
  const T* xk = x + static_cast<index_t>(k) * M * din;
  dev::slot_rows<Cfg>(ld.a_src, [&](int r) {
    return m0 + r < M ? xk + static_cast<index_t>(m0 + r) * din : nullptr;
  });
  const T* const weights[2] = {w, w_up};
#pragma unroll
  for (int op = 0; op < NB; ++op) {
    dev::slot_rows<Cfg>(ld.b_src[op], [&](int r) {
      return rows_s[r] >= 0 ? weights[op] + static_cast<index_t>(rows_s[r]) * din : nullptr;
    });
  }
  dev::gemm_tile<Engine>(smem, ld, num_k_tiles(din, Cfg::BK), [&](int r, int c, const float* v) {
    const int m = m0 + r, j = n0 + c;
    if (m >= M || j >= n_out) return;
    float out = 0.0f;
    if (j < live) {
      if constexpr (NB == 2) {
        // gate and up are rounded to the storage dtype first, as F.linear's outputs are
        out = silu_mul(round_to<T>(v[0]), round_to<T>(v[1]));
      } else {
        out = v[0];
        if (bias != nullptr) out += to_f(bias[rows_s[c]]);
      }
    }
    yk[static_cast<index_t>(m) * n_out + j] = from_f<T>(out);
  });
}

template <int NB, typename T, class TcCfg, class FmaCfg>
cudaError_t launch(const void* x, const void* w, const void* w_up, const int* idx,
                   const int* counts, const void* bias, void* y, int K, int M, int din,
                   int capacity, int group, cudaStream_t stream) {
  using Engine = dev::EngineFor<T, TcCfg, FmaCfg, NB>;
  using Cfg = typename Engine::Config;
  const int n_out = capacity * group;
  if (K == 0 || M == 0 || n_out == 0) return cudaSuccess;
  const dim3 grid(ceil_div(n_out, Cfg::BN), ceil_div(M, Cfg::BM), K);
  const bool vec_x = dev::rows_vectorizable(x, din, sizeof(T));
  const bool vec_w = dev::rows_vectorizable(w, din, sizeof(T)) &&
                     (NB == 1 || dev::rows_vectorizable(w_up, din, sizeof(T)));
  gather_rows_kernel<Engine, NB><<<grid, Cfg::THREADS, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(w_up), idx,
      counts, static_cast<const T*>(bias), static_cast<T*>(y), M, din, capacity, group, vec_x,
      vec_w);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows_gemm(DType dt, const void* x, const void* w, const int* idx,
                                    const int* counts, const void* bias, void* y, int K, int M,
                                    int din, int capacity, int group, cudaStream_t stream) {
  return dev::with_float_type(dt, [&](auto t) {
    return launch<1, typename decltype(t)::type, RowsTc, RowsFma>(
        x, w, nullptr, idx, counts, bias, y, K, M, din, capacity, group, stream);
  });
}

cudaError_t launch_gather_rows_swiglu(DType dt, const void* x, const void* w_gate,
                                      const void* w_up, const int* idx, const int* counts, void* y,
                                      int K, int M, int din, int capacity, cudaStream_t stream) {
  return dev::with_float_type(dt, [&](auto t) {
    return launch<2, typename decltype(t)::type, SwigluTc, SwigluFma>(
        x, w_gate, w_up, idx, counts, nullptr, y, K, M, din, capacity, 1, stream);
  });
}

}  // namespace probprune
