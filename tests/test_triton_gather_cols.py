"""Triton gather-cols GEMM (optional fused residual) against the reference.

fp16/bf16 oracle: the reference in fp32 on the same inputs, then cast (the kernel adds the residual
in fp32 and rounds once; the low-precision torch reference rounds the product first).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402

pytest.importorskip("triton")

from probprune_kernels import ops, reference  # noqa: E402
from probprune_kernels.backends import triton_unavailable_reason  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU this needs TRITON_INTERPRET=1 before anything imports triton (see tests/conftest.py).
SKIP_REASON = triton_unavailable_reason(device=DEVICE)
pytestmark = pytest.mark.skipif(SKIP_REASON is not None,
                                reason=f"triton backend: {SKIP_REASON}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(1, "zero"), (1, "full"), (1, "ragged"), (3, "mixed")]
M, DIN, DOUT = 13, 45, 37  # w [DOUT, DIN]; none a multiple of the interpreter's 16-wide tiles


def _masks(K, pattern, n):
    if pattern == "mixed":
        m = torch.rand(K, n) < 0.5
        m[0], m[1] = False, True
        return m
    return torch.rand(K, n) < {"zero": 0.0, "full": 1.1, "ragged": 0.5}[pattern]


def _setup(K, pattern, group, dtype, cap):
    n = DIN // group
    masks = _masks(K, pattern, n)
    capacity = max(int(masks.sum(1).max()), 1) if cap == "tight" else None
    idx, counts = reference.compact_masks(masks, capacity)
    w = (torch.randn(DOUT, DIN) / DIN ** 0.5).to(dtype)
    w[:, (~masks.any(0)).repeat_interleave(group)] = float("nan")  # never-kept columns
    h = torch.randn(K, M, idx.shape[1] * group).to(dtype)
    for k, c in enumerate(counts.tolist()):
        h[k, :, c * group:] = float("nan")  # compact padding must not be read
    return h, w, idx, counts


@pytest.mark.parametrize("K,pattern", CASES)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cap", [None, "tight"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_cols_gemm(K, pattern, group, with_residual, cap, dtype):
    h, w, idx, counts = _setup(K, pattern, group, dtype, cap)
    res = torch.randn(K, M, DOUT).to(dtype) if with_residual else None
    dev = [t.to(DEVICE) if t is not None else None for t in (h, w, idx, counts, res)]
    y = ops.gather_cols_gemm(*dev[:4], group, dev[4], backend="triton").cpu()
    expected = reference.gather_cols_gemm(h.float(), w.float(), idx, counts, group,
                                          None if res is None else res.float()).to(dtype)
    assert y.dtype == dtype and y.shape == (K, M, DOUT)
    assert_close(y, expected, dtype)


def test_gather_cols_residual_not_modified():
    h, w, idx, counts = _setup(3, "mixed", 3, torch.float32, None)
    res = torch.randn(3, M, DOUT).to(DEVICE)
    before = res.clone()
    ops.gather_cols_gemm(h.to(DEVICE), w.to(DEVICE), idx.to(DEVICE), counts.to(DEVICE), 3, res,
                         backend="triton")
    assert torch.equal(res, before)


@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck_gather_cols_gemm_triton(with_residual):
    h, w, idx, counts = _setup(3, "mixed", 3, torch.float32, None)
    h, w = torch.nan_to_num(h), torch.nan_to_num(w)
    res = torch.randn(3, M, DOUT) if with_residual else None
    args = [t.to(DEVICE) if t is not None else None for t in (h, w, idx, counts, res)]
    torch.library.opcheck(torch.ops.probprune.gather_cols_gemm.default,
                          (*args[:4], 3, args[4], "triton"))
