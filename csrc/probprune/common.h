// Host/device basics shared by the CUDA kernels (csrc/kernels/*.cu) and their CPU emulation
// (csrc/emulation/cpu_emulation.cpp). Plain C++: no torch, no CUDA headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PP_HD __host__ __device__ __forceinline__
#else
#define PP_HD inline
#endif

namespace probprune {

// Global offsets are 64-bit: K * M * N easily passes 2^31 at LLaMA sizes.
using index_t = long long;

PP_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }
PP_HD int imin(int a, int b) { return a < b ? a : b; }
PP_HD int imax(int a, int b) { return a > b ? a : b; }

// Element (r, c) of an R x C tile walked by `e` = 0 .. R*C-1 (row-major; used for tile fills).
PP_HD void tile_elem_coord(int e, int cols, int& r, int& c) {
  r = e / cols;
  c = e % cols;
}

// A chunk of `vec` consecutive elements starting at `c0` lies entirely below `limit`.
PP_HD bool chunk_in_bounds(int c0, int vec, int limit) { return c0 + vec <= limit; }

}  // namespace probprune
