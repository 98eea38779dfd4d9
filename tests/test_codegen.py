"""What the compiled gather GEMMs do with memory, read from the code itself (no GPU needed):

* gather-cols with group 1 (down_proj) on a column-major weight loads its weight tiles with
  16-byte vector accesses: Triton (sm_90 PTX, the first autotune config) and CUDA (nvcc PTX);
  on a row-major weight every element of a tile is a scalar load of its own;
* the row offsets of both Triton GEMMs are 64-bit (the TTIR's multiplies of the [BLOCK_M, 1] row
  offsets by the row strides are i64), and a row past 2**31 elements reads the right memory
  under the interpreter.

Triton compiles in a subprocess without TRITON_INTERPRET, with the ptxas bundled with Triton (as
test_triton_compile.py); the interpreter check runs in a subprocess too, since the 32-bit
overflow it guards against sends loads to unmapped memory.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

_COMPILE = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from probprune_kernels.triton import gather_cols, gather_rows

def compile_first_config(autotuner, ptrs, ints, constexprs):
    # The launcher's specializations: ints equal to 1 become constants, pointers (torch's
    # allocations) and ints divisible by 16 carry tt.divisibility=16.
    fn, cfg = autotuner.fn, autotuner.configs[0]
    const, sig, attrs = {**constexprs, **cfg.kwargs}, {}, {}
    for i, (n, p) in enumerate(zip(fn.arg_names, fn.params)):
        if p.is_constexpr or ints.get(n) == 1:
            sig[n] = "constexpr"
            const.setdefault(n, ints.get(n))
        elif n in ptrs:
            sig[n], attrs[(i,)] = ptrs[n], [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
            if ints[n] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = k.asm["ptx"]
    muls = re.findall(r"arith\.muli [^\n]*: (tensor<\d+x\d+xi\d+>)", k.asm["ttir"])
    return dict(
        meta=dict(cfg.kwargs, threads=32 * cfg.num_warps),
        scalar16=len(re.findall(r"\bld\.global(?:\.nc)?\.b16\b", ptx)),
        vec16=len(re.findall(r"\bld\.global(?:\.nc)?\.v4\.b32\b", ptx))
              + len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global [^;]*, 0x10\b", ptx)),
        muls=muls)

# down_proj of a 7B model: Din = 11008 channels, Dout = 4096; M = 1024 tokens per mask.
D, F, M = 4096, 11008, 1024
ptrs = dict(h_ptr="*bf16", w_ptr="*bf16", r_ptr="*bf16", idx_ptr="*i32", cnt_ptr="*i32",
            y_ptr="*bf16")
out = {}
for layout, (s_wo, s_wd) in (("row", (F, 1)), ("col", (1, D))):
    ints = dict(M=M, N_IN=F, DOUT=D, GROUP=1, M_BUCKET=M, stride_hk=M * F, stride_hm=F,
                stride_hj=1, stride_wo=s_wo, stride_wd=s_wd, stride_ik=F, stride_rk=M * D,
                stride_rm=D, stride_ro=1, stride_yk=M * D, stride_ym=D, stride_yo=1)
    out[f"cols_{layout}"] = compile_first_config(
        gather_cols._gather_cols_gemm_kernel, ptrs, ints,
        dict(HAS_RESIDUAL=True, W_COL_MAJOR=layout == "col", DOT_PRECISION="tf32",
             DOT_UPCAST=False))
ints = dict(M=M, DIN=D, N_OUT=F, GROUP=1, M_BUCKET=M, stride_xk=M * D, stride_xm=D, stride_xd=1,
            stride_wo=D, stride_wd=1, stride_ik=F, stride_yk=M * F, stride_ym=F, stride_yn=1)
out["rows"] = compile_first_config(
    gather_rows._gather_rows_swiglu_kernel,
    dict(x_ptr="*bf16", w_ptr="*bf16", w2_ptr="*bf16", b_ptr="*bf16", idx_ptr="*i32",
         cnt_ptr="*i32", y_ptr="*bf16"), ints,
    dict(HAS_BIAS=False, SWIGLU=True, DOT_PRECISION="tf32", DOT_UPCAST=False))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tile_elems_per_thread(meta, rows, cols):
    return meta[rows] * meta[cols] // meta["threads"]


@pytest.mark.slow
def test_triton_gather_cols_group1_weight_loads_are_vectors(triton_sm90):
    row, col = triton_sm90["cols_row"], triton_sm90["cols_col"]
    meta = col["meta"]
    h_elems = _tile_elems_per_thread(meta, "BLOCK_M", "BLOCK_K")  # h tile: scalar (ragged mask)
    w_elems = _tile_elems_per_thread(meta, "BLOCK_K", "BLOCK_N")
    # row-major: the weight tile adds one 2-byte load per element
    assert row["scalar16"] >= h_elems + w_elems, row
    # column-major: 16-byte accesses (8 elements) for the weight, no scalar weight load left
    assert col["scalar16"] <= h_elems, col
    assert col["vec16"] >= w_elems // 8 + row["vec16"], (col, row)


@pytest.mark.slow
def test_triton_row_offsets_are_64_bit(triton_sm90):
    for name in ("cols_col", "cols_row", "rows"):
        block_m = triton_sm90[name]["meta"]["BLOCK_M"]
        row_muls = [t for t in triton_sm90[name]["muls"] if t.startswith(f"tensor<{block_m}x1x")]
        assert row_muls and all(t.endswith("xi64>") for t in row_muls), (name, row_muls)


_PAST_INT32 = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from probprune_kernels.triton import gather_cols, gather_rows

ROW = 1 << 30  # row stride (elements): row 2 starts at element 2**31
M, N = 3, 16
buf = torch.empty(2 * ROW + N, dtype=torch.float16)  # 4 GiB of address space, 3 rows touched
big = buf.as_strided((1, M, N), (M * ROW, ROW, 1))
small = torch.randn(1, M, N).to(torch.float16)
big.copy_(small)
w = torch.randn(N, N).to(torch.float16)
idx, counts = torch.arange(N, dtype=torch.int32)[None], torch.tensor([N], dtype=torch.int32)
for op in (gather_cols.gather_cols_gemm, gather_rows.gather_rows_gemm):
    assert torch.equal(op(big, w, idx, counts, 1), op(small, w, idx, counts, 1)), op.__name__
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(sys.maxsize < 2 ** 40, reason="needs a 64-bit address space")
def test_triton_rows_past_int32_elements_on_the_interpreter():
    """A row whose offset overflows int32 (2 * 2**30 elements): with 32-bit row offsets the
    interpreter reads 4 GiB before the tensor (a crash, or wrong values)."""
    out = subprocess.run([sys.executable, "-c", _PAST_INT32], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode,
                                                                 out.stderr[-2000:])


# ---------------------------------------------------------------------------------------- CUDA

def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or next(
        (p for p in [os.path.join(home, "bin", "nvcc")] if os.path.exists(p)), None)


def _ptx(tmp_path, source_path, extra=()):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path / "out.ptx"
    run = subprocess.run([nvcc, "-arch=sm_90", "-O3", "--use_fast_math", "-std=c++17", "-ptx",
                          "-I", os.path.join(ROOT, "csrc"), *extra, str(source_path),
                          "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out.read_text()


def _entries(ptx):
    """{entry name: body} of a PTX module."""
    return dict(re.findall(r"\.entry (\S+)\((.*?)\n\}\n", ptx, re.S))


def _vector_loads(body):
    return len(re.findall(r"\bld\.global(?:\.nc)?\.v4\.", body))


# The two weight-chunk loads of gather_cols.cu with group 1, as its launcher sets them up: a
# row-major w gets vec_w = group % VEC == 0 (false), a column-major one (wt row-major) reads a
# gathered column as a run of a wt row.
_PROBE = r"""
#include "kernels/device_utils.cuh"
using namespace probprune;
using Chunk = dev::Pack<__half, 8>;

__global__ void row_major_group1(const __half* __restrict__ w, const int* __restrict__ idx,
                                 int din, int live, Chunk* out) {
  const __half* row = w + static_cast<index_t>(blockIdx.x) * din;
  out[blockIdx.x * blockDim.x + threadIdx.x] =
      dev::load_gathered_chunk<__half, 8>(row, idx, threadIdx.x * 8, live, 1, 1 % 8 == 0);
}

__global__ void column_major_group1(const __half* __restrict__ wt, const int* __restrict__ idx,
                                    int dout, int live, bool vec_ok, Chunk* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = dev::load_gathered_row_chunk<__half, 8>(
      wt, idx, blockIdx.x, live, 1, threadIdx.x * 8, dout, vec_ok);
}
"""


def test_cuda_group1_weight_chunk_is_one_vector_load(tmp_path):
    src = tmp_path / "probe.cu"
    src.write_text(_PROBE)
    entries = _entries(_ptx(tmp_path, src))
    rows = next(b for n, b in entries.items() if "row_major_group1" in n)
    cols = next(b for n, b in entries.items() if "column_major_group1" in n)
    assert _vector_loads(rows) == 0 and len(re.findall(r"ld\.global\.nc\.u16", rows)) == 8
    assert _vector_loads(cols) == 1


def test_cuda_gather_cols_has_a_vector_loading_column_major_kernel(tmp_path):
    """gather_cols.cu instantiates a k-major (W_T) kernel per dtype, whose weight loads are the
    chunk loads above: 16-byte accesses for A and B alike."""
    entries = _entries(_ptx(tmp_path, os.path.join(ROOT, "csrc", "kernels", "gather_cols.cu")))
    w_t = {n: b for n, b in entries.items() if "gather_cols_kernel" in n and "ELb1E" in n}
    assert len(w_t) == 3, sorted(entries)  # fp32, fp16, bf16
    for name, body in w_t.items():
        assert _vector_loads(body) >= 4, name
