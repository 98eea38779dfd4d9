"""gather_cols_gemm: reference semantics (against the dense product with zeroed inputs), opcheck."""
import pytest
import torch
import torch.nn.functional as F

from probprune_kernels import ops
from tests.conftest import assert_close

# every test on the CPU, and on the GPU when there is one
pytestmark = pytest.mark.usefixtures("kernel_device")


def _setup(K, M, n, group, dout):
    w = torch.randn(dout, n * group) / (n * group) ** 0.5
    masks = torch.rand(K, n) < 0.5
    masks[0] = False
    if K > 1:
        masks[1] = True
    idx, counts = ops.compact_masks(masks)
    full = torch.randn(K, M, n * group)            # dense activations
    h = torch.zeros(K, M, n * group)               # their compact form
    for k in range(K):
        kept = full[k][:, masks[k].repeat_interleave(group)]
        h[k, :, : kept.shape[1]] = kept
    return full, h, w, masks, idx, counts


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gather_cols_gemm_reference(K, group, with_residual):
    full, h, w, masks, idx, counts = _setup(K, 13, 15, group, 37)
    res = torch.randn(K, 13, 37) if with_residual else None
    y = ops.gather_cols_gemm(h, w, idx, counts, group, res, backend="reference")
    dense = F.linear(full * masks.repeat_interleave(group, 1)[:, None, :], w)
    assert_close(y, dense + (res if res is not None else 0))


@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck_gather_cols_gemm_reference(with_residual):
    full, h, w, masks, idx, counts = _setup(3, 5, 4, 3, 7)
    res = torch.randn(3, 5, 7) if with_residual else None
    torch.library.opcheck(torch.ops.probprune.gather_cols_gemm.default,
                          (h, w, idx, counts, 3, res, "reference"))
