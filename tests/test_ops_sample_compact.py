"""sample_masks / compact_masks / sample_and_compact: reference semantics and op registration."""
import pytest
import torch

from probprune_kernels import ops
from tests.triton_support import DEVICE, requires_triton

BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


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


@pytest.mark.usefixtures("kernel_device")
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


@pytest.mark.usefixtures("kernel_device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_masks_reference(dtype):
    probs = torch.rand(37)
    probs[:4], probs[4:8] = 0.0, 1.0
    u = torch.rand(3, 37).to(dtype)
    m = ops.sample_masks(probs, u, backend="reference")
    assert m.dtype == torch.bool and m.shape == (3, 37)
    assert not m[:, :4].any() and m[:, 4:8].all()
    assert torch.equal(m, u.float() < probs.to(dtype).float())


@pytest.mark.usefixtures("kernel_device")
def test_sample_masks_frequency():
    """Kept frequency follows the probabilities (a statistical sanity check, 3 sigma)."""
    probs = torch.tensor([0.1, 0.5, 0.9])
    m = ops.sample_masks(probs, torch.rand(20000, 3))
    freq = m.float().mean(0)
    assert torch.all((freq - probs).abs() < 3 * (probs * (1 - probs) / 20000).sqrt() + 1e-3)


@pytest.mark.usefixtures("kernel_device")
def test_sample_and_compact_reference():
    probs, u = torch.rand(37), torch.rand(3, 37)
    masks, idx, counts = ops.sample_and_compact(probs, u, 30, backend="reference")
    assert torch.equal(masks, u < probs)
    eidx, ecounts = _compact_loop(masks, 30)
    assert torch.equal(idx, eidx) and torch.equal(counts, ecounts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_below_kept_count_raises(backend):
    """A capacity below a mask's kept count would drop its last units from idx: it raises."""
    masks = torch.zeros(2, 37, dtype=torch.bool, device=DEVICE)
    masks[1, 3:9] = True
    with pytest.raises(ValueError, match=r"capacity=5 is below the kept count: mask 1 keeps 6 "
                                         r"units.*capacity >= 6"):
        ops.compact_masks(masks, 5, backend=backend)
    idx, counts = ops.compact_masks(masks, 6, backend=backend)
    assert counts.tolist() == [0, 6] and idx[1].tolist() == list(range(3, 9))

    probs = torch.zeros(37, device=DEVICE)
    probs[30:] = 1.0                                   # 7 units kept by every sample
    u = torch.rand(2, 37, device=DEVICE)
    with pytest.raises(ValueError, match=r"capacity=6 is below the kept count: mask 0 keeps 7"):
        ops.sample_and_compact(probs, u, 6, backend=backend)
    masks, idx, counts = ops.sample_and_compact(probs, u, 7, backend=backend)
    assert counts.tolist() == [7, 7] and idx.tolist() == [list(range(30, 37))] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_truncates_to_capacity(backend):
    """Unchecked (hot path), idx holds the first ``capacity`` kept ids and counts stay true."""
    masks = torch.ones(1, 9, dtype=torch.bool, device=DEVICE)
    idx, counts = ops.compact_masks(masks, 4, backend=backend, validate=False)
    assert counts.tolist() == [9] and idx.tolist() == [[0, 1, 2, 3]]


@pytest.mark.usefixtures("kernel_device")
@pytest.mark.parametrize("opname,args", [
    ("sample_masks", lambda: (torch.rand(37), torch.rand(3, 37))),
    ("compact_masks", lambda: (torch.rand(3, 37) < 0.5, 30)),
    ("compact_masks", lambda: (torch.rand(3, 37) < 0.5, None)),
    ("sample_and_compact", lambda: (torch.rand(37), torch.rand(3, 37), None)),
])
def test_opcheck_reference(opname, args):
    op = getattr(torch.ops.probprune, opname).default
    torch.library.opcheck(op, (*args(), "reference"))
