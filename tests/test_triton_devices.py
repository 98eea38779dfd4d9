"""Every Triton launch runs under its tensors' device: Triton launches into the current CUDA
context, so without ``torch.cuda.device`` a kernel on cuda:1 tensors would run in cuda:0's.

No GPU needed: the tensors are fake CUDA tensors on cuda:1, ``torch.cuda.device`` is replaced by
one that records the device it enters, and each kernel by one that records the device current when
it is launched.
"""
import contextlib

import pytest
import torch

pytest.importorskip("triton")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from probprune_kernels.triton import (_common, attention, gather_cols, gather_rows,  # noqa: E402
                                      sample_compact)

DEVICE = torch.device("cuda:1")
KERNELS = [(gather_rows, "_gather_rows_gemm_kernel"), (gather_rows, "_gather_rows_swiglu_kernel"),
           (gather_cols, "_gather_cols_gemm_kernel"),
           (attention, "_masked_attention_kernel"), (sample_compact, "_sample_compact_kernel")]


class _Recorder:
    """A stand-in for ``torch.cuda.device`` (a stack of entered device indices) and for the
    kernels (each launch records the kernel and the device current at that point)."""

    def __init__(self):
        self.current, self.launches = [], []

    @contextlib.contextmanager
    def device(self, device):
        self.current.append(torch.device(device).index)
        try:
            yield
        finally:
            self.current.pop()

    def kernel(self, name):
        recorder = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((name, recorder.current[-1] if recorder.current
                                              else None))
                return launch
        return Kernel()


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec.device)
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, rec.kernel(name))
    return rec


def _launches():
    """One call of every launcher on fake cuda:1 tensors."""
    K, M, d, n, D = 2, 5, 16, 8, 16
    f16 = dict(device=DEVICE, dtype=torch.float16)
    i32 = dict(device=DEVICE, dtype=torch.int32)
    x, w = torch.empty(K, M, d, **f16), torch.empty(n, d, **f16)
    idx, counts = torch.empty(K, n, **i32), torch.empty(K, **i32)
    q, kv = torch.empty(K, 1, M, 4, D, **f16), torch.empty(K, 1, M, 2, D, **f16)
    probs, uniforms = torch.empty(n, **f16), torch.empty(K, n, **f16)
    masks = torch.empty(K, n, device=DEVICE, dtype=torch.bool)
    gather_rows.gather_rows_gemm(x, w, idx, counts)
    gather_rows.gather_rows_swiglu(x, w, w, idx, counts)
    gather_cols.gather_cols_gemm(torch.empty(K, M, n, **f16), w.t(), idx, counts)
    attention.masked_attention_heads(q, kv, kv, counts, torch.empty(K, 4, **i32))
    sample_compact.sample_masks(probs, uniforms)
    sample_compact.compact_masks(masks)
    sample_compact.sample_and_compact(probs, uniforms)


def test_every_launch_runs_under_its_tensors_device(recorder):
    with FakeTensorMode():
        _launches()
    assert [name for name, _ in recorder.launches] == [
        "_gather_rows_gemm_kernel", "_gather_rows_swiglu_kernel", "_gather_cols_gemm_kernel",
        "_masked_attention_kernel", "_sample_compact_kernel", "_sample_compact_kernel",
        "_sample_compact_kernel"]
    assert all(dev == DEVICE.index for _, dev in recorder.launches), recorder.launches
    assert recorder.current == []


def test_on_device_is_a_no_op_off_cuda(recorder):
    with _common.on_device(torch.empty(1)):
        pass
    with _common.on_device(torch.empty(1, device="meta")):
        pass
    assert recorder.launches == [] and recorder.current == []
