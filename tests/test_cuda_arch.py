"""The cuda backend is chosen only where the extension holds code for the GPU's architecture;
otherwise Triton runs, with one warning that says why. A launch that still fails for want of a
kernel image turns the backend off on that device and the op runs again elsewhere.

No GPU here: the GPU's capability and the extension's build list are stood in for."""
import types
import warnings

import pytest
import torch

import probprune_kernels as pk
from probprune_kernels import _cuda, dispatch
from probprune_kernels.dispatch import BackendUnavailableError

pytestmark = pytest.mark.fakegpu


@pytest.mark.parametrize("archs, capability, runs", [
    ("8.0;9.0+PTX", (9, 0), True),     # the default build on an H100
    ("8.0;9.0+PTX", (8, 6), True),     # sm_80 SASS runs on sm_86
    ("8.0;9.0+PTX", (10, 0), True),    # PTX of 9.0 compiles for newer GPUs
    ("8.0", (9, 0), False),            # the defect: a list without 9.0 on an H100
    ("8.0+PTX", (9, 0), True),
    ("8.6", (8, 0), False),            # SASS never runs on an older minor version
    ("9.0", (10, 0), False),           # nor on another major version
    ("9.0a", (9, 0), True),
    ("9.0a+PTX", (10, 0), False),      # arch-specific code has no forward compatibility
    ("7.5 8.0", (8, 9), True),         # spaces, as torch accepts them
])
def test_holds_code_for(archs, capability, runs):
    assert _cuda.holds_code_for(archs, capability) is runs


@pytest.fixture
def gpu_of(monkeypatch):
    """A stand-in GPU of a given capability and an extension built for a given arch list."""
    def make(capability, archs):
        ext = types.SimpleNamespace(OPS=_cuda.KERNEL_OPS, CUDA_ARCHS=archs)
        monkeypatch.setitem(_cuda._state, "tried", True)
        monkeypatch.setitem(_cuda._state, "module", ext)
        monkeypatch.setitem(_cuda._state, "error", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        _cuda.unusable_reason.cache_clear()
        _cuda._warned_devices.clear()
        dispatch.reset()
    yield make
    _cuda.unusable_reason.cache_clear()
    _cuda._warned_devices.clear()
    dispatch.reset()


def test_auto_takes_cuda_where_the_build_holds_the_gpus_code(gpu_of):
    gpu_of((9, 0), "8.0;9.0+PTX")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("gather_rows_gemm", torch.device("cuda:0")) == "cuda"


def test_auto_takes_triton_with_one_warning_when_the_build_lacks_the_gpus_arch(gpu_of):
    gpu_of((9, 0), "8.0")
    with pytest.warns(RuntimeWarning, match=r"TORCH_CUDA_ARCH_LIST=8\.0.*sm_90.*Triton"):
        assert dispatch.resolve("gather_rows_gemm", torch.device("cuda:0")) == "triton"
    with warnings.catch_warnings():  # once per GPU, not once per op
        warnings.simplefilter("error")
        assert dispatch.resolve("gather_cols_gemm", torch.device("cuda:0")) == "triton"
    with pytest.raises(BackendUnavailableError, match=r"no code for GPU 0 \(sm_90\)"):
        dispatch.resolve("gather_rows_gemm", torch.device("cuda:0"), "cuda")


def test_a_launch_without_a_kernel_image_falls_back_once(gpu_of, monkeypatch):
    """The build list says it runs, the launch says "no kernel image": the op runs again on the
    next backend (Triton, here under its interpreter on CPU tensors standing in for the GPU's)
    with the same result, and later calls never try the cuda backend there again."""
    if dispatch.triton_unavailable_reason("compact_masks", "cpu") is not None:
        pytest.skip(dispatch.triton_unavailable_reason("compact_masks", "cpu"))
    gpu_of((9, 0), "8.0;9.0+PTX")
    calls = []

    def no_image(*args):
        calls.append(args)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the "
                           "device")

    monkeypatch.setitem(dispatch._implementations, ("cuda", "compact_masks"), no_image)
    masks = torch.rand(3, 20) < 0.5
    expected = pk.compact_masks(masks, backend="reference")
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        got = pk.ops._call("compact_masks", torch.device("cuda:0"), None, masks=masks,
                           capacity=None)
    assert len(calls) == 1
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)  # index lists and counts: exact
    assert dispatch.resolve("compact_masks", torch.device("cuda:0")) == "triton"
    with pytest.raises(BackendUnavailableError, match="no kernel image"):
        dispatch.resolve("compact_masks", torch.device("cuda:0"), "cuda")


def test_other_launch_errors_are_not_swallowed(gpu_of, monkeypatch):
    gpu_of((9, 0), "8.0;9.0+PTX")

    def oom(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setitem(dispatch._implementations, ("cuda", "compact_masks"), oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        pk.ops._call("compact_masks", torch.device("cuda:0"), None,
                     masks=torch.zeros(2, 4, dtype=torch.bool), capacity=None)
