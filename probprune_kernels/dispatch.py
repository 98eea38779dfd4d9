"""The one dispatch point: which backend runs an op, and the function that implements it there.

Order of precedence: the ``backend=`` argument of an op, then the default backend
(:func:`set_default_backend`, else the environment variable ``PROBPRUNE_BACKEND``), then
automatic selection.

* ``auto`` (default): CUDA tensors -> ``"cuda"`` where ``probprune_kernels._cuda`` reports the op
  available, else ``"triton"`` where Triton imports, else ``"reference"``; CPU tensors ->
  ``"reference"``. Auto-selection falls back quietly (a debug log line says why).
* An explicitly requested backend (argument or default) that cannot run the op raises
  :class:`BackendUnavailableError`, naming the backends available here.
* ``"triton"`` on CPU tensors works only under the Triton interpreter (``TRITON_INTERPRET=1``); it
  is then used when asked for explicitly, never chosen automatically.

Resolved once: :func:`resolve` remembers its answer per (op, device, requested backend), and
``PROBPRUNE_BACKEND`` is read on the first op call that needs the default. An op call after the
first does a dictionary lookup, no environment lookup and no availability check. So a change of
``PROBPRUNE_BACKEND`` or ``TRITON_INTERPRET`` inside a running process has no effect until
:func:`reset`; :func:`set_default_backend` changes the default from code.

:func:`available_backends` (``probprune_kernels.backends()``) lists the backends usable here, e.g.
``["reference"]`` or ``["reference", "triton"]``; it checks afresh on every call.

The CUDA interface (``probprune_kernels/_cuda.py``, written alongside ``csrc/``):
``available(op, device)`` -> bool, ``why_unavailable(op, device)`` -> the reason or None, and ``_cuda.<op>(...)`` with the positional signature of ``reference.<op>``
(``sample_and_compact(probs, uniforms, capacity)`` for the fused sampler).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import reference

log = logging.getLogger("probprune_kernels")

BACKENDS = ("reference", "triton", "cuda")
OPS = ("sample_masks", "compact_masks", "sample_and_compact", "gather_rows_gemm",
       "gather_rows_swiglu", "gather_cols_gemm", "masked_attention", "masked_attention_heads",
       "lm_head_ce")
ENV_VAR = "PROBPRUNE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly (argument or default backend) but cannot run."""


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# backend discovery (cached: importing a module is the expensive part, not the checks)

@functools.lru_cache(maxsize=None)
def _cuda_module():
    """``probprune_kernels._cuda`` or None. A missing module is quiet; a broken one warns once."""
    try:
        from probprune_kernels import _cuda  # noqa: WPS433 (lazy on purpose)
    except ImportError as exc:
        log.debug("probprune_kernels._cuda not importable (%s): cuda backend unavailable", exc)
        return None
    except Exception as exc:  # a broken build must not break `import probprune_kernels`
        warnings.warn(f"probprune_kernels._cuda failed to load ({type(exc).__name__}: {exc}); "
                      f"the cuda backend is disabled, triton/reference still work", RuntimeWarning)
        return None
    return _cuda


_TRITON_ERRORS = {}


@functools.lru_cache(maxsize=None)
def _triton_op(op: str):
    """The Triton launcher of ``op`` or None when Triton (or that kernel module) does not import;
    the reason is kept for error messages."""
    if not _triton_installed():
        _TRITON_ERRORS[op] = "triton is not installed (pip install triton)"
        return None
    try:
        from probprune_kernels import triton as _tk  # noqa: WPS433 (lazy on purpose)
        return getattr(_tk, op)
    except Exception as exc:
        _TRITON_ERRORS[op] = f"probprune_kernels.triton.{op} failed to import: {exc!r}"
        log.debug("probprune::%s: %s", op, _TRITON_ERRORS[op])
        return None


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreter_consistent() -> bool:
    """Triton decides interpreter vs compiler when each ``@triton.jit`` runs, including those of
    ``triton.language`` itself: the interpreter works only if triton was imported with
    ``TRITON_INTERPRET=1`` already set."""
    import triton.language as tl
    return type(tl.cdiv).__name__ == "InterpretedFunction"


def triton_unavailable_reason(op: str = "gather_rows_gemm", device=None) -> Optional[str]:
    """Why the triton backend cannot run ``op`` on ``device`` (default: CUDA if present, else
    CPU), or None when it can. Tests use it to skip with the reason."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _why_unusable("triton", op, torch.device(device))


def _why_unusable(backend: str, op: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device``, else the reason, for error messages."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpret():
            return "Triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        if device.type == "cpu" and not _interpreter_consistent():
            return ("TRITON_INTERPRET=1 was set after `triton` had been imported (e.g. by "
                    "transformers), so Triton's own library functions are compiled-mode and the "
                    "interpreter cannot run them; set TRITON_INTERPRET=1 before anything imports "
                    "triton")
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not support device {device}"
        if _triton_op(op) is None:
            return _TRITON_ERRORS.get(op, "the Triton kernel failed to import")
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        mod = _cuda_module()
        if mod is None:
            return "probprune_kernels._cuda is not importable (extension not built?)"
        if device in _failed_cuda:
            return _failed_cuda[device]
        if not mod.available(op, device):
            why = mod.why_unavailable(op, device) if hasattr(mod, "why_unavailable") else None
            return why or f"probprune_kernels._cuda reports {op!r} unavailable"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"


def available_backends(op: Optional[str] = None) -> List[str]:
    """Backends usable on this machine (for ``op``, or for at least one op when None): triton and
    cuda are checked on the CUDA device when there is one, else on the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = (op,) if op else OPS
    out = ["reference"]
    for backend in ("triton", "cuda"):
        if any(_why_unusable(backend, o, device) is None for o in names):
            out.append(backend)
    return out


# ----------------------------------------------------------------------------------------------
# resolution, once per (op, device, requested backend)

# The default backend and where it came from (for error messages); empty until first needed.
_default: Dict[str, str] = {}
_resolved: Dict[Tuple[str, torch.device, Optional[str]], str] = {}
_implementations: Dict[Tuple[str, str], Callable] = {}


def _check_name(backend: str, source: str) -> str:
    name = backend.lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} ({source}); choose one of "
                         f"{list(BACKENDS) + ['auto']}")
    return name


def set_default_backend(backend: Optional[str]) -> None:
    """The backend of op calls without ``backend=`` (``"reference"``, ``"triton"``, ``"cuda"`` or
    ``"auto"``); None goes back to ``PROBPRUNE_BACKEND`` (read again), else ``auto``. Checked
    for availability per op on the next call, like an explicit argument."""
    if backend is not None:
        source = f"set_default_backend({backend!r})"
        name = _check_name(backend, source)
    _resolved.clear()
    _default.clear()
    if backend is not None:
        _default.update(name=name, source=source)


# device -> why a cuda launch failed there for want of a kernel image (see ``launch_failed``).
_failed_cuda: Dict[torch.device, str] = {}


def launch_failed(device: torch.device, error: BaseException) -> bool:
    """After a cuda-backend launch on ``device`` raised ``error``: True, with the cuda backend
    turned off on that device (one warning), when the error says the build has no code for this
    GPU, so the caller can resolve the op again (Triton then); False for any other error."""
    text = str(error)
    if not any(s in text for s in ("no kernel image is available", "invalid device function")):
        return False
    device = torch.device(device)
    _failed_cuda[device] = f"a cuda launch failed on {device} ({text.splitlines()[0]})"
    warnings.warn(f"{_failed_cuda[device]}: the cuda backend is off on {device}, Triton or the "
                  f"reference runs instead; rebuild the extension for this GPU "
                  f"(TORCH_CUDA_ARCH_LIST)", RuntimeWarning, stacklevel=3)
    for key in [k for k in _resolved if k[1] == device]:
        del _resolved[key]
    return True


def reset() -> None:
    """Forgets every resolution, the default backend and the discovered CUDA module: the next op
    call reads ``PROBPRUNE_BACKEND`` and ``TRITON_INTERPRET`` again and re-checks availability.
    For tests that change the environment, or after loading the CUDA extension late."""
    _default.clear()
    _resolved.clear()
    _implementations.clear()
    _failed_cuda.clear()
    _cuda_module.cache_clear()


def _default_backend() -> Tuple[str, str]:
    if not _default:
        value = os.environ.get(ENV_VAR) or "auto"
        source = f"{ENV_VAR}={value}"
        _default.update(name=_check_name(value, source), source=source)
    return _default["name"], _default["source"]


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on tensors of ``device`` (see the module docstring); computed
    on the first call for each (op, device, backend), a lookup afterwards."""
    key = (op, device, backend)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(op, torch.device(device), backend)
    return name


def _resolve(op: str, device: torch.device, backend: Optional[str]) -> str:
    if backend is None:
        name, source = _default_backend()
    else:
        source = "backend= argument"
        name = _check_name(backend, source)
    if name == "auto":
        if device.type == "cuda":
            for cand in ("cuda", "triton"):
                why = _why_unusable(cand, op, device)
                if why is None:
                    return cand
                log.debug("probprune::%s: auto skips %s (%s)", op, cand, why)
        return "reference"
    why = _why_unusable(name, op, device)
    if why is not None:
        raise BackendUnavailableError(
            f"backend {name!r} was requested ({source}) for probprune::{op} on {device}, but "
            f"{why}. Backends available here: {available_backends(op)}")
    return name


def _reference_sample_and_compact(probs, uniforms, capacity=None):
    masks = reference.sample_masks(probs, uniforms)
    idx, counts = reference.compact_masks(masks, capacity)
    return masks, idx, counts


def implementation(backend: str, op: str) -> Callable:
    """The function implementing ``op`` on ``backend`` (positional signature of
    ``reference.<op>``), looked up once."""
    fn = _implementations.get((backend, op))
    if fn is None:
        fn = _implementations[(backend, op)] = _implementation(backend, op)
    return fn


def _implementation(backend: str, op: str) -> Callable:
    if backend == "reference":
        if op == "sample_and_compact":
            return _reference_sample_and_compact
        return getattr(reference, op)
    if backend == "triton":
        fn = _triton_op(op)
        if fn is None:
            raise BackendUnavailableError(_TRITON_ERRORS.get(op, "triton kernel not importable"))
        return fn
    if backend == "cuda":
        mod = _cuda_module()
        if mod is None:
            raise BackendUnavailableError("probprune_kernels._cuda is not importable")
        return getattr(mod, op)
    raise ValueError(f"unknown backend {backend!r}")
