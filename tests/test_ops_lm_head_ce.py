"""lm_head_ce: reference semantics (against full-logits cross-entropy), chunking, opcheck."""
import pytest
import torch
import torch.nn.functional as F

from probprune_kernels import ops
from tests.conftest import assert_close

# every test on the CPU, and on the GPU when there is one
pytestmark = pytest.mark.usefixtures("kernel_device")


def _full(h, w, labels, ignore_index=-100):
    K, M, _ = h.shape
    labels = labels.expand(K, M)
    return torch.stack([F.cross_entropy(h[k] @ w.T, labels[k], ignore_index=ignore_index)
                        for k in range(K)])


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("per_mask_labels", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 4096])
def test_lm_head_ce_reference(K, per_mask_labels, chunk_size):
    M, d, V = 13, 37, 45
    h, w = torch.randn(K, M, d), torch.randn(V, d) / 4
    labels = torch.randint(0, V, (K, M) if per_mask_labels else (M,))
    labels[..., 3] = -100
    loss = ops.lm_head_ce(h, w, labels, chunk_size=chunk_size, backend="reference")
    assert loss.dtype == torch.float32 and loss.shape == (K,)
    assert_close(loss, _full(h, w, labels))


@pytest.mark.parametrize("chunk_size", [1, 4, 40])
def test_lm_head_ce_reference_tiles_rows_and_vocabulary(chunk_size):
    """A vocabulary wider than MIN_VOCAB_TILE under a small budget: several vocabulary slices
    (the last one partial) and several row blocks, labels in every slice; chunk_size 40 covers
    all 39 rows in one block."""
    from probprune_kernels.reference import MIN_VOCAB_TILE

    K, M, d, V = 3, 13, 16, 2 * MIN_VOCAB_TILE + 123
    h, w = torch.randn(K, M, d), torch.randn(V, d) / 2
    labels = torch.randint(0, V, (K, M))
    labels[:, 0], labels[:, 1], labels[:, 2] = 0, V - 1, MIN_VOCAB_TILE  # both ends, a boundary
    labels[1, 5] = -100
    loss = ops.lm_head_ce(h, w, labels, chunk_size=chunk_size, backend="reference")
    assert_close(loss, _full(h, w, labels))


def test_lm_head_ce_all_ignored_is_nan():
    h, w = torch.randn(2, 4, 8), torch.randn(10, 8)
    labels = torch.full((2, 4), -100)
    labels[0, 0] = 3
    loss = ops.lm_head_ce(h, w, labels)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def test_lm_head_ce_fp16_returns_fp32():
    h, w = torch.randn(2, 4, 8, dtype=torch.float16), torch.randn(10, 8, dtype=torch.float16)
    assert ops.lm_head_ce(h, w, torch.randint(0, 10, (4,))).dtype == torch.float32


def test_opcheck_lm_head_ce_reference():
    h, w, labels = torch.randn(3, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    torch.library.opcheck(torch.ops.probprune.lm_head_ce.default,
                          (h, w, labels, -100, 2, "reference"))
