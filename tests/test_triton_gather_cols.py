"""Triton gather-cols GEMM (optional fused residual) against the reference.

fp16/bf16 oracle: the reference in fp32 on the same inputs, then cast (the kernel adds the residual
in fp32 and rounds once; the low-precision torch reference rounds the product first).
"""
import pytest
import torch

from probprune_kernels import ops, reference
from tests.conftest import assert_close
from tests.triton_support import compacted, gemm_grid, on_device, pattern_masks, requires_triton

pytestmark = requires_triton
M, DIN, DOUT = 13, 45, 37  # w [DOUT, DIN]; none a multiple of the interpreter's 16-wide tiles


def _setup(K, pattern, group, dtype, cap):
    masks = pattern_masks(K, pattern, DIN // group)
    idx, counts = compacted(masks, cap)
    w = (torch.randn(DOUT, DIN) / DIN ** 0.5).to(dtype)
    w[:, (~masks.any(0)).repeat_interleave(group)] = float("nan")  # never-kept columns
    h = torch.randn(K, M, idx.shape[1] * group).to(dtype)
    for k, c in enumerate(counts.tolist()):
        h[k, :, c * group:] = float("nan")  # compact padding must not be read
    return h, w, idx, counts


@gemm_grid
@pytest.mark.parametrize("with_residual", [False, True])
def test_gather_cols_gemm(K, pattern, group, with_residual, cap, dtype):
    h, w, idx, counts = _setup(K, pattern, group, dtype, cap)
    res = torch.randn(K, M, DOUT).to(dtype) if with_residual else None
    dev = on_device(h, w, idx, counts, res)
    y = ops.gather_cols_gemm(*dev[:4], group, dev[4], backend="triton").cpu()
    expected = reference.gather_cols_gemm(h.float(), w.float(), idx, counts, group,
                                          None if res is None else res.float()).to(dtype)
    assert y.dtype == dtype and y.shape == (K, M, DOUT)
    assert_close(y, expected, dtype)


@gemm_grid
def test_gather_cols_gemm_column_major_weight(K, pattern, group, cap, dtype):
    """w as the transposed view of a contiguous [Din, Dout] tensor (how MaskedSwiGLUMLP stores
    down_proj) is read in place, with the same result."""
    h, w, idx, counts = _setup(K, pattern, group, dtype, cap)
    res = torch.randn(K, M, DOUT).to(dtype)
    h, wt, idx, counts, res = on_device(h, w.t().contiguous(), idx, counts, res)
    assert wt.t().stride() == (1, DOUT)
    y = ops.gather_cols_gemm(h, wt.t(), idx, counts, group, res, backend="triton").cpu()
    expected = reference.gather_cols_gemm(h.cpu().float(), w.float(), idx.cpu(), counts.cpu(),
                                          group, res.cpu().float()).to(dtype)
    assert_close(y, expected, dtype)


def test_gather_cols_rejects_other_weight_strides():
    h, w, idx, counts = _setup(3, "mixed", 1, torch.float32, None)
    w2 = torch.randn(DOUT, 2 * DIN)[:, ::2]  # neither row- nor column-major
    with pytest.raises(ValueError, match="transposed view"):
        ops.gather_cols_gemm(*on_device(h, w2, idx, counts), 1, backend="triton")


def test_gather_cols_residual_not_modified():
    h, w, idx, counts = _setup(3, "mixed", 3, torch.float32, None)
    h, w, idx, counts, res = on_device(h, w, idx, counts, torch.randn(3, M, DOUT))
    before = res.clone()
    ops.gather_cols_gemm(h, w, idx, counts, 3, res, backend="triton")
    assert torch.equal(res, before)


@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck_gather_cols_gemm_triton(with_residual):
    h, w, idx, counts = _setup(3, "mixed", 3, torch.float32, None)
    h, w = torch.nan_to_num(h), torch.nan_to_num(w)
    res = torch.randn(3, M, DOUT) if with_residual else None
    args = on_device(h, w, idx, counts, res)
    torch.library.opcheck(torch.ops.probprune.gather_cols_gemm.default,
                          (*args[:4], 3, args[4], "triton"))
