// Mask sampling and compaction: one launch for all K masks (grid = K blocks for compaction).
// Block logic: csrc/probprune/mask_logic.h.
#include "kernels/device_utils.cuh"
#include "probprune/launchers.h"
#include "probprune/mask_logic.h"

namespace probprune {
namespace {

using namespace mask;

template <typename F>
__global__ void sample_masks_kernel(const F* __restrict__ probs, const F* __restrict__ uniforms,
                                    bool* __restrict__ masks, int n, index_t total) {
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    masks[e] = sample_bit(uniforms[e], probs[e % n]);
  }
}

// One block per mask. Flags come from `masks` when it is given, else from sampling
// uniforms < probs (then written to masks_out when that is given).
template <typename F>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(const bool* __restrict__ masks, const F* __restrict__ probs,
                   const F* __restrict__ uniforms, bool* __restrict__ masks_out, int n,
                   int capacity, int* __restrict__ idx, int* __restrict__ counts) {
  __shared__ int buf[2][kThreads];
  const int k = blockIdx.x;
  const int tid = threadIdx.x;
  const index_t row = static_cast<index_t>(k) * n;
  int* idx_row = idx + static_cast<index_t>(k) * capacity;
  int running = 0;
  for (int base = 0; base < n; base += kChunk) {
    bool flag[kItems];
    int local = 0;
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int u = chunk_unit(base, tid, it);
      bool b = false;
      if (u < n) {
        b = masks != nullptr ? masks[row + u] : sample_bit(uniforms[row + u], probs[u]);
        if (masks_out != nullptr) masks_out[row + u] = b;
      }
      flag[it] = b;
      local += b ? 1 : 0;
    }
    buf[0][tid] = local;
    __syncthreads();
    int src = 0;
    for (int offset = 1; offset < kThreads; offset <<= 1) {
      scan_step(buf[src], buf[src ^ 1], tid, offset);
      __syncthreads();
      src ^= 1;
    }
    const int inclusive = buf[src][tid];
    const int chunk_total = buf[src][kThreads - 1];
    int pos = first_position(running, inclusive, local);
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      if (flag[it]) emit_index(idx_row, capacity, pos++, chunk_unit(base, tid, it));
    }
    running += chunk_total;
    __syncthreads();  // buf[0] is rewritten by the next chunk
  }
  if (tid == 0) counts[k] = running;
  for (int p = tid; p < capacity; p += kThreads) {
    if (is_padding(p, running)) idx_row[p] = 0;
  }
}

template <typename F>
cudaError_t sample_masks_impl(const void* probs, const void* uniforms, bool* masks, int K, int n,
                              cudaStream_t stream) {
  const index_t total = static_cast<index_t>(K) * n;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  index_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
  sample_masks_kernel<F><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const F*>(probs), static_cast<const F*>(uniforms), masks, n, total);
  return cudaGetLastError();
}

template <typename F>
cudaError_t compact_impl(const bool* masks, const void* probs, const void* uniforms,
                         bool* masks_out, int K, int n, int capacity, int* idx, int* counts,
                         cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  compact_kernel<F><<<K, kThreads, 0, stream>>>(masks, static_cast<const F*>(probs),
                                                 static_cast<const F*>(uniforms), masks_out, n,
                                                 capacity, idx, counts);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sample_masks(DType dt, const void* probs, const void* uniforms, bool* masks,
                                int K, int n, cudaStream_t stream) {
  if (dt == DType::F64) return sample_masks_impl<double>(probs, uniforms, masks, K, n, stream);
  if (dt == DType::F32) return sample_masks_impl<float>(probs, uniforms, masks, K, n, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_compact_masks(const bool* masks, int K, int n, int capacity, int* idx,
                                 int* counts, cudaStream_t stream) {
  return compact_impl<float>(masks, nullptr, nullptr, nullptr, K, n, capacity, idx, counts,
                             stream);
}

cudaError_t launch_sample_compact(DType dt, const void* probs, const void* uniforms, bool* masks,
                                  int K, int n, int capacity, int* idx, int* counts,
                                  cudaStream_t stream) {
  if (dt == DType::F64) {
    return compact_impl<double>(nullptr, probs, uniforms, masks, K, n, capacity, idx, counts,
                                stream);
  }
  if (dt == DType::F32) {
    return compact_impl<float>(nullptr, probs, uniforms, masks, K, n, capacity, idx, counts,
                               stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace probprune
