"""A CUDA device without a GPU: the engine's stages run under torch's ``FakeTensorMode`` with the
model on ``cuda`` (or spread over ``cuda:0`` and ``cuda:1``), so every tensor carries its device,
dtype and shape through every op (the kernels' ops through their ``register_fake``) and a tensor
left on the wrong device, or in the wrong dtype, fails here as it would on a GPU.

Fake tensors hold no values, so an op whose *result* depends on the values (a mask's kept lists
through ``nonzero``, a loss read with ``.item()``, ``torch.equal``, ``bincount``) cannot run
under them. :func:`shadow` runs a stage twice: for real on the CPU in float32, recording every
such result in order (:class:`Record`), then on the fake device, where each of those ops takes
the CPU run's result instead of computing one (:class:`Replay`): the fake run follows the real
run's control flow, and its data-dependent values are the real run's, on the fake run's device.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops whose outputs (shape or Python value) depend on their inputs' values.
_DATA_DEPENDENT = {aten.nonzero.default, aten._local_scalar_dense.default, aten.equal.default,
                   aten.bincount.default, aten.masked_select.default,
                   aten.repeat_interleave.Tensor, aten._unique2.default, aten.unique_dim.default,
                   aten.unique_consecutive.default}


def _data_dependent(func, args, kwargs) -> bool:
    if func in _DATA_DEPENDENT:
        return True
    if func is aten.index.Tensor:  # a boolean index selects a data-dependent number of rows
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in tree_flatten(args[1])[0])
    return False


def _first_device(args) -> torch.device:
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


_TOLIST = torch.Tensor.tolist
_FAKE_TOLIST = FakeTensor.tolist


class Record(TorchDispatchMode):
    """Runs ops for real and keeps the results of the data-dependent ones, in call order.
    ``Tensor.tolist`` too: on a real tensor it reads memory without dispatching an op, on a fake
    one it calls ``item()`` per element."""

    def __init__(self):
        super().__init__()
        self.results: List[Tuple[str, Any]] = []
        self.inside = 0  # > 0 while an op runs: a tolist there belongs to the op (a kernel's)

    def __enter__(self):
        def tolist(t):
            out = _TOLIST(t)
            if not self.inside:
                self.results.append(("tolist", ("value", out)))
            return out
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = _TOLIST
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.inside += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.inside -= 1
        if _data_dependent(func, args, kwargs or {}):
            self.results.append((str(func), _describe(out)))
        return out


def _describe(out):
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape), out.dtype, out.detach().cpu().clone())
    if isinstance(out, (tuple, list)):
        return ("tuple", [_describe(o) for o in out])
    return ("value", out)


class ReplayDiverged(AssertionError):
    """The fake run asked for a data-dependent result the real run did not compute there."""


class Replay(TorchDispatchMode):
    """Under a ``FakeTensorMode``: each data-dependent op takes the recorded result (a tensor on
    the device of the op's first tensor input, the way the op would have put it there)."""

    def __init__(self, record: Record):
        super().__init__()
        self.results = list(record.results)
        self.used = 0
        self.inside = 0

    def __enter__(self):
        FakeTensor.tolist = lambda t: (_FAKE_TOLIST(t) if self.inside
                                       else self._next("tolist", t.device))
        return super().__enter__()

    def __exit__(self, *exc):
        FakeTensor.tolist = _FAKE_TOLIST
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _data_dependent(func, args, kwargs):
            self.inside += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.inside -= 1
        return self._next(str(func), _first_device(args))

    def _next(self, func: str, device: torch.device):
        if self.used == len(self.results):
            raise ReplayDiverged(f"the fake run calls {func} after the {self.used} data-dependent "
                                 f"results of the real run")
        name, result = self.results[self.used]
        if name != func:
            raise ReplayDiverged(f"data-dependent op #{self.used}: the fake run calls {func}, "
                                 f"the real run called {name}")
        self.used += 1
        return self._rebuild(result, device)

    def _rebuild(self, result, device):
        kind = result[0]
        if kind == "value":
            return result[1]
        if kind == "tuple":
            return tuple(self._rebuild(r, device) for r in result[1])
        _, shape, dtype, _ = result
        # A fake tensor has no values: every later read of them replays a recorded result too.
        return torch.empty(shape, dtype=dtype, device=device)


def fake_mode() -> FakeTensorMode:
    # allow_non_fake_inputs: tensors made before the mode (a tokenised text, a mask read from a
    # file) enter the fake run as fake tensors of the same device.
    return FakeTensorMode(allow_non_fake_inputs=True)


class _RealFileReads:
    """``safetensors.safe_open`` whose tensors are read outside the fake mode: a file's bytes
    are real (safetensors builds the tensor on its storage, which a fake tensor cannot take);
    the first op on them (the move to the fake device) makes them fake."""

    def __init__(self, opener):
        self.opener = opener

    def __call__(self, *args, **kwargs):
        handle = self.opener(*args, **kwargs)

        class Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                with unset_fake_temporarily():
                    return self.f.get_tensor(key)

            def __getattr__(self, name):
                return getattr(self.f, name)
        return Handle()


@contextlib.contextmanager
def real_file_reads():
    import safetensors

    saved = safetensors.safe_open
    safetensors.safe_open = _RealFileReads(saved)
    try:
        yield
    finally:
        safetensors.safe_open = saved


@contextlib.contextmanager
def no_gpu_queries():
    """The CUDA memory statistics and syncs a stage may call with a GPU at hand: without one
    they would raise, and a fake device has none to report."""
    patched = {"synchronize": lambda *a, **k: None,
               "reset_peak_memory_stats": lambda *a, **k: None,
               "max_memory_allocated": lambda *a, **k: 0,
               "memory_allocated": lambda *a, **k: 0,
               "empty_cache": lambda *a, **k: None}
    saved = {name: getattr(torch.cuda, name) for name in patched}
    for name, fn in patched.items():
        setattr(torch.cuda, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


_REAL_RUNS = {}


def shadow(stage: Callable[..., Any], *, device="cuda", dtype=torch.bfloat16, cache=None,
           **kwargs):
    """(the stage's result on the CPU in float32, its result on the fake ``device`` in
    ``dtype``): ``stage(device=..., dtype=..., **kwargs)`` runs for real first, then under fake
    tensors replaying the real run's data-dependent results (see the module docstring). The
    real run is the same for every fake device and dtype: with a ``cache`` name it runs once
    per name (and ``kwargs``) in the session."""
    key = (cache, tuple(sorted(kwargs.items())))
    if cache is None or key not in _REAL_RUNS:
        torch.manual_seed(0)
        record = Record()
        with record:
            real = stage(device="cpu", dtype=torch.float32, **kwargs)
        if cache is not None:
            _REAL_RUNS[key] = record, real
    else:
        record, real = _REAL_RUNS[key]
    torch.manual_seed(0)
    replay = Replay(record)
    with fake_mode(), no_gpu_queries(), real_file_reads(), replay:
        fake = stage(device=device, dtype=dtype, **kwargs)
    if replay.used != len(replay.results):
        raise ReplayDiverged(f"the fake run used {replay.used} of the real run's "
                             f"{len(replay.results)} data-dependent results")
    return real, fake


def on(device) -> str:
    return str(torch.device(device))


def assert_all_on(tensors, device, dtype=None, what=""):
    """Every floating tensor of ``tensors`` (a dict or iterable) on ``device`` (and in
    ``dtype``): the message names the first that is not."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    want = torch.device(device)
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            continue
        assert t.device == want or (want.index is None and t.device.type == want.type), (
            f"{what}{name} is on {t.device}, expected {want}")
        if dtype is not None and t.is_floating_point():
            assert t.dtype == dtype, f"{what}{name} is {t.dtype}, expected {dtype}"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_model(config, device, dtype):
    """A random-weight Hugging Face causal LM of ``config`` made on ``device`` in ``dtype``
    (built there: ``.to()`` cannot swap a fake model's parameters)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device), default_dtype(dtype):
        return AutoModelForCausalLM.from_config(config).eval()
