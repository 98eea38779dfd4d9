// Gather-rows GEMM: y[k, :, j] = x[k] @ w[row(j)] (+ bias[row(j)]) for the live columns of each
// mask, zeros beyond; all K masks in one launch, grid (column tile, row tile, k).
// Block logic: csrc/probprune/gemm_logic.h; engines: csrc/kernels/gemm_engine.cuh.
#include "kernels/gemm_engine.cuh"
#include "probprune/launchers.h"

namespace probprune {
namespace {

using namespace gemm;
using dev::from_f;
using dev::to_f;

// A: rows of x[k] (fixed per slot), B: gathered weight rows (from the block's row table).
template <typename T, class Cfg>
struct RowsLoader {
  using Chunk = dev::Pack<T, Cfg::VEC>;
  const T* a_src[Cfg::A_CHUNKS];
  const T* b_src[Cfg::B_CHUNKS];
  int din;
  bool vec_x, vec_w;
  __device__ Chunk a(int s, int col) const {
    return dev::load_row_chunk<T, Cfg::VEC>(a_src[s], col, din, vec_x);
  }
  __device__ Chunk b(int, int s, int col) const {
    return dev::load_row_chunk<T, Cfg::VEC>(b_src[s], col, din, vec_w);
  }
};

template <typename T, class Cfg, class Engine>
__global__ void __launch_bounds__(Cfg::THREADS, 2)
    gather_rows_kernel(const T* __restrict__ x, const T* __restrict__ w,
                       const int* __restrict__ idx, const int* __restrict__ counts,
                       const T* __restrict__ bias, T* __restrict__ y, int M, int din,
                       int capacity, int group, bool vec_x, bool vec_w) {
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

  RowsLoader<T, Cfg> ld;
  ld.din = din;
  ld.vec_x = vec_x;
  ld.vec_w = vec_w;
#pragma unroll
  for (int s = 0; s < Cfg::A_CHUNKS; ++s) {
    int r, c;
    chunk_coord<Cfg>(threadIdx.x, s, r, c);
    ld.a_src[s] = m0 + r < M ? x + (static_cast<index_t>(k) * M + m0 + r) * din : nullptr;
  }
#pragma unroll
  for (int s = 0; s < Cfg::B_CHUNKS; ++s) {
    int r, c;
    chunk_coord<Cfg>(threadIdx.x, s, r, c);
    ld.b_src[s] = rows_s[r] >= 0 ? w + static_cast<index_t>(rows_s[r]) * din : nullptr;
  }
  typename Engine::Acc acc;
  Engine::zero(acc);
  Engine::mainloop(smem, ld, num_k_tiles(din, Cfg::BK), acc);
  Engine::epilogue(smem, acc, [&](int r, int c, const float* v) {
    const int m = m0 + r, j = n0 + c;
    if (m >= M || j >= n_out) return;
    float out = 0.0f;
    if (j < live) {
      out = v[0];
      if (bias != nullptr) out += to_f(bias[rows_s[c]]);
    }
    yk[static_cast<index_t>(m) * n_out + j] = from_f<T>(out);
  });
}

template <typename T, class Cfg, class Engine>
cudaError_t launch(const void* x, const void* w, const int* idx, const int* counts,
                   const void* bias, void* y, int K, int M, int din, int capacity, int group,
                   cudaStream_t stream) {
  const int n_out = capacity * group;
  if (K == 0 || M == 0 || n_out == 0) return cudaSuccess;
  const dim3 grid(ceil_div(n_out, Cfg::BN), ceil_div(M, Cfg::BM), K);
  const bool vec_x = dev::rows_vectorizable(x, din, sizeof(T));
  const bool vec_w = dev::rows_vectorizable(w, din, sizeof(T));
  gather_rows_kernel<T, Cfg, Engine><<<grid, Cfg::THREADS, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), idx, counts,
      static_cast<const T*>(bias), static_cast<T*>(y), M, din, capacity, group, vec_x, vec_w);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows_gemm(DType dt, const void* x, const void* w, const int* idx,
                                    const int* counts, const void* bias, void* y, int K, int M,
                                    int din, int capacity, int group, cudaStream_t stream) {
  switch (dt) {
    case DType::F32:
      return launch<float, RowsFma, dev::FmaEngine<RowsFma, 1>>(x, w, idx, counts, bias, y, K, M,
                                                                din, capacity, group, stream);
    case DType::F16:
      return launch<__half, RowsTc, dev::TcEngine<__half, RowsTc, 1>>(
          x, w, idx, counts, bias, y, K, M, din, capacity, group, stream);
    case DType::BF16:
      return launch<__nv_bfloat16, RowsTc, dev::TcEngine<__nv_bfloat16, RowsTc, 1>>(
          x, w, idx, counts, bias, y, K, M, din, capacity, group, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace probprune
