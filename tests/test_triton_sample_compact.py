"""Triton sample/compact kernel against the reference (interpreter on CPU, native on a GPU)."""
import pytest
import torch

from probprune_kernels import ops, reference
from tests.triton_support import CASES, DEVICE, DTYPES, pattern_masks, requires_triton

pytestmark = requires_triton


def _probs(pattern, n=37):
    """n = 37: several 16-wide blocks with a ragged tail under the interpreter's BLOCK_N."""
    p = torch.rand(n)
    if pattern in ("zero", "full"):
        p.fill_(0.0 if pattern == "zero" else 1.0)
    return p


@pytest.mark.parametrize("K,pattern", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_masks(K, pattern, dtype):
    probs = _probs("ragged" if pattern == "mixed" else pattern).to(DEVICE)
    u = torch.rand(K, 37).to(dtype).to(DEVICE)
    got = ops.sample_masks(probs, u, backend="triton")
    assert got.dtype == torch.bool
    assert torch.equal(got.cpu(), reference.sample_masks(probs.cpu(), u.cpu()))


@pytest.mark.parametrize("K,pattern", CASES)
@pytest.mark.parametrize("cap", [None, "tight", 5])
def test_compact_masks(K, pattern, cap):
    """cap=5 is below most kept counts: unchecked, idx keeps the first 5 ids, counts stay true."""
    masks = pattern_masks(K, pattern, 37)
    capacity = int(masks.sum(1).max()) if cap == "tight" else cap
    idx, counts = ops.compact_masks(masks.to(DEVICE), capacity, backend="triton",
                                    validate=cap != 5)
    eidx, ecounts = reference.compact_masks(masks, capacity)
    assert idx.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(idx.cpu(), eidx) and torch.equal(counts.cpu(), ecounts)


@pytest.mark.parametrize("K,pattern", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_and_compact(K, pattern, dtype):
    probs = _probs("ragged" if pattern == "mixed" else pattern).to(DEVICE)
    u = torch.rand(K, 37).to(dtype).to(DEVICE)
    masks, idx, counts = ops.sample_and_compact(probs, u, backend="triton")
    emasks = reference.sample_masks(probs.cpu(), u.cpu())
    eidx, ecounts = reference.compact_masks(emasks)
    assert torch.equal(masks.cpu(), emasks)
    assert torch.equal(idx.cpu(), eidx) and torch.equal(counts.cpu(), ecounts)


def test_compact_empty_and_single():
    for masks in (torch.zeros(2, 0, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)):
        idx, counts = ops.compact_masks(masks.to(DEVICE), backend="triton")
        eidx, ecounts = reference.compact_masks(masks)
        assert torch.equal(idx.cpu(), eidx) and torch.equal(counts.cpu(), ecounts)


@pytest.mark.parametrize("opname,args", [
    ("sample_masks", lambda: (torch.rand(37), torch.rand(3, 37))),
    ("compact_masks", lambda: (torch.rand(3, 37) < 0.5, 30)),
    ("sample_and_compact", lambda: (torch.rand(37), torch.rand(3, 37), None)),
])
def test_opcheck_triton(opname, args):
    a = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args()]
    torch.library.opcheck(getattr(torch.ops.probprune, opname).default, (*a, "triton"))
