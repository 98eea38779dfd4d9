// The two GEMM engines behind the gather kernels, around one main loop (pipelined_mainloop:
// global -> registers -> smem, double-buffered smem with register prefetch, one barrier per k
// tile) and one epilogue walk each.
//
//   TcEngine<T, Cfg, NB>   fp16 / bf16 on tensor cores (WMMA 16x16x16, fp32 accumulators), sm_80+
//   FmaEngine<Cfg, NB>     fp32 with plain FMA
//
// NB B operands share one A operand (NB = 2 for gate and up of the fused SwiGLU). A kernel gives
// a Loader with
//   Pack a(int slot, int col) const          A chunk of load slot `slot` at reduction column col
//   Pack b(int op, int slot, int col) const  B chunk of operand op
// (the tile row of each slot is fixed: gemm::chunk_coord), optionally
//   static constexpr bool B_KMAJOR = true     B chunks run down VEC tile rows at reduction column
//                                            col (gemm::chunk_coord_kmajor), for a B whose rows
//                                            are strided in memory and its columns contiguous
// and an epilogue functor
//   epi(int tile_row, int tile_col, const float* v)   v[op] = accumulated value of operand op.
// All tile coordinates come from csrc/probprune/gemm_logic.h, shared with the CPU emulation.
#pragma once

#include <mma.h>

#include <type_traits>

#include "kernels/device_utils.cuh"
#include "probprune/gemm_logic.h"

namespace probprune {
namespace dev {

// fn(s, row, col) for each load slot s < N of this thread: the first tile row and column of its
// chunk (gemm::chunk_coord, or gemm::chunk_coord_kmajor for KMAJOR chunks).
template <class Cfg, int N, bool KMAJOR = false, class Fn>
__device__ __forceinline__ void for_each_slot(const Fn& fn) {
#pragma unroll
  for (int s = 0; s < N; ++s) {
    int r, c;
    if constexpr (KMAJOR) {
      gemm::chunk_coord_kmajor<Cfg>(threadIdx.x, s, r, c);
    } else {
      gemm::chunk_coord<Cfg>(threadIdx.x, s, r, c);
    }
    fn(s, r, c);
  }
}

// One source row per load slot of this thread: src[s] = row(tile row of slot s). The kernels
// set the A rows and the B rows of their Loader with it.
template <class Cfg, int N, bool KMAJOR = false, typename P, class Row>
__device__ __forceinline__ void slot_rows(P (&src)[N], const Row& row) {
  for_each_slot<Cfg, N, KMAJOR>([&](int s, int r, int) { src[s] = row(r); });
}

// The main loop both engines share: global -> registers -> smem, double-buffered smem with
// register prefetch, one barrier per k tile. compute(Ac, Bc) runs on the current stage (A tile
// Ac, B tile Bc[op] of operand op) while the next tile's loads are in flight. ALIGNED: smem rows
// are 16-byte aligned, so chunks are stored in one access.
template <typename T, class Cfg, int NB, bool ALIGNED, class Loader, class Compute>
__device__ __forceinline__ void pipelined_mainloop(unsigned char* smem, const Loader& ld, int nk,
                                                   const Compute& compute) {
  using Chunk = Pack<T, Cfg::VEC>;
  constexpr bool B_KMAJOR = gemm::BKMajor<Loader>::value;
  if (nk <= 0) return;
  T* As = reinterpret_cast<T*>(smem);        // [2][A_STAGE]
  T* Bs = As + 2 * Cfg::A_STAGE;             // [NB][2][B_STAGE]
  // smem offset and reduction column of each load slot
  int a_off[Cfg::A_CHUNKS], a_col[Cfg::A_CHUNKS], b_off[Cfg::B_CHUNKS], b_col[Cfg::B_CHUNKS];
  for_each_slot<Cfg, Cfg::A_CHUNKS>([&](int s, int r, int c) {
    a_off[s] = gemm::smem_offset<Cfg>(r, c);
    a_col[s] = c;
  });
  for_each_slot<Cfg, Cfg::B_CHUNKS, B_KMAJOR>([&](int s, int r, int c) {
    b_off[s] = gemm::smem_offset<Cfg>(r, c);
    b_col[s] = c;
  });
  Chunk ra[Cfg::A_CHUNKS];
  Chunk rb[NB][Cfg::B_CHUNKS];
  auto fetch = [&](int k0) {
#pragma unroll
    for (int s = 0; s < Cfg::A_CHUNKS; ++s) ra[s] = ld.a(s, k0 + a_col[s]);
#pragma unroll
    for (int op = 0; op < NB; ++op)
#pragma unroll
      for (int s = 0; s < Cfg::B_CHUNKS; ++s) rb[op][s] = ld.b(op, s, k0 + b_col[s]);
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int s = 0; s < Cfg::A_CHUNKS; ++s)
      store_chunk<T, Cfg::VEC, ALIGNED>(As + buf * Cfg::A_STAGE + a_off[s], ra[s]);
#pragma unroll
    for (int op = 0; op < NB; ++op)
#pragma unroll
      for (int s = 0; s < Cfg::B_CHUNKS; ++s) {
        T* dst = Bs + (op * 2 + buf) * Cfg::B_STAGE + b_off[s];
        if constexpr (B_KMAJOR) {
          store_chunk_down<T, Cfg::VEC, Cfg::LDS>(dst, rb[op][s]);
        } else {
          store_chunk<T, Cfg::VEC, ALIGNED>(dst, rb[op][s]);
        }
      }
  };
  fetch(0);
  stash(0);
  __syncthreads();
  for (int kt = 0; kt < nk; ++kt) {
    const int cur = kt & 1;
    const bool more = kt + 1 < nk;
    if (more) fetch((kt + 1) * Cfg::BK);  // in flight while the current tile is computed
    const T* Bc[NB];
#pragma unroll
    for (int op = 0; op < NB; ++op) Bc[op] = Bs + (op * 2 + cur) * Cfg::B_STAGE;
    compute(As + cur * Cfg::A_STAGE, Bc);
    if (more) stash(cur ^ 1);  // the other stage: nobody reads it until the barrier below
    __syncthreads();
  }
}

template <typename T, class Cfg, int NB>
struct TcEngine {
  using Elem = T;
  using Config = Cfg;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T,
                                       nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T,
                                       nvcuda::wmma::col_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  struct Acc {
    FragC f[NB][Cfg::FM][Cfg::FN];
  };
  static constexpr int TILE_BYTES =
      (2 * Cfg::A_STAGE + 2 * NB * Cfg::B_STAGE) * static_cast<int>(sizeof(T));
  static constexpr int SCRATCH_BYTES = Cfg::WARPS * NB * Cfg::SCRATCH * 4;
  static constexpr int SMEM_BYTES = TILE_BYTES > SCRATCH_BYTES ? TILE_BYTES : SCRATCH_BYTES;
  static_assert(SMEM_BYTES <= 46 * 1024, "static shared memory");

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int op = 0; op < NB; ++op)
#pragma unroll
      for (int fi = 0; fi < Cfg::FM; ++fi)
#pragma unroll
        for (int fj = 0; fj < Cfg::FN; ++fj) nvcuda::wmma::fill_fragment(acc.f[op][fi][fj], 0.0f);
  }

  template <class Loader>
  __device__ static void mainloop(unsigned char* smem, const Loader& ld, int nk, Acc& acc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the host only launches the tensor-core path on sm_80+
#else
    int wm, wn;
    gemm::warp_coord<Cfg>(threadIdx.x / 32, wm, wn);
    pipelined_mainloop<T, Cfg, NB, true>(smem, ld, nk, [&](const T* Ac, const T* const* Bc) {
#pragma unroll
      for (int kk = 0; kk < Cfg::BK / 16; ++kk) {
        FragA a[Cfg::FM];
#pragma unroll
        for (int fi = 0; fi < Cfg::FM; ++fi)
          nvcuda::wmma::load_matrix_sync(a[fi], Ac + gemm::a_frag_offset<Cfg>(wm, fi, kk), Cfg::LDS);
#pragma unroll
        for (int op = 0; op < NB; ++op) {
          FragB b[Cfg::FN];
#pragma unroll
          for (int fj = 0; fj < Cfg::FN; ++fj)
            nvcuda::wmma::load_matrix_sync(b[fj], Bc[op] + gemm::b_frag_offset<Cfg>(wn, fj, kk),
                                           Cfg::LDS);
#pragma unroll
          for (int fi = 0; fi < Cfg::FM; ++fi)
#pragma unroll
            for (int fj = 0; fj < Cfg::FN; ++fj)
              nvcuda::wmma::mma_sync(acc.f[op][fi][fj], a[fi], b[fj], acc.f[op][fi][fj]);
        }
      }
    });
#endif
  }

  // Fragments go through a per-warp fp32 scratch that overlays the (finished) tile buffers.
  template <class Epi>
  __device__ static void epilogue(unsigned char* smem, Acc& acc, const Epi& epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    const int tid = threadIdx.x, lane = tid % 32;
    int wm, wn;
    gemm::warp_coord<Cfg>(tid / 32, wm, wn);
    float* scratch = reinterpret_cast<float*>(smem) + (tid / 32) * NB * Cfg::SCRATCH;
#pragma unroll
    for (int fi = 0; fi < Cfg::FM; ++fi) {
#pragma unroll
      for (int fj = 0; fj < Cfg::FN; ++fj) {
#pragma unroll
        for (int op = 0; op < NB; ++op)
          nvcuda::wmma::store_matrix_sync(scratch + op * Cfg::SCRATCH, acc.f[op][fi][fj], 16,
                                          nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          int r, c;
          gemm::scratch_lane_coord(lane, e, r, c);
          float v[NB];
#pragma unroll
          for (int op = 0; op < NB; ++op) v[op] = scratch[op * Cfg::SCRATCH + r * 16 + c];
          epi(gemm::frag_row0<Cfg>(wm, fi) + r, gemm::frag_col0<Cfg>(wn, fj) + c, v);
        }
        __syncwarp();  // the scratch is rewritten by the next fragment
      }
    }
#endif
  }

  // The accumulators of operand 0 as a row-major fp32 tile (row stride ld, a multiple of 4) in
  // shared memory, straight from the fragments: for a block that reduces along the tile's rows
  // (the scratch of `epilogue` would hand each lane scattered elements).
  __device__ static void store(float* tile, int ld, const Acc& acc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    int wm, wn;
    gemm::warp_coord<Cfg>(threadIdx.x / 32, wm, wn);
#pragma unroll
    for (int fi = 0; fi < Cfg::FM; ++fi)
#pragma unroll
      for (int fj = 0; fj < Cfg::FN; ++fj)
        nvcuda::wmma::store_matrix_sync(
            tile + gemm::frag_row0<Cfg>(wm, fi) * ld + gemm::frag_col0<Cfg>(wn, fj),
            acc.f[0][fi][fj], ld, nvcuda::wmma::mem_row_major);
#endif
  }
};

template <class Cfg, int NB>
struct FmaEngine {
  using Elem = float;
  using Config = Cfg;
  struct Acc {
    float v[NB][Cfg::TM][Cfg::TN];
  };
  static constexpr int SMEM_BYTES = (2 * Cfg::A_STAGE + 2 * NB * Cfg::B_STAGE) * 4;
  static_assert(SMEM_BYTES <= 46 * 1024, "static shared memory");

  __device__ static void zero(Acc& acc) { acc = Acc{}; }

  template <class Loader>
  __device__ static void mainloop(unsigned char* smem, const Loader& ld, int nk, Acc& acc) {
    const int tid = threadIdx.x;
    int rows[Cfg::TM], cols[Cfg::TN];
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) rows[i] = gemm::fma_row<Cfg>(tid, i) * Cfg::LDS;
#pragma unroll
    for (int j = 0; j < Cfg::TN; ++j) cols[j] = gemm::fma_col<Cfg>(tid, j) * Cfg::LDS;
    // odd row stride (no bank conflicts): rows are not 16-byte aligned
    pipelined_mainloop<float, Cfg, NB, false>(smem, ld, nk, [&](const float* Ac,
                                                                const float* const* Bc) {
#pragma unroll 4
      for (int kk = 0; kk < Cfg::BK; ++kk) {
        float a[Cfg::TM];
#pragma unroll
        for (int i = 0; i < Cfg::TM; ++i) a[i] = Ac[rows[i] + kk];
#pragma unroll
        for (int op = 0; op < NB; ++op) {
          float b[Cfg::TN];
#pragma unroll
          for (int j = 0; j < Cfg::TN; ++j) b[j] = Bc[op][cols[j] + kk];
#pragma unroll
          for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::TN; ++j) acc.v[op][i][j] = fmaf(a[i], b[j], acc.v[op][i][j]);
        }
      }
    });
  }

  template <class Epi>
  __device__ static void epilogue(unsigned char*, Acc& acc, const Epi& epi) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) {
        float v[NB];
#pragma unroll
        for (int op = 0; op < NB; ++op) v[op] = acc.v[op][i][j];
        epi(gemm::fma_row<Cfg>(tid, i), gemm::fma_col<Cfg>(tid, j), v);
      }
    }
  }

  // TcEngine::store for the FMA accumulators.
  __device__ static void store(float* tile, int ld, const Acc& acc) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j)
        tile[gemm::fma_row<Cfg>(tid, i) * ld + gemm::fma_col<Cfg>(tid, j)] = acc.v[0][i][j];
  }
};

// A Loader for operands read along contiguous rows: A rows a_src[slot], B rows b_src[op][slot]
// (null: a row outside the problem, zeros), `din` elements each; vec_a / vec_b: the rows are
// 16-byte aligned (dev::rows_vectorizable).
template <typename T, class Cfg, int NB>
struct RowsLoader {
  using Chunk = Pack<T, Cfg::VEC>;
  const T* a_src[Cfg::A_CHUNKS];
  const T* b_src[NB][Cfg::B_CHUNKS];
  int din;
  bool vec_a, vec_b;
  __device__ Chunk a(int s, int col) const {
    return load_row_chunk<T, Cfg::VEC>(a_src[s], col, din, vec_a);
  }
  __device__ Chunk b(int op, int s, int col) const {
    return load_row_chunk<T, Cfg::VEC>(b_src[op][s], col, din, vec_b);
  }
};

// The engine a dtype runs on: FMA for fp32, tensor cores for fp16 / bf16.
template <typename T, class TcCfg, class FmaCfg, int NB>
using EngineFor = std::conditional_t<std::is_same_v<T, float>, FmaEngine<FmaCfg, NB>,
                                     TcEngine<T, TcCfg, NB>>;

// A block's whole GEMM: zeroed accumulators, the main loop over nk k tiles, the epilogue.
template <class Engine, class Loader, class Epi>
__device__ __forceinline__ void gemm_tile(unsigned char* smem, const Loader& ld, int nk,
                                          const Epi& epi) {
  typename Engine::Acc acc;
  Engine::zero(acc);
  Engine::mainloop(smem, ld, nk, acc);
  Engine::epilogue(smem, acc, epi);
}

// Fills the part of tile (m0, n0) of a [M, N] matrix that lies inside it with value(m, n).
template <class Cfg, typename T, class Value>
__device__ __forceinline__ void fill_tile(T* out, int m0, int n0, int M, int N, const Value& value) {
  for (int e = threadIdx.x; e < Cfg::BM * Cfg::BN; e += Cfg::THREADS) {
    int r, c;
    tile_elem_coord(e, Cfg::BN, r, c);
    const int m = m0 + r, n = n0 + c;
    if (m < M && n < N) out[static_cast<index_t>(m) * N + n] = value(m, n);
  }
}

}  // namespace dev
}  // namespace probprune
