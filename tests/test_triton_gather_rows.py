"""Triton gather-rows GEMM and fused SwiGLU against the reference.

fp16/bf16: the kernel accumulates in fp32 and rounds once, whereas the torch CPU reference in low
precision rounds intermediates (e.g. gate and up before silu); so the oracle is the reference
computed in fp32 on the same (upcast) inputs, then cast, and the tolerance is the dtype's
(tests/conftest.py TOLERANCES).
"""
import pytest
import torch

from probprune_kernels import ops, reference
from tests.conftest import assert_close
from tests.triton_support import (CASES, DTYPES, compacted, gemm_grid, on_device,
                                  pattern_masks, requires_triton)

pytestmark = requires_triton
M, DIN, DOUT = 13, 37, 45  # none a multiple of the 16-wide interpreter tiles


def _setup(K, pattern, group, dtype, cap):
    masks = pattern_masks(K, pattern, DOUT // group)
    idx, counts = compacted(masks, cap)
    x = torch.randn(K, M, DIN).to(dtype)
    w = (torch.randn(DOUT, DIN) / DIN ** 0.5).to(dtype)
    # Units no mask keeps are NaN: a kernel that reads them (instead of skipping) fails.
    dead = (~masks.any(0)).repeat_interleave(group)
    w[dead] = float("nan")
    return x, w, idx, counts


def _check_zero_tail(y, counts, group):
    for k, c in enumerate(counts.tolist()):
        assert torch.all(y[k, :, c * group:] == 0), f"mask {k}: nonzero past counts*group"


@gemm_grid
@pytest.mark.parametrize("with_bias", [False, True])
def test_gather_rows_gemm(K, pattern, group, with_bias, cap, dtype):
    x, w, idx, counts = _setup(K, pattern, group, dtype, cap)
    bias = torch.randn(DOUT).to(dtype) if with_bias else None
    dev = on_device(x, w, idx, counts, bias)
    y = ops.gather_rows_gemm(*dev[:4], group, dev[4], backend="triton").cpu()
    expected = reference.gather_rows_gemm(x.float(), w.float(), idx, counts, group,
                                          None if bias is None else bias.float()).to(dtype)
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close(y, expected, dtype)
    _check_zero_tail(y, counts, group)


@pytest.mark.parametrize("K,pattern", CASES)
@pytest.mark.parametrize("cap", [None, "tight"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_swiglu(K, pattern, cap, dtype):
    x, wg, idx, counts = _setup(K, pattern, 1, dtype, cap)
    wu = (torch.randn(DOUT, DIN) / DIN ** 0.5).to(dtype)
    y = ops.gather_rows_swiglu(*on_device(x, wg, wu, idx, counts), backend="triton").cpu()
    expected = reference.gather_rows_swiglu(x.float(), wg.float(), wu.float(), idx,
                                            counts).to(dtype)
    assert_close(y, expected, dtype)
    _check_zero_tail(y, counts, 1)


def test_gather_rows_gemm_large_unit_many_tiles():
    """group (head_dim) larger than a tile: one unit spans several column tiles."""
    K, n, group = 2, 3, 20
    x, w = torch.randn(K, 5, DIN), torch.randn(n * group, DIN)
    masks = torch.tensor([[False, True, True], [True, False, False]])
    idx, counts = reference.compact_masks(masks)
    y = ops.gather_rows_gemm(*on_device(x, w, idx, counts), group, backend="triton").cpu()
    assert_close(y, reference.gather_rows_gemm(x, w, idx, counts, group))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_gather_rows_gemm_triton(with_bias):
    x, w, idx, counts = _setup(3, "mixed", 3, torch.float32, None)
    w = torch.nan_to_num(w)
    bias = torch.randn(DOUT) if with_bias else None
    args = on_device(x, w, idx, counts, bias)
    torch.library.opcheck(torch.ops.probprune.gather_rows_gemm.default,
                          (*args[:4], 3, args[4], "triton"))


def test_opcheck_gather_rows_swiglu_triton():
    x, wg, idx, counts = _setup(3, "mixed", 1, torch.float32, None)
    wg = torch.nan_to_num(wg)
    args = on_device(x, wg, torch.randn_like(wg), idx, counts)
    torch.library.opcheck(torch.ops.probprune.gather_rows_swiglu.default, (*args, "triton"))
