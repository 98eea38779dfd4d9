"""Triton fused lm_head + cross-entropy against the reference.

The kernel multiplies in fp32 (fp16/bf16 products are exact in fp32) and never rounds the logits,
so its oracle for every dtype is the reference on the upcast inputs, with the fp32 tolerance: a
kernel that rounded logits to the input dtype would fail. The reference in the input dtype
(logits rounded) is within the dtype's tolerance of it.
"""
import pytest
import torch

from probprune_kernels import ops, reference
from tests.conftest import TOLERANCES, assert_close
from tests.triton_support import DTYPES, on_device, requires_triton

pytestmark = requires_triton
M, D, V = 13, 37, 45  # none a multiple of the interpreter's 16-wide tiles


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("per_mask_labels", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head_ce(K, per_mask_labels, dtype):
    h = torch.randn(K, M, D).to(dtype)
    w = (torch.randn(V, D) / 3).to(dtype)
    labels = torch.randint(0, V, (K, M) if per_mask_labels else (M,))
    labels[..., 2] = -100
    loss = ops.lm_head_ce(*on_device(h, w, labels), backend="triton").cpu()
    assert loss.dtype == torch.float32 and loss.shape == (K,)
    expected = reference.lm_head_ce(h.float(), w.float(), labels)
    assert_close(loss, expected, torch.float32, **{k: 2 * v for k, v in
                                                   TOLERANCES[torch.float32].items()})
    assert_close(reference.lm_head_ce(h, w, labels), expected, dtype)


def test_lm_head_ce_ignore_index_and_empty_mask():
    h, w = torch.randn(2, M, D), torch.randn(V, D) / 3
    labels = torch.randint(0, V, (2, M))
    labels[1] = 7           # custom ignore_index: mask 1 has no counted row -> NaN
    labels[0, :4] = 7
    loss = ops.lm_head_ce(*on_device(h, w, labels), ignore_index=7, backend="triton").cpu()
    expected = reference.lm_head_ce(h, w, labels, ignore_index=7)
    assert torch.isnan(loss[1]) and torch.isnan(expected[1])
    assert_close(loss[:1], expected[:1])


def test_opcheck_lm_head_ce_triton():
    h, w, labels = torch.randn(3, M, D), torch.randn(V, D), torch.randint(0, V, (M,))
    torch.library.opcheck(torch.ops.probprune.lm_head_ce.default,
                          (*on_device(h, w, labels), -100, 4096, "triton"))
