"""Shared launcher helpers: autotune config lists, the dot precision, the M bucket.

Under ``TRITON_INTERPRET=1`` every kernel gets a single small config: the interpreter runs each
program in numpy, so autotuning (which times every config) would take minutes for nothing.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# torch -> Triton element types for the kernels' output casts.
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def gemm_tile(cnt_ptr, M, N, GROUP, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):
    """The output tile of a gather GEMM program: grid (tiles of [M, N], K masks).

    Returns (mask id k as int64, column tile index, k's active width ``counts[k] * GROUP``, row
    offsets, column offsets). Tiles go in grouped order (Triton matmul tutorial): GROUP_M row
    tiles share the same weight columns while they are hot in L2.
    """
    pid = tl.program_id(0)
    mask_id = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    n_active = tl.load(cnt_ptr + mask_id) * GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return mask_id, pid_n, n_active, offs_m, offs_n


def on_device(tensor: torch.Tensor):
    """Context for a launch on ``tensor``'s device. Triton launches into the *current* CUDA
    context, so without it a kernel on cuda:1 tensors would run in cuda:0's context (invalid
    addresses, or a silent cross-device read with peer access)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def configs(gpu_configs, interpret_config):
    """``gpu_configs`` (a list of (meta dict, num_warps, num_stages)) on a GPU, one config when
    interpreting.

    ``PROBPRUNE_TRITON_AUTOTUNE=first`` keeps only the first GPU config, so nothing is tuned: a
    test run on a fresh GPU (bench/gpu_check.sh) would otherwise compile and time every config
    of every new shape key, one case after another. Read when the kernel modules are imported
    (their autotune decorators take the list then)."""
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=1, num_stages=1)]
    mode = os.environ.get("PROBPRUNE_TRITON_AUTOTUNE", "full")
    if mode not in ("full", "first"):
        raise ValueError(f"PROBPRUNE_TRITON_AUTOTUNE must be full or first, got {mode!r}")
    if mode == "first":
        gpu_configs = gpu_configs[:1]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu_configs]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch (off in tests: exact fp32 products); fp16/bf16 use
    the tensor cores' native products with fp32 accumulation."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def bucket(m: int) -> int:
    """Autotune key for the token dimension: power-of-two buckets, so a new batch size within the
    same bucket reuses the tuned config (M is static per run; active counts never enter keys)."""
    return triton.next_power_of_2(max(int(m), 1))


def dot_upcast(dtype: torch.dtype) -> bool:
    """True when tile operands must be cast to fp32 before ``tl.dot``: the interpreter stores
    bf16 as raw uint16 and its numpy ``dot`` would multiply the bit patterns. bf16 x bf16 products
    are exact in fp32 and the GPU accumulates in fp32 too, so the result is the same."""
    return INTERPRET and dtype == torch.bfloat16


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the buffer a kernel stores into. The interpreter's fp32 -> bf16 cast truncates
    (and its "rtne" mode mis-rounds carries), so when interpreting, bf16 results are stored in
    fp32 and rounded by torch (round-to-nearest-even, like the GPU's cast). See ``finish``."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def finish(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Casts a kernel's output buffer to the op's dtype (a no-op except when interpreting bf16)."""
    return y if y.dtype == dtype else y.to(dtype)


# The tile configs of both gather GEMMs: (meta, num_warps, num_stages) for large GPUs (A100/H100),
# small-M ones for short batches; one tiny tile under the interpreter.
_GEMM_TILES = [
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 8, 3),
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), 4, 4),
    (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 3),
    (dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=4), 4, 4),
    (dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1), 4, 4),
]
_INTERPRET_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
GEMM_CONFIGS = configs(_GEMM_TILES, _INTERPRET_TILE)
# The fused SwiGLU holds a second accumulator: in bf16/fp16 the first three tiles spill on sm_90
# (4 to 1,256 bytes, docs/gpu-static-checks.md), the others fit.
SWIGLU_CONFIGS = configs(_GEMM_TILES[3:], _INTERPRET_TILE)
