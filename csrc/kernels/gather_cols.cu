// Gather-cols GEMM: y[k] = h[k, :, :live] @ w[:, col(kk)]^T (+ residual[k]) with
// col(kk) = idx_k[kk / group] * group + kk % group; the reduction runs over the live columns of
// each mask only. All K masks in one launch, grid (output column tile, row tile, k).
// w is [dout, din] row-major, or column-major (W_T: a row-major wt [din, dout]). With group 1 only
// the second reads well: a gathered column is then a contiguous row of wt, staged k-major with
// vector loads, while row-major w scatters every element of a chunk across din.
// Block logic: csrc/probprune/gemm_logic.h; engines: csrc/kernels/gemm_engine.cuh.
#include "kernels/gemm_engine.cuh"
#include "probprune/launchers.h"

namespace probprune {
namespace {

using namespace gemm;
using dev::from_f;
using dev::to_f;

// A: rows of h[k] up to the live extent; B: w's rows n0.. (b_row: row pointers of w), columns
// gathered through idx; with W_T, B is read k-major from wt (b_n: the first output feature of
// each slot's chunk).
template <typename T, class Cfg, bool W_T>
struct ColsLoader {
  using Chunk = dev::Pack<T, Cfg::VEC>;
  static constexpr bool B_KMAJOR = W_T;
  const T* a_src[Cfg::A_CHUNKS];
  const T* b_row[Cfg::B_CHUNKS];
  int b_n[Cfg::B_CHUNKS];
  const T* w;
  const int* idx_k;
  int live, group, dout;
  bool vec_h, vec_w;
  __device__ Chunk a(int s, int col) const {
    return dev::load_row_chunk<T, Cfg::VEC>(a_src[s], col, live, vec_h);
  }
  __device__ Chunk b(int, int s, int col) const {
    if constexpr (W_T) {
      return dev::load_gathered_row_chunk<T, Cfg::VEC>(w, idx_k, col, live, group, b_n[s], dout,
                                                       vec_w);
    } else {
      return dev::load_gathered_chunk<T, Cfg::VEC>(b_row[s], idx_k, col, live, group, vec_w);
    }
  }
};

// Two blocks per SM cap a thread at 128 registers, where the tensor-core tile (warp tile 64 x 32)
// spills its loader's pointers on sm_90 (docs/gpu-static-checks.md): it asks for one block, as
// gather_rows' one-operand tile does; the FMA engine fits in 128 and keeps two.
template <class Engine, bool W_T, typename T = typename Engine::Elem,
          class Cfg = typename Engine::Config>
__global__ void __launch_bounds__(Cfg::THREADS, std::is_same_v<T, float> ? 2 : 1)
    gather_cols_kernel(const T* __restrict__ h, const T* __restrict__ w,
                       const int* __restrict__ idx, const int* __restrict__ counts,
                       const T* __restrict__ residual, T* __restrict__ y, int M, int dout,
                       int din, int capacity, int group, bool vec_h, bool vec_w) {
  const int k = blockIdx.z;
  const int m0 = blockIdx.y * Cfg::BM, n0 = blockIdx.x * Cfg::BN;
  const int live = live_extent(counts[k], group);
  T* yk = y + static_cast<index_t>(k) * M * dout;
  const T* rk = residual != nullptr ? residual + static_cast<index_t>(k) * M * dout : nullptr;
  if (tile_dead(0, live)) {  // no active unit: the residual (or zero) passes through
    dev::fill_tile<Cfg>(yk, m0, n0, M, dout, [&](int m, int n) {
      return rk != nullptr ? rk[static_cast<index_t>(m) * dout + n] : from_f<T>(0.0f);
    });
    return;
  }
  __shared__ __align__(128) unsigned char smem[Engine::SMEM_BYTES];
  const index_t h_cols = static_cast<index_t>(capacity) * group;

  ColsLoader<T, Cfg, W_T> ld;
  ld.w = w;
  ld.idx_k = idx + static_cast<index_t>(k) * capacity;
  ld.live = live;
  ld.group = group;
  ld.dout = dout;
  ld.vec_h = vec_h;
  ld.vec_w = vec_w;
  const T* hk = h + static_cast<index_t>(k) * M * h_cols;
  dev::slot_rows<Cfg>(ld.a_src, [&](int r) {
    return m0 + r < M ? hk + (m0 + r) * h_cols : nullptr;
  });
  if constexpr (W_T) {
    dev::slot_rows<Cfg, Cfg::B_CHUNKS, true>(ld.b_n, [&](int r) { return n0 + r; });
  } else {
    dev::slot_rows<Cfg>(ld.b_row, [&](int r) {
      return n0 + r < dout ? w + static_cast<index_t>(n0 + r) * din : nullptr;
    });
  }
  dev::gemm_tile<Engine>(smem, ld, num_k_tiles(live, Cfg::BK), [&](int r, int c, const float* v) {
    const int m = m0 + r, n = n0 + c;
    if (m >= M || n >= dout) return;
    const index_t o = static_cast<index_t>(m) * dout + n;
    const float out = v[0] + (rk != nullptr ? to_f(rk[o]) : 0.0f);
    yk[o] = from_f<T>(out);
  });
}

template <typename T>
cudaError_t launch(const void* h, const void* w, bool w_t, const int* idx, const int* counts,
                   const void* residual, void* y, int K, int M, int dout, int din, int capacity,
                   int group, cudaStream_t stream) {
  using Engine = dev::EngineFor<T, ColsTc, ColsFma, 1>;
  using Cfg = typename Engine::Config;
  if (K == 0 || M == 0 || dout == 0) return cudaSuccess;
  const dim3 grid(ceil_div(dout, Cfg::BN), ceil_div(M, Cfg::BM), K);
  const bool vec_h =
      dev::rows_vectorizable(h, static_cast<long long>(capacity) * group, sizeof(T));
  // With w^T, the gathered columns are rows of wt: vector loads along dout whatever the group.
  const bool vec_w = w_t ? dev::rows_vectorizable(w, dout, sizeof(T))
                         : group % Cfg::VEC == 0 && dev::rows_vectorizable(w, din, sizeof(T));
  auto* kernel = w_t ? gather_cols_kernel<Engine, true> : gather_cols_kernel<Engine, false>;
  kernel<<<grid, Cfg::THREADS, 0, stream>>>(
      static_cast<const T*>(h), static_cast<const T*>(w), idx, counts,
      static_cast<const T*>(residual), static_cast<T*>(y), M, dout, din, capacity, group, vec_h,
      vec_w);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_cols_gemm(DType dt, const void* h, const void* w, bool w_t,
                                    const int* idx, const int* counts, const void* residual,
                                    void* y, int K, int M, int dout, int din, int capacity,
                                    int group, cudaStream_t stream) {
  return dev::with_float_type(dt, [&](auto t) {
    return launch<typename decltype(t)::type>(h, w, w_t, idx, counts, residual, y, K, M, dout,
                                              din, capacity, group, stream);
  });
}

}  // namespace probprune
