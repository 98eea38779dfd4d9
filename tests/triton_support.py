"""Set-up shared by the Triton test modules: the device the kernels run on, the skip when the
triton backend cannot run there, and the mask patterns every kernel is checked on.

Without a GPU the kernels run under the Triton interpreter: tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton. With one they run on it, and
``pytest -m gpu`` selects them.
"""
import pytest
import torch

from probprune_kernels import reference
from probprune_kernels.dispatch import triton_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP_REASON = triton_unavailable_reason(device=DEVICE)


class _Marks(list):
    """Several marks usable wherever one is: a module's ``pytestmark``, a param's ``marks``, or a
    decorator."""

    def __call__(self, test):
        for mark in self:
            test = mark(test)
        return test


# A Triton test: gpu (it runs on the GPU when there is one, so ``pytest -m gpu`` selects it), and
# skipped where the triton backend cannot run on DEVICE.
requires_triton = _Marks([pytest.mark.gpu,
                          pytest.mark.skipif(SKIP_REASON is not None,
                                             reason=f"triton backend: {SKIP_REASON}")])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (K, pattern): one mask keeping no, every or some units; three masks (empty, full, ragged) in
# one launch.
CASES = [(1, "zero"), (1, "full"), (1, "ragged"), (3, "mixed")]


def gemm_grid(test):
    """Parametrizes a gather-GEMM test over the ``CASES``, units of 1 and 3 rows or columns,
    the full and the tightest capacity, and every dtype: the same grid for both GEMMs."""
    for name, values in (("K,pattern", CASES), ("group", [1, 3]), ("cap", [None, "tight"]),
                         ("dtype", DTYPES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def pattern_masks(K: int, pattern: str, n: int) -> torch.Tensor:
    """bool [K, n] masks following a ``CASES`` pattern."""
    if pattern == "mixed":
        m = torch.rand(K, n) < 0.5
        m[0], m[1] = False, True
        return m
    return torch.rand(K, n) < {"zero": 0.0, "full": 1.1, "ragged": 0.5}[pattern]


def compacted(masks: torch.Tensor, cap):
    """Reference idx/counts of ``masks``: capacity n (``cap=None``), or the tightest capacity
    that holds every mask (``cap="tight"``, at least 1)."""
    capacity = max(int(masks.sum(1).max()), 1) if cap == "tight" else None
    return reference.compact_masks(masks, capacity)


def on_device(*tensors):
    """The tensors moved to ``DEVICE`` (None stays None)."""
    return [t.to(DEVICE) if t is not None else None for t in tensors]
