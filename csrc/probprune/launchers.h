// Plain C++ launchers of the CUDA kernels: raw pointers, sizes and a stream; no torch here.
// Inputs are contiguous (the bindings in csrc/bindings.cpp make them so) and already validated
// (shapes, dtypes, index ranges: probprune_kernels/_shapes.py). Every launcher enqueues one
// kernel for all K masks and returns cudaGetLastError() (cudaSuccess for empty problems).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace probprune {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// Largest head_dim of masked_attention (tensor cores up to 128, FMA path up to 256).
constexpr int kMaxHeadDim = 256;

// masks[k, i] = uniforms[k, i] < probs[i]; dt is F32 or F64 (probs already in that dtype).
cudaError_t launch_sample_masks(DType dt, const void* probs, const void* uniforms, bool* masks,
                                int K, int n, cudaStream_t stream);

// bool masks [K, n] -> idx [K, capacity] (ascending kept ids, zero padded), counts [K].
cudaError_t launch_compact_masks(const bool* masks, int K, int n, int capacity, int* idx,
                                 int* counts, cudaStream_t stream);

// Sampling and compaction in one launch; masks may be null (not written).
cudaError_t launch_sample_compact(DType dt, const void* probs, const void* uniforms, bool* masks,
                                  int K, int n, int capacity, int* idx, int* counts,
                                  cudaStream_t stream);

// x [K, M, Din], w [Dout, Din], bias [Dout] or null -> y [K, M, capacity * group].
cudaError_t launch_gather_rows_gemm(DType dt, const void* x, const void* w, const int* idx,
                                    const int* counts, const void* bias, void* y, int K, int M,
                                    int Din, int capacity, int group, cudaStream_t stream);

// x [K, M, Din], w_gate / w_up [F, Din] -> y [K, M, capacity].
cudaError_t launch_gather_rows_swiglu(DType dt, const void* x, const void* w_gate,
                                      const void* w_up, const int* idx, const int* counts, void* y,
                                      int K, int M, int Din, int capacity, cudaStream_t stream);

// h [K, M, capacity * group], w [Dout, Din], residual [K, M, Dout] or null -> y [K, M, Dout].
// w_t: w is column-major, i.e. the pointer holds a row-major wt [Din, Dout].
cudaError_t launch_gather_cols_gemm(DType dt, const void* h, const void* w, bool w_t,
                                    const int* idx, const int* counts, const void* residual,
                                    void* y, int K, int M, int Dout, int Din, int capacity,
                                    int group, cudaStream_t stream);

// q [K, B, T, Hq, D], k / v [K, B, T, Hkv, D], q_counts [K] active query slots, kv_slot [K, Hq]
// the KV head of each active slot (in [0, Hkv); inactive entries are not read)
// -> o [K, B, T, Hq, D].
cudaError_t launch_masked_attention(DType dt, const void* q, const void* k, const void* v,
                                    const int* q_counts, const int* kv_slot, void* o, int K,
                                    int B, int T, int Hq, int Hkv, int D, float scale,
                                    cudaStream_t stream);

// Vocabulary slices launch_lm_head_ce runs K masks of M rows over V entries with on a GPU of
// sm_count SMs: its workspace holds 3 * K * splits * M floats.
int lm_head_ce_splits(int K, int M, int V, int sm_count);

// h [K, M, D], w [V, D], labels int64 [M] (label_stride_k 0) or [K, M] (label_stride_k M)
// -> loss fp32 [K] (NaN for a mask whose labels all equal ignore_index); workspace: see above.
cudaError_t launch_lm_head_ce(DType dt, const void* h, const void* w, const int64_t* labels,
                              int64_t label_stride_k, int64_t ignore_index, float* workspace,
                              float* loss, int K, int M, int D, int V, int splits,
                              cudaStream_t stream);

}  // namespace probprune
