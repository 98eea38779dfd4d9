// CPU build of the CUDA kernels' block logic, for tests without a GPU.
//
// Each function below replays one kernel of csrc/kernels/ block by block, thread by thread (or
// warp by warp, fragment by fragment) on CPU tensors, calling the same __host__ __device__ header
// functions as the kernel (csrc/probprune/*_logic.h) for every index, bound, early exit, scan step,
// fragment offset and softmax update. Shared memory, registers and WMMA fragments are emulated
// with float arrays; values stored in a 16-bit dtype are rounded where the kernel rounds them.
// On top of the values, the emulation checks coverage: every shared-memory tile element is staged
// exactly once per stage, every accumulator element belongs to exactly one fragment / thread, and
// every output element is written exactly once over the whole grid (a std::runtime_error names the
// first violation).
//
// Not part of probprune_kernels._C (setup.py skips csrc/emulation/); tests build it with
// torch.utils.cpp_extension.load (g++ only, is_python_module=False) and call the ops registered
// below as torch.ops.probprune_emu.<op>. Only light ATen headers are included, so the build takes
// seconds rather than the half minute torch/extension.h costs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "probprune/attention_logic.h"
#include "probprune/gemm_logic.h"
#include "probprune/lm_head_logic.h"
#include "probprune/mask_logic.h"

namespace {

namespace pp = probprune;
using at::Tensor;
using pp::index_t;

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("emulation: " + msg); }

// Coverage: every entry of `counts` (how often element e was written / owned / handled) is 1.
template <class Counts>
void expect_once(const Counts& counts, const std::string& what) {
  for (size_t e = 0; e < std::size(counts); ++e)
    if (counts[e] != 1)
      fail(what + " " + std::to_string(e) + " handled " + std::to_string(counts[e]) +
           " times (expected once)");
}

float round_to(at::ScalarType st, float v) {
  if (st == at::kHalf) return static_cast<float>(c10::Half(v));
  if (st == at::kBFloat16) return static_cast<float>(c10::BFloat16(v));
  return v;
}

std::vector<float> to_vec(const Tensor& t) {
  Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

std::vector<int> to_ivec(const Tensor& t) {
  Tensor f = t.to(at::kInt).contiguous();
  return std::vector<int>(f.data_ptr<int>(), f.data_ptr<int>() + f.numel());
}

// Output buffer that counts the writes to every element.
struct Output {
  std::vector<float> v;
  std::vector<int> writes;
  at::ScalarType dtype;
  Output(index_t n, at::ScalarType dt) : v(n, 0.0f), writes(n, 0), dtype(dt) {}
  void write(index_t i, float x) {
    if (i < 0 || i >= static_cast<index_t>(v.size())) fail("write out of bounds at " + std::to_string(i));
    v[i] = round_to(dtype, x);
    ++writes[i];
  }
  Tensor finish(at::IntArrayRef shape) const {
    expect_once(writes, "output element");
    Tensor t = at::from_blob(const_cast<float*>(v.data()), shape,
                             at::TensorOptions().dtype(at::kFloat)).clone();
    return t.to(dtype);
  }
};

// Shared-memory stage with write counting.
struct Smem {
  std::vector<float> v;
  std::vector<int> writes;
  explicit Smem(int n) : v(n, 0.0f), writes(n, 0) {}
  void reset_counts() { std::fill(writes.begin(), writes.end(), 0); }
  void store(int off, float x) {
    if (off < 0 || off >= static_cast<int>(v.size())) fail("smem store out of bounds");
    v[off] = x;
    ++writes[off];
  }
  // every element (r, c) of a rows x cols tile with stride ld written exactly once
  void expect_tile(int rows, int cols, int ld, const char* what) const {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c)
        if (writes[r * ld + c] != 1)
          fail(std::string(what) + " smem element (" + std::to_string(r) + ", " + std::to_string(c) +
               ") staged " + std::to_string(writes[r * ld + c]) + " times");
  }
};

// ------------------------------------------------------------------------------------------------
// GEMM engines (mirror csrc/kernels/gemm_engine.cuh)
//
// load(op, tile_row, reduction_col) -> value of operand op (op -1: A).

// The two smem stages of A and of each B operand, staged the way every thread's fetch + stash
// does it (gemm::chunk_coord, gemm::smem_offset; B by gemm::chunk_coord_kmajor down the tile
// rows when the load says B_KMAJOR, as the kernels' loaders do), each element once per stage.
template <class Cfg, int NB>
struct Stages {
  std::vector<Smem> a, b;  // a[buf], b[op * 2 + buf]
  Stages() : a(2, Smem(Cfg::A_STAGE)), b(2 * NB, Smem(Cfg::B_STAGE)) {}

  template <class Load>
  void stage(int buf, int k0, const Load& load) {
    a[buf].reset_counts();
    for (int op = 0; op < NB; ++op) b[op * 2 + buf].reset_counts();
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int op = -1; op < NB; ++op) {
        Smem& dst = op < 0 ? a[buf] : b[op * 2 + buf];
        const bool kmajor = op >= 0 && pp::gemm::BKMajor<Load>::value;
        for (int s = 0; s < (op < 0 ? Cfg::A_CHUNKS : Cfg::B_CHUNKS); ++s) {
          int r, c;
          if (kmajor) {
            pp::gemm::chunk_coord_kmajor<Cfg>(tid, s, r, c);
            for (int e = 0; e < Cfg::VEC; ++e)
              dst.store(pp::gemm::smem_offset<Cfg>(r + e, c), load(op, r + e, k0 + c));
          } else {
            pp::gemm::chunk_coord<Cfg>(tid, s, r, c);
            for (int e = 0; e < Cfg::VEC; ++e)
              dst.store(pp::gemm::smem_offset<Cfg>(r, c) + e, load(op, r, k0 + c + e));
          }
        }
      }
    a[buf].expect_tile(Cfg::BM, Cfg::BK, Cfg::LDS, "A");
    for (int op = 0; op < NB; ++op) b[op * 2 + buf].expect_tile(Cfg::BN, Cfg::BK, Cfg::LDS, "B");
  }
  const float* A(int buf) const { return a[buf].v.data(); }
  const float* B(int op, int buf) const { return b[op * 2 + buf].v.data(); }
};

// pipelined_mainloop: stage 0, then per k tile compute(stages, cur) and the next tile staged
// into the other buffer.
template <class Cfg, int NB, class Load, class Compute>
void pipelined_mainloop(int nk, const Load& load, const Compute& compute) {
  if (nk <= 0) return;
  Stages<Cfg, NB> st;
  st.stage(0, 0, load);
  for (int kt = 0; kt < nk; ++kt) {
    const int cur = kt & 1;
    compute(st, cur);
    if (kt + 1 < nk) st.stage(cur ^ 1, (kt + 1) * Cfg::BK, load);
  }
}

template <class Cfg, int NB>
struct TcEmu {
  // acc[op][tile_row * BN + tile_col]
  static float& at(std::vector<float>& acc, int op, int row, int col) {
    return acc[static_cast<size_t>(op) * Cfg::BM * Cfg::BN + row * Cfg::BN + col];
  }

  template <class Load>
  static void mainloop(int nk, const Load& load, std::vector<float>& acc) {
    acc.assign(static_cast<size_t>(NB) * Cfg::BM * Cfg::BN, 0.0f);
    // each accumulator element belongs to exactly one (warp, fi, fj) fragment
    std::vector<int> owner(Cfg::BM * Cfg::BN, 0);
    for (int warp = 0; warp < Cfg::WARPS; ++warp) {
      int wm, wn;
      pp::gemm::warp_coord<Cfg>(warp, wm, wn);
      for (int fi = 0; fi < Cfg::FM; ++fi)
        for (int fj = 0; fj < Cfg::FN; ++fj)
          for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
              ++owner[(pp::gemm::frag_row0<Cfg>(wm, fi) + r) * Cfg::BN +
                      pp::gemm::frag_col0<Cfg>(wn, fj) + c];
    }
    expect_once(owner, "accumulator element (fragments)");
    pipelined_mainloop<Cfg, NB>(nk, load, [&](const Stages<Cfg, NB>& st, int cur) {
      for (int warp = 0; warp < Cfg::WARPS; ++warp) {
        int wm, wn;
        pp::gemm::warp_coord<Cfg>(warp, wm, wn);
        for (int kk = 0; kk < Cfg::BK / 16; ++kk)
          for (int op = 0; op < NB; ++op)
            for (int fi = 0; fi < Cfg::FM; ++fi)
              for (int fj = 0; fj < Cfg::FN; ++fj) {
                // wmma: A row-major (ld LDS), B col-major (ld LDS), 16x16x16
                const float* a = st.A(cur) + pp::gemm::a_frag_offset<Cfg>(wm, fi, kk);
                const float* b = st.B(op, cur) + pp::gemm::b_frag_offset<Cfg>(wn, fj, kk);
                for (int r = 0; r < 16; ++r)
                  for (int c = 0; c < 16; ++c) {
                    float sum = 0.0f;
                    for (int t = 0; t < 16; ++t) sum += a[r * Cfg::LDS + t] * b[c * Cfg::LDS + t];
                    at(acc, op, pp::gemm::frag_row0<Cfg>(wm, fi) + r,
                       pp::gemm::frag_col0<Cfg>(wn, fj) + c) += sum;
                  }
              }
      }
    });
  }

  // epi(tile_row, tile_col, const float* v)
  template <class Epi>
  static void epilogue(std::vector<float>& acc, const Epi& epi) {
    for (int warp = 0; warp < Cfg::WARPS; ++warp) {
      int wm, wn;
      pp::gemm::warp_coord<Cfg>(warp, wm, wn);
      for (int fi = 0; fi < Cfg::FM; ++fi)
        for (int fj = 0; fj < Cfg::FN; ++fj) {
          // store_matrix_sync into the warp scratch (row-major, ld 16)
          const int row0 = pp::gemm::frag_row0<Cfg>(wm, fi), col0 = pp::gemm::frag_col0<Cfg>(wn, fj);
          float scratch[NB][16 * 16];
          int seen[16 * 16] = {0};
          for (int op = 0; op < NB; ++op)
            for (int r = 0; r < 16; ++r)
              for (int c = 0; c < 16; ++c) scratch[op][r * 16 + c] = at(acc, op, row0 + r, col0 + c);
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 8; ++e) {
              int r, c;
              pp::gemm::scratch_lane_coord(lane, e, r, c);
              ++seen[r * 16 + c];
              float v[NB];
              for (int op = 0; op < NB; ++op) v[op] = scratch[op][r * 16 + c];
              epi(row0 + r, col0 + c, v);
            }
          expect_once(seen, "scratch element");
        }
    }
  }

  // TcEngine::store: each fragment straight into the row-major tile (row stride ld).
  static void store(const std::vector<float>& acc, Smem& tile, int ld) {
    tile.reset_counts();
    for (int warp = 0; warp < Cfg::WARPS; ++warp) {
      int wm, wn;
      pp::gemm::warp_coord<Cfg>(warp, wm, wn);
      for (int fi = 0; fi < Cfg::FM; ++fi)
        for (int fj = 0; fj < Cfg::FN; ++fj) {
          const int row0 = pp::gemm::frag_row0<Cfg>(wm, fi), col0 = pp::gemm::frag_col0<Cfg>(wn, fj);
          for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
              tile.store((row0 + r) * ld + col0 + c, acc[(row0 + r) * Cfg::BN + col0 + c]);
        }
    }
    tile.expect_tile(Cfg::BM, Cfg::BN, ld, "stored accumulator");
  }
};

template <class Cfg, int NB>
struct FmaEmu {
  // acc[op][tid][i][j]
  static float& at(std::vector<float>& acc, int op, int tid, int i, int j) {
    return acc[((static_cast<size_t>(op) * Cfg::THREADS + tid) * Cfg::TM + i) * Cfg::TN + j];
  }

  template <class Load>
  static void mainloop(int nk, const Load& load, std::vector<float>& acc) {
    acc.assign(static_cast<size_t>(NB) * Cfg::THREADS * Cfg::TM * Cfg::TN, 0.0f);
    std::vector<int> owner(Cfg::BM * Cfg::BN, 0);
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int i = 0; i < Cfg::TM; ++i)
        for (int j = 0; j < Cfg::TN; ++j)
          ++owner[pp::gemm::fma_row<Cfg>(tid, i) * Cfg::BN + pp::gemm::fma_col<Cfg>(tid, j)];
    expect_once(owner, "FMA output element (threads)");
    pipelined_mainloop<Cfg, NB>(nk, load, [&](const Stages<Cfg, NB>& st, int cur) {
      for (int tid = 0; tid < Cfg::THREADS; ++tid)
        for (int kk = 0; kk < Cfg::BK; ++kk)
          for (int op = 0; op < NB; ++op)
            for (int i = 0; i < Cfg::TM; ++i)
              for (int j = 0; j < Cfg::TN; ++j) {
                const float a = st.A(cur)[pp::gemm::fma_row<Cfg>(tid, i) * Cfg::LDS + kk];
                const float b = st.B(op, cur)[pp::gemm::fma_col<Cfg>(tid, j) * Cfg::LDS + kk];
                float& d = at(acc, op, tid, i, j);
                d = std::fma(a, b, d);
              }
    });
  }

  template <class Epi>
  static void epilogue(std::vector<float>& acc, const Epi& epi) {
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int i = 0; i < Cfg::TM; ++i)
        for (int j = 0; j < Cfg::TN; ++j) {
          float v[NB];
          for (int op = 0; op < NB; ++op) v[op] = at(acc, op, tid, i, j);
          epi(pp::gemm::fma_row<Cfg>(tid, i), pp::gemm::fma_col<Cfg>(tid, j), v);
        }
  }

  // FmaEngine::store: each thread's outputs into the row-major tile (row stride ld).
  static void store(const std::vector<float>& acc, Smem& tile, int ld) {
    tile.reset_counts();
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int i = 0; i < Cfg::TM; ++i)
        for (int j = 0; j < Cfg::TN; ++j)
          tile.store(pp::gemm::fma_row<Cfg>(tid, i) * ld + pp::gemm::fma_col<Cfg>(tid, j),
                     acc[(static_cast<size_t>(tid) * Cfg::TM + i) * Cfg::TN + j]);
    tile.expect_tile(Cfg::BM, Cfg::BN, ld, "stored accumulator");
  }
};

// gemm_tile of csrc/kernels/gemm_engine.cuh
template <class Engine, class Load, class Epi>
void gemm_tile(int nk, const Load& load, const Epi& epi) {
  std::vector<float> acc;
  Engine::mainloop(nk, load, acc);
  Engine::epilogue(acc, epi);
}

// fill_tile of csrc/kernels/gemm_engine.cuh
template <class Cfg, class Value>
void fill_tile(Output& out, index_t base, int m0, int n0, int M, int N, const Value& value) {
  for (int tid = 0; tid < Cfg::THREADS; ++tid)
    for (int e = tid; e < Cfg::BM * Cfg::BN; e += Cfg::THREADS) {
      int r, c;
      pp::tile_elem_coord(e, Cfg::BN, r, c);
      const int m = m0 + r, n = n0 + c;
      if (m < M && n < N) out.write(base + static_cast<index_t>(m) * N + n, value(m, n));
    }
}

// The grid of a gather GEMM kernel over an [M, N] output per mask: block(k, m0, n0) for every
// (column tile, row tile, mask k).
template <class Cfg, class Block>
void for_each_block(int K, int M, int N, const Block& block) {
  for (int k = 0; k < K; ++k)
    for (int by = 0; by < pp::ceil_div(M, Cfg::BM); ++by)
      for (int bx = 0; bx < pp::ceil_div(N, Cfg::BN); ++bx) block(k, by * Cfg::BM, bx * Cfg::BN);
}

bool use_tc(const std::string& engine, at::ScalarType dt) {  // "auto", "tc" or "fma"
  if (engine == "tc") return true;
  if (engine == "fma") return false;
  if (engine == "auto") return dt == at::kHalf || dt == at::kBFloat16;  // as the launchers pick
  fail("engine must be 'auto', 'tc' or 'fma', got " + engine);
}

// ------------------------------------------------------------------------------------------------
// gather-rows GEMMs (csrc/kernels/gather_rows.cu): NB = 1 weight with group and bias, NB = 2 the
// fused SwiGLU (w = gate, up; group 1, no bias)

template <class Cfg, class Engine, int NB>
Tensor rows_impl(const Tensor& x, const std::array<Tensor, NB>& w, const Tensor& idx,
                 const Tensor& counts, int group, const std::optional<Tensor>& bias) {
  const int K = x.size(0), M = x.size(1), din = x.size(2), cap = idx.size(1);
  const int n_out = cap * group;
  const auto dt = x.scalar_type();
  const auto xv = to_vec(x);
  std::array<std::vector<float>, NB> wv;
  for (int op = 0; op < NB; ++op) wv[op] = to_vec(w[op]);
  const auto iv = to_ivec(idx), cv = to_ivec(counts);
  std::vector<float> bv;
  if (bias.has_value()) bv = to_vec(*bias);
  Output out(static_cast<index_t>(K) * M * n_out, dt);
  for_each_block<Cfg>(K, M, n_out, [&](int k, int m0, int n0) {
    const int live = pp::gemm::live_extent(cv[k], group);
    const index_t ybase = static_cast<index_t>(k) * M * n_out;
    if (pp::gemm::tile_dead(n0, live)) {
      fill_tile<Cfg>(out, ybase, m0, n0, M, n_out, [](int, int) { return 0.0f; });
      return;
    }
    const int* idx_k = iv.data() + static_cast<index_t>(k) * cap;
    std::vector<int> rows_s(Cfg::BN);
    for (int j = 0; j < Cfg::BN; ++j) rows_s[j] = pp::gemm::gathered_row(idx_k, n0 + j, live, group);
    auto load = [&](int op, int r, int kk) -> float {
      if (op < 0) {
        return (m0 + r < M && kk < din) ? xv[(static_cast<index_t>(k) * M + m0 + r) * din + kk] : 0.0f;
      }
      return (rows_s[r] >= 0 && kk < din) ? wv[op][static_cast<index_t>(rows_s[r]) * din + kk] : 0.0f;
    };
    gemm_tile<Engine>(pp::gemm::num_k_tiles(din, Cfg::BK), load, [&](int r, int c, const float* v) {
      const int m = m0 + r, j = n0 + c;
      if (m >= M || j >= n_out) return;
      float o = 0.0f;
      if (j < live) {
        if constexpr (NB == 2) {
          o = pp::gemm::silu_mul(round_to(dt, v[0]), round_to(dt, v[1]));
        } else {
          o = v[0];
          if (!bv.empty()) o += bv[rows_s[c]];
        }
      }
      out.write(ybase + static_cast<index_t>(m) * n_out + j, o);
    });
  });
  return out.finish({K, M, n_out});
}

Tensor emu_gather_rows_gemm(const Tensor& x, const Tensor& w, const Tensor& idx,
                            const Tensor& counts, int64_t group, const std::optional<Tensor>& bias,
                            c10::string_view engine_sv) {
  using namespace pp::gemm;
  const std::string engine(engine_sv);
  if (use_tc(engine, x.scalar_type()))
    return rows_impl<RowsTc, TcEmu<RowsTc, 1>, 1>(x, {w}, idx, counts, group, bias);
  return rows_impl<RowsFma, FmaEmu<RowsFma, 1>, 1>(x, {w}, idx, counts, group, bias);
}

Tensor emu_gather_rows_swiglu(const Tensor& x, const Tensor& wg, const Tensor& wu, const Tensor& idx,
                              const Tensor& counts, c10::string_view engine_sv) {
  using namespace pp::gemm;
  const std::string engine(engine_sv);
  if (use_tc(engine, x.scalar_type()))
    return rows_impl<SwigluTc, TcEmu<SwigluTc, 2>, 2>(x, {wg, wu}, idx, counts, 1, std::nullopt);
  return rows_impl<SwigluFma, FmaEmu<SwigluFma, 2>, 2>(x, {wg, wu}, idx, counts, 1, std::nullopt);
}

// ------------------------------------------------------------------------------------------------
// gather-cols GEMM (csrc/kernels/gather_cols.cu)

// A load whose B operand is staged k-major (the kernel's loader with B_KMAJOR).
template <class Load>
struct KMajorLoad {
  static constexpr bool B_KMAJOR = true;
  Load load;
  float operator()(int op, int r, int kk) const { return load(op, r, kk); }
};

template <class Cfg, class Engine>
Tensor cols_impl(const Tensor& h, const Tensor& w, const Tensor& idx, const Tensor& counts,
                 int group, const std::optional<Tensor>& residual) {
  const int K = h.size(0), M = h.size(1), cap = idx.size(1), dout = w.size(0), din = w.size(1);
  const index_t h_cols = static_cast<index_t>(cap) * group;
  // As the binding: a column-major w is read as its row-major transpose wt [din, dout].
  const bool w_t = !w.is_contiguous() && w.t().is_contiguous();
  const auto hv = to_vec(h), wv = to_vec(w_t ? w.t() : w);
  const auto iv = to_ivec(idx), cv = to_ivec(counts);
  std::vector<float> rv;
  if (residual.has_value()) rv = to_vec(*residual);
  Output out(static_cast<index_t>(K) * M * dout, h.scalar_type());
  for_each_block<Cfg>(K, M, dout, [&](int k, int m0, int n0) {
    const int live = pp::gemm::live_extent(cv[k], group);
    const index_t ybase = static_cast<index_t>(k) * M * dout;
    auto res = [&](int m, int n) {
      return rv.empty() ? 0.0f : rv[ybase + static_cast<index_t>(m) * dout + n];
    };
    if (pp::gemm::tile_dead(0, live)) {
      fill_tile<Cfg>(out, ybase, m0, n0, M, dout, res);
      return;
    }
    const int* idx_k = iv.data() + static_cast<index_t>(k) * cap;
    auto load = [&](int op, int r, int kk) -> float {
      if (op < 0) {
        return (m0 + r < M && kk < live) ? hv[(static_cast<index_t>(k) * M + m0 + r) * h_cols + kk] : 0.0f;
      }
      if (n0 + r >= dout || kk >= live) return 0.0f;
      const int col = pp::gemm::expand_index(idx_k, kk, group);
      if (col < 0 || col >= din) fail("gathered column out of range");
      return w_t ? wv[static_cast<index_t>(col) * dout + n0 + r]
                 : wv[static_cast<index_t>(n0 + r) * din + col];
    };
    auto epi = [&](int r, int c, const float* v) {
      const int m = m0 + r, n = n0 + c;
      if (m >= M || n >= dout) return;
      out.write(ybase + static_cast<index_t>(m) * dout + n, v[0] + res(m, n));
    };
    const int nk = pp::gemm::num_k_tiles(live, Cfg::BK);
    if (w_t) {
      gemm_tile<Engine>(nk, KMajorLoad<decltype(load)>{load}, epi);
    } else {
      gemm_tile<Engine>(nk, load, epi);
    }
  });
  return out.finish({K, M, dout});
}

Tensor emu_gather_cols_gemm(const Tensor& h, const Tensor& w, const Tensor& idx,
                            const Tensor& counts, int64_t group,
                            const std::optional<Tensor>& residual, c10::string_view engine_sv) {
  using namespace pp::gemm;
  const std::string engine(engine_sv);
  if (use_tc(engine, h.scalar_type()))
    return cols_impl<ColsTc, TcEmu<ColsTc, 1>>(h, w, idx, counts, group, residual);
  return cols_impl<ColsFma, FmaEmu<ColsFma, 1>>(h, w, idx, counts, group, residual);
}

// ------------------------------------------------------------------------------------------------
// masked attention

// The general form's index lists (q_counts [K], kv_slot [K, Hq]) as the kernels read them.
struct HeadSlots {
  std::vector<int> q_counts, kv_slot;
};

// enter_query_tile of csrc/kernels/attention_impl.h: an inactive slot's block writes its zeros
// and gets false; otherwise kvh is the KV head its query slot h reads, which must be a real head
// (the kernels would read out of bounds).
template <class Cfg>
bool enter_query_tile(const HeadSlots& hs, Output& out, int kb, int h, int q0, int B, int T,
                      int Hq, int Hkv, int D, int& kvh) {
  if (!pp::attn::head_active(h, hs.q_counts[kb / B])) {
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int e = tid; e < Cfg::BQ * D; e += Cfg::THREADS) {
        int r, d;
        pp::tile_elem_coord(e, D, r, d);
        if (q0 + r < T) out.write(pp::attn::bthd_offset(kb, q0 + r, h, d, T, Hq, D), 0.0f);
      }
    return false;
  }
  kvh = pp::attn::kv_head(hs.kv_slot.data(), kb / B, h, Hq);
  if (kvh < 0 || kvh >= Hkv)
    fail("query slot " + std::to_string(h) + " of block row " + std::to_string(kb) +
         " reads KV head " + std::to_string(kvh) + ", outside [0, " + std::to_string(Hkv) + ")");
  return true;
}

// tensor-core path (csrc/kernels/attention_tc.cu)

template <int DMAX>
void attention_tc_block(int kb, int h, int qt, int B, int T, int Hq, int Hkv, int D, float scale_log2,
                        const std::vector<float>& qv, const std::vector<float>& kv,
                        const std::vector<float>& vv, const HeadSlots& hs, at::ScalarType dt,
                        Output& out) {
  using Cfg = pp::attn::TcAttnConfig<DMAX>;
  using namespace pp::attn;
  const int q0 = qt * Cfg::BQ;
  int kvh;
  if (!enter_query_tile<Cfg>(hs, out, kb, h, q0, B, T, Hq, Hkv, D, kvh)) return;
  Smem Qs(Cfg::BQ * Cfg::LDQ), Ks(Cfg::BKV * Cfg::LDQ), Vs(Cfg::BKV * Cfg::LDQ);
  std::vector<float> Ss(Cfg::BQ * Cfg::LDS, 0.0f), Ps(Cfg::BQ * Cfg::LDP, 0.0f), Os(Cfg::BQ * Cfg::LDO, 0.0f);
  std::vector<float> Ls(Cfg::BQ, 0.0f);
  auto stage = [&](Smem& s, const std::vector<float>& src, int t0, int head, int H, const char* what) {
    s.reset_counts();
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int c = tid; c < Cfg::BQ * Cfg::CHUNKS_PER_ROW; c += Cfg::THREADS) {
        int r, col;
        attn_chunk_coord<Cfg>(c, r, col);
        for (int e = 0; e < Cfg::VEC; ++e) {
          const int d = col + e;
          const float x = (t0 + r < T && d < D) ? src[bthd_offset(kb, t0 + r, head, d, T, H, D)] : 0.0f;
          s.store(r * Cfg::LDQ + d, x);
        }
      }
    s.expect_tile(Cfg::BQ, Cfg::DMAX, Cfg::LDQ, what);
  };
  static_assert(Cfg::BQ == Cfg::BKV, "the emulation stages Q and K/V tiles with one loop");
  stage(Qs, qv, q0, h, Hq, "Q");
  float m_run[Cfg::WARPS][32], l_run[Cfg::WARPS][32];
  for (int w = 0; w < Cfg::WARPS; ++w)
    for (int l = 0; l < 32; ++l) m_run[w][l] = -INFINITY, l_run[w][l] = 0.0f;
  const int n_kv = kv_end(q0, Cfg::BQ, T);
  for (int kv0 = 0; kv0 < n_kv; kv0 += Cfg::BKV) {
    stage(Ks, kv, kv0, kvh, Hkv, "K");
    stage(Vs, vv, kv0, kvh, Hkv, "V");
    for (int warp = 0; warp < Cfg::WARPS; ++warp) {
      const int strip = warp * Cfg::ROWS_PER_WARP;
      const int row_first = q0 + strip, row_last = row_first + Cfg::ROWS_PER_WARP - 1;
      if (!rows_see_tile(row_first, row_last, kv0, T)) continue;
      // S = Q K^T: Q fragments (row-major, ld LDQ), K as col-major B (ld LDQ)
      for (int j = 0; j < Cfg::FKV; ++j)
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c) {
            float s = 0.0f;
            for (int dd = 0; dd < Cfg::FD; ++dd)
              for (int t = 0; t < 16; ++t)
                s += Qs.v[(strip + r) * Cfg::LDQ + dd * 16 + t] * Ks.v[(j * 16 + c) * Cfg::LDQ + dd * 16 + t];
            Ss[(strip + r) * Cfg::LDS + j * 16 + c] = s;
          }
      // softmax lanes (pairs of lanes share a row: the shfl_xor(., 1) combines them)
      float tmax[32], psum[32], alpha[32], mnew[32];
      int srow[32], c0[32], d0[32];
      std::vector<int> p_written(Cfg::ROWS_PER_WARP * Cfg::BKV, 0), o_scaled(Cfg::ROWS_PER_WARP * Cfg::DMAX, 0);
      for (int lane = 0; lane < 32; ++lane) {
        softmax_lane_coord<Cfg>(lane, srow[lane], c0[lane], d0[lane]);
        tmax[lane] = -INFINITY;
        const int qpos = row_first + srow[lane];
        for (int c = 0; c < Cfg::BKV / 2; ++c) {
          const int col = c0[lane] + c;
          if (key_visible(qpos, kv0 + col, T))
            tmax[lane] = std::fmax(tmax[lane], Ss[(strip + srow[lane]) * Cfg::LDS + col] * scale_log2);
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        const float t = std::fmax(tmax[lane], tmax[lane ^ 1]);
        alpha[lane] = softmax_rescale(m_run[warp][lane], t, &mnew[lane]);
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int qpos = row_first + srow[lane];
        psum[lane] = 0.0f;
        for (int c = 0; c < Cfg::BKV / 2; ++c) {
          const int col = c0[lane] + c;
          const float p = softmax_prob(Ss[(strip + srow[lane]) * Cfg::LDS + col] * scale_log2, mnew[lane],
                                       key_visible(qpos, kv0 + col, T));
          psum[lane] += p;
          Ps[(strip + srow[lane]) * Cfg::LDP + col] = round_to(dt, p);
          ++p_written[srow[lane] * Cfg::BKV + col];
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        const float total = psum[lane] + psum[lane ^ 1];
        l_run[warp][lane] = softmax_sum(l_run[warp][lane], alpha[lane], total);
        m_run[warp][lane] = mnew[lane];
        for (int d = 0; d < Cfg::DMAX / 2; ++d) {
          Os[(strip + srow[lane]) * Cfg::LDO + d0[lane] + d] *= alpha[lane];
          ++o_scaled[srow[lane] * Cfg::DMAX + d0[lane] + d];
        }
      }
      expect_once(p_written, "softmax: probability");
      expect_once(o_scaled, "softmax: rescaled output column");
      // O += P V: P row-major A (ld LDP), V row-major B (ld LDQ), O accumulator (ld LDO)
      for (int f = 0; f < Cfg::FD; ++f)
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c) {
            float acc = Os[(strip + r) * Cfg::LDO + f * 16 + c];
            for (int kk = 0; kk < Cfg::FKV; ++kk)
              for (int t = 0; t < 16; ++t)
                acc += Ps[(strip + r) * Cfg::LDP + kk * 16 + t] * Vs.v[(kk * 16 + t) * Cfg::LDQ + f * 16 + c];
            Os[(strip + r) * Cfg::LDO + f * 16 + c] = acc;
          }
    }
  }
  for (int warp = 0; warp < Cfg::WARPS; ++warp) {
    const int strip = warp * Cfg::ROWS_PER_WARP;
    for (int lane = 0; lane < 32; lane += 2) {
      int sr, c0, d0;
      softmax_lane_coord<Cfg>(lane, sr, c0, d0);
      Ls[strip + sr] = softmax_finish(l_run[warp][lane]);
    }
    for (int r = 0; r < Cfg::ROWS_PER_WARP; ++r) {
      const int t = q0 + strip + r;
      if (t >= T) break;
      for (int lane = 0; lane < 32; ++lane)
        for (int d = lane; d < D; d += 32)
          out.write(bthd_offset(kb, t, h, d, T, Hq, D), Os[(strip + r) * Cfg::LDO + d] * Ls[strip + r]);
    }
  }
}

// FMA path (csrc/kernels/attention_fma.cu)
void attention_fma_block(int kb, int h, int qt, int B, int T, int Hq, int Hkv, int D, float scale_log2,
                         const std::vector<float>& qv, const std::vector<float>& kv,
                         const std::vector<float>& vv, const HeadSlots& hs, Output& out) {
  using Cfg = pp::attn::FmaAttnConfig;
  using namespace pp::attn;
  const int q0 = qt * Cfg::BQ;
  int kvh;
  if (!enter_query_tile<Cfg>(hs, out, kb, h, q0, B, T, Hq, Hkv, D, kvh)) return;
  const int ld = fma_attn_ld(D);
  if (fma_attn_smem_bytes(D) != (Cfg::BQ + 2 * Cfg::BKV) * ld * 4) fail("FMA attention smem size");
  Smem Qs(Cfg::BQ * ld), Ks(Cfg::BKV * ld), Vs(Cfg::BKV * ld);
  for (int tid = 0; tid < Cfg::THREADS; ++tid)
    for (int e = tid; e < Cfg::BQ * D; e += Cfg::THREADS) {
      int r, d;
      pp::tile_elem_coord(e, D, r, d);
      Qs.store(r * ld + d, q0 + r < T ? qv[bthd_offset(kb, q0 + r, h, d, T, Hq, D)] : 0.0f);
    }
  Qs.expect_tile(Cfg::BQ, D, ld, "Q");
  // per warp, lane, row slot
  std::vector<float> acc(Cfg::WARPS * 32 * Cfg::ROWS_PER_WARP * Cfg::DPL, 0.0f);
  auto A = [&](int w, int lane, int rr, int i) -> float& {
    return acc[((w * 32 + lane) * Cfg::ROWS_PER_WARP + rr) * Cfg::DPL + i];
  };
  float m_run[Cfg::WARPS][Cfg::ROWS_PER_WARP], l_run[Cfg::WARPS][Cfg::ROWS_PER_WARP];
  for (int w = 0; w < Cfg::WARPS; ++w)
    for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) m_run[w][rr] = -INFINITY, l_run[w][rr] = 0.0f;
  // every (warp, slot) row is a distinct tile row
  std::vector<int> row_owner(Cfg::BQ, 0);
  for (int w = 0; w < Cfg::WARPS; ++w)
    for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) ++row_owner[fma_attn_row(w, rr)];
  expect_once(row_owner, "FMA attention: query row (warp slots)");
  const int n_kv = kv_end(q0, Cfg::BQ, T);
  for (int kv0 = 0; kv0 < n_kv; kv0 += Cfg::BKV) {
    Ks.reset_counts();
    Vs.reset_counts();
    for (int tid = 0; tid < Cfg::THREADS; ++tid)
      for (int e = tid; e < Cfg::BKV * D; e += Cfg::THREADS) {
        int r, d;
        pp::tile_elem_coord(e, D, r, d);
        const bool in = kv0 + r < T;
        const index_t off = in ? bthd_offset(kb, kv0 + r, kvh, d, T, Hkv, D) : 0;
        Ks.store(r * ld + d, in ? kv[off] : 0.0f);
        Vs.store(r * ld + d, in ? vv[off] : 0.0f);
      }
    Ks.expect_tile(Cfg::BKV, D, ld, "K");
    Vs.expect_tile(Cfg::BKV, D, ld, "V");
    for (int w = 0; w < Cfg::WARPS; ++w)
      for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) {
        const int row = fma_attn_row(w, rr);
        const int qpos = q0 + row;
        if (!rows_see_tile(qpos, qpos, kv0, T)) continue;
        float s[32], p[32];
        bool vis[32];
        float tmax = -INFINITY;
        for (int lane = 0; lane < 32; ++lane) {
          vis[lane] = key_visible(qpos, kv0 + lane, T);
          float acc_s = 0.0f;
          for (int d = 0; d < D; ++d) acc_s = std::fma(Qs.v[row * ld + d], Ks.v[lane * ld + d], acc_s);
          s[lane] = acc_s * scale_log2;
          tmax = std::fmax(tmax, vis[lane] ? s[lane] : -INFINITY);
        }
        float m_new;
        const float alpha = softmax_rescale(m_run[w][rr], tmax, &m_new);
        float total = 0.0f;
        for (int lane = 0; lane < 32; ++lane) {
          p[lane] = softmax_prob(s[lane], m_new, vis[lane]);
          total += p[lane];
        }
        l_run[w][rr] = softmax_sum(l_run[w][rr], alpha, total);
        m_run[w][rr] = m_new;
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < Cfg::DPL; ++i) {
            float& a = A(w, lane, rr, i);
            a *= alpha;
            const int d = fma_attn_dim(lane, i);
            if (d < D)
              for (int j = 0; j < Cfg::BKV; ++j) a = std::fma(p[j], Vs.v[j * ld + d], a);
          }
      }
  }
  for (int w = 0; w < Cfg::WARPS; ++w)
    for (int rr = 0; rr < Cfg::ROWS_PER_WARP; ++rr) {
      const int qpos = q0 + fma_attn_row(w, rr);
      if (qpos >= T) continue;
      const float inv = softmax_finish(l_run[w][rr]);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < Cfg::DPL; ++i) {
          const int d = fma_attn_dim(lane, i);
          if (d < D) out.write(bthd_offset(kb, qpos, h, d, T, Hq, D), A(w, lane, rr, i) * inv);
        }
    }
}

Tensor emu_masked_attention_heads(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& q_counts, const Tensor& kv_slot,
                                  std::optional<double> scale, c10::string_view engine_sv) {
  const std::string engine(engine_sv);
  const int K = q.size(0), B = q.size(1), T = q.size(2), Hq = q.size(3), Hkv = k.size(3), D = q.size(4);
  if (D > 256) fail("head_dim above 256");
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D > 0 ? D : 1));
  const float scale_log2 = static_cast<float>(s) * pp::attn::kLog2e;
  const auto qv = to_vec(q), kv = to_vec(k), vv = to_vec(v);
  const HeadSlots hs{to_ivec(q_counts), to_ivec(kv_slot)};
  const auto dt = q.scalar_type();
  Output out(q.numel(), dt);
  const bool tc = use_tc(engine, dt) && D <= 128;  // as launch_masked_attention picks
  for (int kb = 0; kb < K * B; ++kb)
    for (int h = 0; h < Hq; ++h) {
      if (tc) {
        for (int qt = 0; qt < pp::ceil_div(T, 64); ++qt) {
          if (D <= 64)
            attention_tc_block<64>(kb, h, qt, B, T, Hq, Hkv, D, scale_log2, qv, kv, vv, hs, dt, out);
          else
            attention_tc_block<128>(kb, h, qt, B, T, Hq, Hkv, D, scale_log2, qv, kv, vv, hs, dt, out);
        }
      } else {
        for (int qt = 0; qt < pp::ceil_div(T, pp::attn::FmaAttnConfig::BQ); ++qt)
          attention_fma_block(kb, h, qt, B, T, Hq, Hkv, D, scale_log2, qv, kv, vv, hs, out);
      }
    }
  return out.finish(q.sizes());
}

// ------------------------------------------------------------------------------------------------
// mask sampling and compaction (csrc/kernels/mask_kernels.cu)

Tensor emu_sample_masks(const Tensor& probs, const Tensor& uniforms) {
  const int K = uniforms.size(0), n = uniforms.size(1);
  // compared in the uniforms' dtype, as the bindings prepare it (exact in fp32 for 16-bit types)
  const auto p = to_vec(probs.to(uniforms.scalar_type()));
  const auto u = to_vec(uniforms);
  Tensor masks = at::zeros({K, n}, at::TensorOptions().dtype(at::kBool));
  bool* m = masks.data_ptr<bool>();
  for (index_t e = 0; e < static_cast<index_t>(K) * n; ++e) m[e] = pp::mask::sample_bit(u[e], p[e % n]);
  return masks;
}

// masks given: compaction; else sampling from probs / uniforms, fused. Returns (masks, idx, counts).
std::tuple<Tensor, Tensor, Tensor> emu_compact(const std::optional<Tensor>& masks_in,
                                               const std::optional<Tensor>& probs,
                                               const std::optional<Tensor>& uniforms,
                                               std::optional<int64_t> capacity) {
  using namespace pp::mask;
  const bool sampling = !masks_in.has_value();
  const int K = sampling ? uniforms->size(0) : masks_in->size(0);
  const int n = sampling ? uniforms->size(1) : masks_in->size(1);
  const int cap = static_cast<int>(capacity.value_or(n));
  std::vector<uint8_t> mv;
  std::vector<float> pv, uv;
  if (sampling) {
    pv = to_vec(probs->to(uniforms->scalar_type()));
    uv = to_vec(*uniforms);
  } else {
    Tensor mc = masks_in->to(at::kBool).contiguous();
    mv.assign(mc.data_ptr<bool>(), mc.data_ptr<bool>() + mc.numel());
  }
  Tensor masks = at::zeros({K, n}, at::TensorOptions().dtype(at::kBool));
  Tensor idx = at::full({K, cap}, -1, at::TensorOptions().dtype(at::kInt));
  Tensor counts = at::full({K}, -1, at::TensorOptions().dtype(at::kInt));
  bool* mo = masks.data_ptr<bool>();
  int* io = idx.data_ptr<int>();
  std::vector<int> idx_writes(static_cast<size_t>(K) * cap, 0);
  for (int k = 0; k < K; ++k) {  // one block per mask
    const index_t row = static_cast<index_t>(k) * n;
    int* idx_row = io + static_cast<index_t>(k) * cap;
    int running = 0;
    for (int base = 0; base < n; base += kChunk) {
      std::vector<int> buf0(kThreads), buf1(kThreads), local(kThreads);
      std::vector<std::array<bool, kItems>> flag(kThreads);
      for (int tid = 0; tid < kThreads; ++tid) {
        local[tid] = 0;
        for (int it = 0; it < kItems; ++it) {
          const int u = chunk_unit(base, tid, it);
          bool b = false;
          if (u < n) {
            b = sampling ? sample_bit(uv[row + u], pv[u]) : mv[row + u] != 0;
            mo[row + u] = b;
          }
          flag[tid][it] = b;
          local[tid] += b ? 1 : 0;
        }
        buf0[tid] = local[tid];
      }
      int* bufs[2] = {buf0.data(), buf1.data()};
      int src = 0, steps = 0;
      for (int offset = 1; offset < kThreads; offset <<= 1, ++steps) {
        for (int tid = 0; tid < kThreads; ++tid) scan_step(bufs[src], bufs[src ^ 1], tid, offset);
        src ^= 1;  // (the barrier between steps)
      }
      if (steps != kScanSteps || src != scan_result_buffer(steps)) fail("scan step count");
      const int chunk_total = bufs[src][kThreads - 1];
      for (int tid = 0; tid < kThreads; ++tid) {
        int pos = first_position(running, bufs[src][tid], local[tid]);
        for (int it = 0; it < kItems; ++it)
          if (flag[tid][it]) {
            if (pos < cap) ++idx_writes[static_cast<index_t>(k) * cap + pos];
            emit_index(idx_row, cap, pos++, chunk_unit(base, tid, it));
          }
      }
      running += chunk_total;
    }
    counts.data_ptr<int>()[k] = running;
    for (int tid = 0; tid < kThreads; ++tid)
      for (int p = tid; p < cap; p += kThreads)
        if (is_padding(p, running)) {
          idx_row[p] = 0;
          ++idx_writes[static_cast<index_t>(k) * cap + p];
        }
  }
  expect_once(idx_writes, "idx element");
  return {masks, idx, counts};
}

// ------------------------------------------------------------------------------------------------
// fused lm_head + cross-entropy (csrc/kernels/lm_head_ce.cu)

template <class Cfg, class Engine>
Tensor lm_head_impl(const Tensor& h, const Tensor& w, const Tensor& labels, int64_t ignore_index,
                    int sm_count) {
  namespace lm = pp::lm_head;
  using Tl = lm::Tile<Cfg>;
  const int K = h.size(0), M = h.size(1), D = h.size(2), V = w.size(0);
  const auto hv = to_vec(h), wv = to_vec(w);
  const Tensor lc = labels.to(at::kLong).contiguous();
  const int64_t* lab = lc.data_ptr<int64_t>();
  const index_t lab_stride_k = labels.dim() == 2 ? M : 0;
  const int S = lm::num_splits(K, M, V, sm_count), span = lm::span_of(V, S);
  Output part(3 * static_cast<index_t>(K) * S * M, at::kFloat);
  for (int s = 0; s < S; ++s)
    for (int k = 0; k < K; ++k)
      for (int m0 = 0; m0 < M; m0 += Cfg::BM) {  // block (row tile, k, s)
        int v_begin, v_end;
        lm::split_range(s, span, V, v_begin, v_end);
        if (v_begin >= v_end) fail("vocabulary slice " + std::to_string(s) + " is empty");
        std::vector<int64_t> lab_s(Cfg::BM);
        float run_s[3][Cfg::BM];
        for (int r = 0; r < Cfg::BM; ++r) {
          lab_s[r] = m0 + r < M ? lab[k * lab_stride_k + m0 + r] : -1;
          run_s[0][r] = -INFINITY, run_s[1][r] = 0.0f, run_s[2][r] = 0.0f;
        }
        Smem tile(Cfg::BM * Tl::LD);
        for (int n0 = v_begin; n0 < v_end; n0 += Cfg::BN) {
          auto load = [&](int op, int r, int kk) -> float {
            if (kk >= D) return 0.0f;
            if (op < 0) return m0 + r < M ? hv[(static_cast<index_t>(k) * M + m0 + r) * D + kk] : 0.0f;
            return n0 + r < v_end ? wv[static_cast<index_t>(n0 + r) * D + kk] : 0.0f;
          };
          std::vector<float> acc;
          Engine::mainloop(pp::gemm::num_k_tiles(D, Cfg::BK), load, acc);
          Engine::store(acc, tile, Tl::LD);
          // the row pass: warp `warp` folds its rows, lane `lane` reads COLS_PER_LANE columns
          std::vector<int> read(Cfg::BM * Cfg::BN, 0);
          for (int warp = 0; warp < Tl::WARPS; ++warp)
            for (int i = 0; i < Tl::ROWS_PER_WARP; ++i) {
              const int r = lm::row_of<Cfg>(warp, i);
              float sc[32][Tl::COLS_PER_LANE];
              bool ok[32][Tl::COLS_PER_LANE];
              float tile_max = -INFINITY, target = 0.0f, psum = 0.0f;
              for (int lane = 0; lane < 32; ++lane)
                for (int j = 0; j < Tl::COLS_PER_LANE; ++j) {
                  const int c = lm::col_of(lane, j);
                  ++read[r * Cfg::BN + c];
                  const float z = tile.v[r * Tl::LD + c];
                  ok[lane][j] = n0 + c < v_end;
                  sc[lane][j] = z * pp::attn::kLog2e;
                  if (ok[lane][j]) tile_max = std::fmax(tile_max, sc[lane][j]);
                  if (ok[lane][j] && n0 + c == lab_s[r]) target += z;
                }
              float m_new;
              const float alpha = pp::attn::softmax_rescale(run_s[0][r], tile_max, &m_new);
              for (int lane = 0; lane < 32; ++lane)
                for (int j = 0; j < Tl::COLS_PER_LANE; ++j)
                  psum += pp::attn::softmax_prob(sc[lane][j], m_new, ok[lane][j]);
              run_s[1][r] = pp::attn::softmax_sum(run_s[1][r], alpha, psum);
              run_s[0][r] = m_new;
              run_s[2][r] += target;
            }
          expect_once(read, "logit tile element (row pass)");
        }
        for (int e = 0; e < 3 * Cfg::BM; ++e) {
          int q, r;
          pp::tile_elem_coord(e, Cfg::BM, q, r);
          if (m0 + r < M) part.write(lm::part_offset(q, k, s, m0 + r, K, S, M), run_s[q][r]);
        }
      }
  part.finish({3, K, S, M});  // every partial written once
  // merge: one block per mask, thread tid folding rows tid, tid + kMergeThreads, ...
  std::vector<float> loss(K);
  for (int k = 0; k < K; ++k) {
    float total = 0.0f;
    int count = 0;
    for (int tid = 0; tid < lm::kMergeThreads; ++tid)
      for (int m = tid; m < M; m += lm::kMergeThreads) {
        if (!lm::counted(lab[k * lab_stride_k + m], ignore_index)) continue;
        float mx = -INFINITY, sum = 0.0f, target = 0.0f;
        for (int s = 0; s < S; ++s) {
          lm::lse_fold(mx, sum, part.v[lm::part_offset(0, k, s, m, K, S, M)],
                       part.v[lm::part_offset(1, k, s, m, K, S, M)]);
          target += part.v[lm::part_offset(2, k, s, m, K, S, M)];
        }
        total += lm::row_nll(mx, sum, target);
        ++count;
      }
    loss[k] = lm::mean_or_nan(total, count);
  }
  return at::from_blob(loss.data(), {K}, at::TensorOptions().dtype(at::kFloat)).clone();
}

// sm_count: the SMs the launch plans for (the vocabulary slices depend on it).
Tensor emu_lm_head_ce(const Tensor& h, const Tensor& w, const Tensor& labels, int64_t ignore_index,
                      int64_t sm_count, c10::string_view engine_sv) {
  namespace lm = pp::lm_head;
  const std::string engine(engine_sv);
  if (use_tc(engine, h.scalar_type()))
    return lm_head_impl<lm::Tc, TcEmu<lm::Tc, 1>>(h, w, labels, ignore_index, sm_count);
  return lm_head_impl<lm::Fma, FmaEmu<lm::Fma, 1>>(h, w, labels, ignore_index, sm_count);
}

// The partial kernel's grid (row tiles, K, vocabulary slices) and the slice span.
std::vector<int64_t> lm_head_ce_grid(int64_t K, int64_t M, int64_t V, int64_t sm_count) {
  namespace lm = pp::lm_head;
  const int k = static_cast<int>(K), m = static_cast<int>(M), v = static_cast<int>(V);
  const int S = lm::num_splits(k, m, v, static_cast<int>(sm_count));
  return {pp::ceil_div(m, lm::Tc::BM), k, S, lm::span_of(v, S)};
}

// Tile sizes of the kernels, in the order of CONFIG_NAMES (tests read them to size their shapes).
Tensor configs() {
  using namespace pp::gemm;
  const std::vector<int64_t> v = {
      RowsTc::BM, RowsTc::BN, RowsTc::BK, SwigluTc::BM, SwigluTc::BN, SwigluTc::BK,
      ColsTc::BM, ColsTc::BN, ColsTc::BK, RowsFma::BM, RowsFma::BN, RowsFma::BK,
      SwigluFma::BM, SwigluFma::BN, SwigluFma::BK, ColsFma::BM, ColsFma::BN, ColsFma::BK,
      pp::attn::TcAttnConfig<64>::BQ, pp::attn::FmaAttnConfig::BQ, pp::attn::FmaAttnConfig::BKV,
      pp::mask::kChunk};
  return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())},
                       at::TensorOptions().dtype(at::kLong)).clone();
}

}  // namespace

TORCH_LIBRARY(probprune_emu, m) {
  m.def("sample_masks(Tensor probs, Tensor uniforms) -> Tensor", &emu_sample_masks);
  m.def("compact(Tensor? masks, Tensor? probs, Tensor? uniforms, int? capacity) "
        "-> (Tensor, Tensor, Tensor)", &emu_compact);
  m.def("gather_rows_gemm(Tensor x, Tensor w, Tensor idx, Tensor counts, int group, Tensor? bias, "
        "str engine) -> Tensor", &emu_gather_rows_gemm);
  m.def("gather_rows_swiglu(Tensor x, Tensor w_gate, Tensor w_up, Tensor idx, Tensor counts, "
        "str engine) -> Tensor", &emu_gather_rows_swiglu);
  m.def("gather_cols_gemm(Tensor h, Tensor w, Tensor idx, Tensor counts, int group, "
        "Tensor? residual, str engine) -> Tensor", &emu_gather_cols_gemm);
  m.def("masked_attention_heads(Tensor q, Tensor k, Tensor v, Tensor q_counts, Tensor kv_slot, "
        "float? scale, str engine) -> Tensor", &emu_masked_attention_heads);
  m.def("lm_head_ce(Tensor h, Tensor w, Tensor labels, int ignore_index, int sm_count, "
        "str engine) -> Tensor", &emu_lm_head_ce);
  m.def("lm_head_ce_grid(int K, int M, int V, int sm_count) -> int[]", &lm_head_ce_grid);
  m.def("configs() -> Tensor", &configs);
}
