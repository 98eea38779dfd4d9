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


@pytest.mark.parametrize("K,sm_count,splits", [(4, 1, 1), (2, 1, 3), (2, 132, 7)])
def test_lm_head_ce_vocab_splits(monkeypatch, K, sm_count, splits):
    """One, a few and many vocabulary slices (the interpreter's 16-wide tiles: V = 200 is 13
    tiles), labels in every slice, a short last slice: the partial logsumexps merge exactly."""
    from probprune_kernels.triton import lm_head_ce as kernel

    V = 200
    monkeypatch.setattr(kernel, "sm_count", lambda device: sm_count)
    metas = [c.kwargs for c in kernel._CONFIGS]
    assert kernel.vocab_splits(M, K, V, sm_count, metas)[0] == splits
    h, w = torch.randn(K, M, D), torch.randn(V, D) / 3
    labels = torch.randint(0, V, (K, M))
    labels[:, :4] = torch.tensor([0, V - 1, 100, 15])  # first, last, middle, a slice's end
    labels[0, 5] = -100
    loss = ops.lm_head_ce(*on_device(h, w, labels), backend="triton").cpu()
    assert_close(loss, reference.lm_head_ce(h, w, labels), torch.float32,
                 **{k: 2 * v for k, v in TOLERANCES[torch.float32].items()})


def test_lm_head_ce_no_rows_is_nan():
    h, w = torch.randn(2, 0, D), torch.randn(V, D)
    loss = ops.lm_head_ce(*on_device(h, w, torch.zeros(0, dtype=torch.int64)), backend="triton")
    assert loss.shape == (2,) and torch.isnan(loss.cpu()).all()


# --------------------------------------------------------------------------------------------
# the launch plan (pure Python: the GPU configs, whatever TRITON_INTERPRET says)

def _plan(M, K, V, sm_count=132):
    from probprune_kernels.triton import lm_head_ce as kernel

    metas = [meta for meta, _, _ in kernel._GPU_CONFIGS]
    S, span = kernel.vocab_splits(M, K, V, sm_count, metas)
    return kernel, metas, S, span


@pytest.mark.parametrize("V", [32000, 49152, 128256])
def test_lm_head_ce_grid_fills_132_sms(V):
    """M = 508 rows of K = 2 masks on 132 SMs: at least 4 programs per SM at every tile config
    (the grid without the split: cdiv(508, BLOCK_M) * 2 = 8 or 16), slices of whole tiles, at
    least MIN_SPLIT_TILES of them, none empty."""
    kernel, metas, S, span = _plan(508, 2, V)
    for meta in metas:
        grid = kernel.launch_grid(508, 2, S)(meta)
        assert grid[0] * grid[1] <= 16
        assert grid[0] * grid[1] * grid[2] >= 4 * 132, (meta, grid)
        assert span % meta["BLOCK_V"] == 0
        assert span // meta["BLOCK_V"] >= kernel.MIN_SPLIT_TILES
    assert (S - 1) * span < V <= S * span


@pytest.mark.parametrize("M", [1, 13, 508, 4096, 65536])
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("V", [45, 300, 32000, 128256])
def test_lm_head_ce_plan_invariants(M, K, V):
    """Every slice starts inside V and holds whole tiles; the split stops once the row tiles alone
    fill the GPU (no split at large M)."""
    kernel, metas, S, span = _plan(M, K, V)
    unit = max(m["BLOCK_V"] for m in metas)
    assert S >= 1 and span % unit == 0 and (S - 1) * span < V <= S * span
    row_programs = -(-M // max(m["BLOCK_M"] for m in metas)) * K
    if row_programs >= 4 * 132:
        assert S == 1
    elif S > 1:
        assert span >= kernel.MIN_SPLIT_TILES * unit
