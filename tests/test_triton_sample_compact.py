"""Triton sample/compact kernel against the reference (interpreter on CPU, native on a GPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402

pytest.importorskip("triton")

from probprune_kernels import ops, reference  # noqa: E402
from probprune_kernels.backends import triton_unavailable_reason  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU this needs TRITON_INTERPRET=1 before anything imports triton (see tests/conftest.py).
SKIP_REASON = triton_unavailable_reason(device=DEVICE)
pytestmark = pytest.mark.skipif(SKIP_REASON is not None,
                                reason=f"triton backend: {SKIP_REASON}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# n = 37: several 16-wide blocks with a ragged tail under the interpreter's BLOCK_N.
CASES = [(1, "zero"), (1, "full"), (1, "ragged"), (3, "mixed")]


def _probs(pattern, n=37):
    p = torch.rand(n)
    if pattern in ("zero", "full"):
        p.fill_(0.0 if pattern == "zero" else 1.0)
    return p


def _masks(K, pattern, n=37):
    if pattern == "mixed":
        m = torch.rand(K, n) < 0.5
        m[0], m[1] = False, True
        return m
    return torch.rand(K, n) < {"zero": 0.0, "full": 1.1, "ragged": 0.5}[pattern]


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
    masks = _masks(K, pattern)
    capacity = int(masks.sum(1).max()) if cap == "tight" else cap
    idx, counts = ops.compact_masks(masks.to(DEVICE), capacity, backend="triton")
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
