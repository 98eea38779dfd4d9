"""sample_masks / compact_masks / sample_and_compact: reference semantics and op registration."""
import pytest
import torch

from probprune_kernels import ops


def _compact_loop(masks, cap):
    """Independent oracle: a Python loop over each mask."""
    K, n = masks.shape
    idx = torch.zeros(K, cap, dtype=torch.int32)
    counts = torch.zeros(K, dtype=torch.int32)
    for k in range(K):
        kept = [u for u in range(n) if masks[k, u]]
        counts[k] = len(kept)
        for j, u in enumerate(kept[:cap]):
            idx[k, j] = u
    return idx, counts


@pytest.mark.parametrize("K,n", [(1, 1), (1, 37), (3, 37), (4, 130)])
@pytest.mark.parametrize("cap", [None, "max"])
def test_compact_masks_reference(K, n, cap):
    masks = torch.rand(K, n) < 0.4
    masks[0] = False
    if K > 1:
        masks[1] = True
    capacity = None if cap is None else int(masks.sum(1).max())
    idx, counts = ops.compact_masks(masks, capacity, backend="reference")
    eidx, ecounts = _compact_loop(masks, n if capacity is None else capacity)
    assert idx.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(idx, eidx) and torch.equal(counts, ecounts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_masks_reference(dtype):
    probs = torch.rand(37)
    probs[:4], probs[4:8] = 0.0, 1.0
    u = torch.rand(3, 37).to(dtype)
    m = ops.sample_masks(probs, u, backend="reference")
    assert m.dtype == torch.bool and m.shape == (3, 37)
    assert not m[:, :4].any() and m[:, 4:8].all()
    assert torch.equal(m, u.float() < probs.to(dtype).float())


def test_sample_masks_frequency():
    """Kept frequency follows the probabilities (a statistical sanity check, 3 sigma)."""
    probs = torch.tensor([0.1, 0.5, 0.9])
    m = ops.sample_masks(probs, torch.rand(20000, 3))
    freq = m.float().mean(0)
    assert torch.all((freq - probs).abs() < 3 * (probs * (1 - probs) / 20000).sqrt() + 1e-3)


def test_sample_and_compact_reference():
    probs, u = torch.rand(37), torch.rand(3, 37)
    masks, idx, counts = ops.sample_and_compact(probs, u, 30, backend="reference")
    assert torch.equal(masks, u < probs)
    eidx, ecounts = _compact_loop(masks, 30)
    assert torch.equal(idx, eidx) and torch.equal(counts, ecounts)


@pytest.mark.parametrize("opname,args", [
    ("sample_masks", lambda: (torch.rand(37), torch.rand(3, 37))),
    ("compact_masks", lambda: (torch.rand(3, 37) < 0.5, 30)),
    ("compact_masks", lambda: (torch.rand(3, 37) < 0.5, None)),
    ("sample_and_compact", lambda: (torch.rand(37), torch.rand(3, 37), None)),
])
def test_opcheck_reference(opname, args):
    op = getattr(torch.ops.probprune, opname).default
    torch.library.opcheck(op, (*args(), "reference"))
