"""gather_rows_gemm / gather_rows_swiglu: reference semantics (against dense math) and opcheck."""
import pytest
import torch
import torch.nn.functional as F

from probprune_kernels import ops
from tests.conftest import assert_close

# every test on the CPU, and on the GPU when there is one
pytestmark = pytest.mark.usefixtures("kernel_device")


def _setup(K, M, din, n, group, dtype=torch.float32):
    x = torch.randn(K, M, din, dtype=dtype)
    w = (torch.randn(n * group, din) / din ** 0.5).to(dtype)
    masks = torch.rand(K, n) < 0.5
    masks[0] = False
    if K > 1:
        masks[1] = True
    idx, counts = ops.compact_masks(masks)
    return x, w, masks, idx, counts


def _dense_rows(full, masks, group):
    """Oracle: dense result, keep the masked units' columns, left-aligned, zero after."""
    K, M, _ = full.shape
    out = torch.zeros(K, M, masks.shape[1] * group, dtype=full.dtype)
    for k in range(K):
        cols = masks[k].repeat_interleave(group)
        kept = full[k][:, cols]
        out[k, :, : kept.shape[1]] = kept
    return out


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gather_rows_gemm_reference(K, group, with_bias):
    x, w, masks, idx, counts = _setup(K, 13, 37, 15, group)
    bias = torch.randn(w.shape[0]) if with_bias else None
    y = ops.gather_rows_gemm(x, w, idx, counts, group, bias, backend="reference")
    assert y.shape == (K, 13, 15 * group)
    assert_close(y, _dense_rows(F.linear(x, w, bias), masks, group))


@pytest.mark.parametrize("K", [1, 3])
def test_gather_rows_swiglu_reference(K):
    x, wg, masks, idx, counts = _setup(K, 13, 37, 45, 1)
    wu = torch.randn_like(wg)
    y = ops.gather_rows_swiglu(x, wg, wu, idx, counts, backend="reference")
    assert_close(y, _dense_rows(F.silu(F.linear(x, wg)) * F.linear(x, wu), masks, 1))


def test_validate_false_runs_same():
    x, w, masks, idx, counts = _setup(3, 5, 7, 4, 2)
    assert torch.equal(ops.gather_rows_gemm(x, w, idx, counts, 2, validate=False),
                       ops.gather_rows_gemm(x, w, idx, counts, 2))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_gather_rows_gemm_reference(with_bias):
    x, w, masks, idx, counts = _setup(3, 5, 7, 5, 3)
    bias = torch.randn(w.shape[0]) if with_bias else None
    torch.library.opcheck(torch.ops.probprune.gather_rows_gemm.default,
                          (x, w, idx, counts, 3, bias, "reference"))


def test_opcheck_gather_rows_swiglu_reference():
    x, wg, masks, idx, counts = _setup(3, 5, 7, 6, 1)
    torch.library.opcheck(torch.ops.probprune.gather_rows_swiglu.default,
                          (x, wg, torch.randn_like(wg), idx, counts, "reference"))


def test_torch_compile_reference():
    """The registered op traces as one opaque node under torch.compile (backend=eager: no C++
    compiler needed)."""
    x, w, masks, idx, counts = _setup(3, 5, 7, 4, 2)
    fn = torch.compile(lambda *a: ops.gather_rows_gemm(*a, backend="reference", validate=False),
                       backend="eager", fullgraph=True)
    assert torch.equal(fn(x, w, idx, counts, 2), ops.gather_rows_gemm(x, w, idx, counts, 2))
