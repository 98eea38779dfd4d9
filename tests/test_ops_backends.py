"""Dispatch: backend= > default (set_default_backend, else PROBPRUNE_BACKEND) > auto; loud when
asked, quiet when guessing; resolved once; the ``_cuda`` interface (``available(op)`` and
reference-positional calls)."""
import logging
import sys
import types

import pytest
import torch

import probprune_kernels
from probprune_kernels import BackendUnavailableError, dispatch, ops

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
MASKS = torch.ones(2, 3, dtype=torch.bool)


@pytest.fixture(autouse=True)
def fresh_dispatch():
    """Each test resolves afresh (and leaves no resolution behind): the environment the tests
    change is read on the first op call after a reset."""
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("PROBPRUNE_BACKEND", raising=False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A stand-in ``probprune_kernels._cuda`` recording calls; only gather_rows_gemm available."""
    calls = []
    mod = types.ModuleType("probprune_kernels._cuda")
    mod.available = lambda op, device=None: op == "gather_rows_gemm"

    def gather_rows_gemm(*args):
        calls.append(args)
        from probprune_kernels import reference
        return reference.gather_rows_gemm(*args)

    mod.gather_rows_gemm = gather_rows_gemm
    monkeypatch.setitem(sys.modules, "probprune_kernels._cuda", mod)
    monkeypatch.setattr(probprune_kernels, "_cuda", mod, raising=False)
    dispatch.reset()
    yield calls


def test_backends_lists_usable(monkeypatch):
    assert isinstance(probprune_kernels.backends, types.FunctionType)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    listed = probprune_kernels.backends()
    assert listed[0] == "reference" and set(listed) <= {"reference", "triton", "cuda"}
    if not torch.cuda.is_available():
        assert listed == ["reference"]  # no GPU, no interpreter: nothing else can run here


def test_backends_lists_triton_when_usable(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        # Kernels are defined for the interpreter only when TRITON_INTERPRET=1 at import time;
        # never flip it in a process whose kernels were imported for a GPU.
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = dispatch.triton_unavailable_reason()
    if reason is not None:
        assert "triton" not in probprune_kernels.backends()
        pytest.skip(reason)
    assert "triton" in probprune_kernels.backends()


def test_auto_on_cpu_is_reference(no_env, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton usable, but never chosen for CPU tensors
    assert dispatch.resolve("gather_rows_gemm", CPU) == "reference"


def test_explicit_unavailable_raises_naming_available(no_env):
    with pytest.raises(BackendUnavailableError, match=r"'cuda'.*available here: \['reference'"):
        dispatch.resolve("gather_rows_gemm", CPU, "cuda")


def test_explicit_triton_on_cpu_without_interpreter_raises(no_env, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1|not installed"):
        ops.compact_masks(MASKS, backend="triton")


def test_unknown_backend(no_env):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        ops.compact_masks(MASKS, backend="tpu")


def test_env_var_read_once_and_argument_overrides(monkeypatch):
    monkeypatch.setenv("PROBPRUNE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="PROBPRUNE_BACKEND=cuda"):
        ops.compact_masks(MASKS)
    # the argument wins over the environment
    idx, counts = ops.compact_masks(MASKS, backend="reference")
    assert counts.tolist() == [3, 3]
    # read once: a later change of the variable counts only after reset()
    monkeypatch.setenv("PROBPRUNE_BACKEND", "reference")
    with pytest.raises(BackendUnavailableError, match="PROBPRUNE_BACKEND=cuda"):
        ops.compact_masks(MASKS)
    dispatch.reset()
    assert dispatch.resolve("lm_head_ce", CPU) == "reference"
    monkeypatch.setenv("PROBPRUNE_BACKEND", "auto")
    dispatch.reset()
    assert dispatch.resolve("lm_head_ce", CPU) == "reference"
    monkeypatch.setenv("PROBPRUNE_BACKEND", "tpu")
    dispatch.reset()
    with pytest.raises(ValueError, match=r"unknown backend 'tpu' \(PROBPRUNE_BACKEND=tpu\)"):
        ops.compact_masks(MASKS)


def test_set_default_backend(no_env):
    assert probprune_kernels.set_default_backend is dispatch.set_default_backend
    assert ops.compact_masks(MASKS)[1].tolist() == [3, 3]       # auto: reference on CPU
    dispatch.set_default_backend("cuda")                        # replaces the resolved default
    with pytest.raises(BackendUnavailableError, match=r"set_default_backend\('cuda'\)"):
        ops.compact_masks(MASKS)
    assert ops.compact_masks(MASKS, backend="reference")[1].tolist() == [3, 3]
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        dispatch.set_default_backend("tpu")
    with pytest.raises(BackendUnavailableError):                 # a bad name changes nothing
        ops.compact_masks(MASKS)
    dispatch.set_default_backend(None)                          # back to PROBPRUNE_BACKEND/auto
    assert ops.compact_masks(MASKS)[1].tolist() == [3, 3]


def test_hot_path_reads_no_environment_and_checks_nothing(no_env, monkeypatch):
    """After the first call of an op, later calls find the backend and its function in a cache:
    no environment lookup, no availability check, no implementation lookup."""
    x, w = torch.randn(2, 3, 4), torch.randn(6, 4)
    idx, counts = ops.compact_masks(MASKS)
    expected = ops.gather_rows_gemm(x, w, idx, counts, 2, backend="reference")
    ops.gather_rows_gemm(x, w, idx, counts, 2)

    def boom(*args):
        raise AssertionError("dispatch work on the hot path")

    for name in ("_default_backend", "_why_unusable", "_implementation", "_resolve"):
        monkeypatch.setattr(dispatch, name, boom)
    monkeypatch.setenv("PROBPRUNE_BACKEND", "cuda")  # read now, the calls below would raise
    for _ in range(3):
        assert torch.equal(ops.compact_masks(MASKS)[1], counts)
        assert torch.equal(ops.gather_rows_gemm(x, w, idx, counts, 2, validate=False), expected)
        assert torch.equal(ops.gather_rows_gemm(x, w, idx, counts, 2, backend="reference"),
                           expected)
    dispatch.reset()  # the patches above are live: the next call must resolve, and fails
    with pytest.raises(AssertionError, match="hot path"):
        ops.compact_masks(MASKS)


def test_auto_cuda_device_falls_back_quietly(no_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "probprune_kernels._cuda", None)  # import raises ImportError
    dispatch.reset()
    with caplog.at_level(logging.DEBUG, logger="probprune_kernels"):
        assert dispatch.resolve("masked_attention", CUDA) in ("triton", "reference")
        # and without Triton: reference, both skips logged at debug level
        monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
        dispatch.reset()
        assert dispatch.resolve("masked_attention", CUDA) == "reference"
    assert "auto skips cuda" in caplog.text and "auto skips triton" in caplog.text


def test_cuda_interface(no_env, fake_cuda):
    """Auto on CUDA tensors picks cuda where _cuda.available(op); the op calls _cuda.<op> with the
    reference's positional signature."""
    assert dispatch.resolve("gather_rows_gemm", CUDA) == "cuda"
    assert dispatch.resolve("lm_head_ce", CUDA) in ("triton", "reference")  # not available there
    assert dispatch.resolve("gather_rows_gemm", CPU) == "reference"  # cuda only for CUDA tensors
    with pytest.raises(BackendUnavailableError, match="reports 'lm_head_ce' unavailable"):
        dispatch.resolve("lm_head_ce", CUDA, "cuda")
    # Drive the registered op directly with backend "cuda" on CPU tensors (no GPU here).
    x, w = torch.randn(2, 3, 4), torch.randn(6, 4)
    idx, counts = ops.compact_masks(torch.tensor([[True, False, True], [False, True, False]]))
    bias = torch.randn(6)
    y = torch.ops.probprune.gather_rows_gemm(x, w, idx, counts, 2, bias, "cuda")
    (args,) = fake_cuda
    assert len(args) == 6 and args[4] == 2 and args[5] is bias and args[0] is x
    assert torch.equal(y, ops.gather_rows_gemm(x, w, idx, counts, 2, bias, backend="reference"))


def test_broken_cuda_module_warns_once(no_env, monkeypatch):
    import importlib.abc
    import importlib.machinery

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "probprune_kernels._cuda":
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise OSError("undefined symbol: fake")

    monkeypatch.delitem(sys.modules, "probprune_kernels._cuda", raising=False)
    monkeypatch.delattr(probprune_kernels, "_cuda", raising=False)  # a real one may be loaded
    monkeypatch.setattr(sys, "meta_path", [Finder()] + sys.meta_path)
    dispatch.reset()
    try:
        with pytest.warns(RuntimeWarning, match="undefined symbol"):
            assert dispatch._cuda_module() is None
        assert dispatch.resolve("gather_rows_gemm", CUDA) != "cuda"
    finally:
        dispatch.reset()
        sys.modules.pop("probprune_kernels._cuda", None)
