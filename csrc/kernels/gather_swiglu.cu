// Fused SwiGLU gather-rows GEMM: y[k, :, j] = silu(x[k] @ w_gate[idx_k[j]]) * (x[k] @ w_up[idx_k[j]])
// for the live channels of each mask, zeros beyond. Gate and up share the x tile (NB = 2).
// Block logic: csrc/probprune/gemm_logic.h; engines: csrc/kernels/gemm_engine.cuh.
#include "kernels/gemm_engine.cuh"
#include "probprune/launchers.h"

namespace probprune {
namespace {

using namespace gemm;
using dev::from_f;
using dev::round_to;

template <typename T, class Cfg>
struct SwigluLoader {
  using Chunk = dev::Pack<T, Cfg::VEC>;
  const T* a_src[Cfg::A_CHUNKS];
  const T* b_src[2][Cfg::B_CHUNKS];  // gate, up
  int din;
  bool vec_x, vec_w;
  __device__ Chunk a(int s, int col) const {
    return dev::load_row_chunk<T, Cfg::VEC>(a_src[s], col, din, vec_x);
  }
  __device__ Chunk b(int op, int s, int col) const {
    return dev::load_row_chunk<T, Cfg::VEC>(b_src[op][s], col, din, vec_w);
  }
};

template <typename T, class Cfg, class Engine>
__global__ void __launch_bounds__(Cfg::THREADS, 2)
    gather_rows_swiglu_kernel(const T* __restrict__ x, const T* __restrict__ w_gate,
                              const T* __restrict__ w_up, const int* __restrict__ idx,
                              const int* __restrict__ counts, T* __restrict__ y, int M, int din,
                              int capacity, bool vec_x, bool vec_w) {
  const int k = blockIdx.z;
  const int m0 = blockIdx.y * Cfg::BM, n0 = blockIdx.x * Cfg::BN;
  const int live = live_extent(counts[k], 1);
  T* yk = y + static_cast<index_t>(k) * M * capacity;
  if (tile_dead(n0, live)) {
    dev::fill_tile<Cfg>(yk, m0, n0, M, capacity, [](int, int) { return from_f<T>(0.0f); });
    return;
  }
  __shared__ __align__(128) unsigned char smem[Engine::SMEM_BYTES];
  __shared__ int rows_s[Cfg::BN];
  const int* idx_k = idx + static_cast<index_t>(k) * capacity;
  for (int j = threadIdx.x; j < Cfg::BN; j += Cfg::THREADS)
    rows_s[j] = gathered_row(idx_k, n0 + j, live, 1);
  __syncthreads();

  SwigluLoader<T, Cfg> ld;
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
    const bool ok = rows_s[r] >= 0;
    const index_t off = static_cast<index_t>(ok ? rows_s[r] : 0) * din;
    ld.b_src[0][s] = ok ? w_gate + off : nullptr;
    ld.b_src[1][s] = ok ? w_up + off : nullptr;
  }
  typename Engine::Acc acc;
  Engine::zero(acc);
  Engine::mainloop(smem, ld, num_k_tiles(din, Cfg::BK), acc);
  Engine::epilogue(smem, acc, [&](int r, int c, const float* v) {
    const int m = m0 + r, j = n0 + c;
    if (m >= M || j >= capacity) return;
    // gate and up are rounded to the storage dtype first, as F.linear's outputs are
    const float out = j < live ? silu_mul(round_to<T>(v[0]), round_to<T>(v[1])) : 0.0f;
    yk[static_cast<index_t>(m) * capacity + j] = from_f<T>(out);
  });
}

template <typename T, class Cfg, class Engine>
cudaError_t launch(const void* x, const void* w_gate, const void* w_up, const int* idx,
                   const int* counts, void* y, int K, int M, int din, int capacity,
                   cudaStream_t stream) {
  if (K == 0 || M == 0 || capacity == 0) return cudaSuccess;
  const dim3 grid(ceil_div(capacity, Cfg::BN), ceil_div(M, Cfg::BM), K);
  const bool vec_x = dev::rows_vectorizable(x, din, sizeof(T));
  const bool vec_w = dev::rows_vectorizable(w_gate, din, sizeof(T)) &&
                     dev::rows_vectorizable(w_up, din, sizeof(T));
  gather_rows_swiglu_kernel<T, Cfg, Engine><<<grid, Cfg::THREADS, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w_gate), static_cast<const T*>(w_up), idx,
      counts, static_cast<T*>(y), M, din, capacity, vec_x, vec_w);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows_swiglu(DType dt, const void* x, const void* w_gate,
                                      const void* w_up, const int* idx, const int* counts, void* y,
                                      int K, int M, int din, int capacity, cudaStream_t stream) {
  switch (dt) {
    case DType::F32:
      return launch<float, SwigluFma, dev::FmaEngine<SwigluFma, 2>>(
          x, w_gate, w_up, idx, counts, y, K, M, din, capacity, stream);
    case DType::F16:
      return launch<__half, SwigluTc, dev::TcEngine<__half, SwigluTc, 2>>(
          x, w_gate, w_up, idx, counts, y, K, M, din, capacity, stream);
    case DType::BF16:
      return launch<__nv_bfloat16, SwigluTc, dev::TcEngine<__nv_bfloat16, SwigluTc, 2>>(
          x, w_gate, w_up, idx, counts, y, K, M, din, capacity, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace probprune
