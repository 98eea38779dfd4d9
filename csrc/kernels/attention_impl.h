// Internal entry points of the two attention paths (csrc/kernels/attention_*.cu).
#pragma once

#include "probprune/launchers.h"

namespace probprune {
namespace detail {

// Tensor-core path for fp16 / bf16 with head_dim <= 128. Sets *ran = false (and enqueues nothing)
// when the device cannot give the kernel its shared memory; the caller then takes the FMA path.
cudaError_t attention_tc(DType dt, const void* q, const void* k, const void* v, const int* counts,
                         void* o, int K, int B, int T, int Hq, int Hkv, int D, float scale_log2,
                         cudaStream_t stream, bool* ran);

// FMA path: any dtype, head_dim <= kMaxHeadDim.
cudaError_t attention_fma(DType dt, const void* q, const void* k, const void* v,
                          const int* counts, void* o, int K, int B, int T, int Hq, int Hkv, int D,
                          float scale_log2, cudaStream_t stream);

// Largest dynamic shared memory a block of the current device may opt in to.
int max_dynamic_smem();

}  // namespace detail
}  // namespace probprune
