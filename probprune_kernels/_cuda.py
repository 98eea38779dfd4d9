"""The CUDA backend: kernels of ``csrc/`` compiled into ``probprune_kernels._C``.

``_C`` registers its ops with the dispatcher as ``torch.ops.probprune_cuda.<op>`` (CUDA
implementations, argument checks in ``csrc/bindings.cpp``); this module loads it lazily and exposes
each op with the positional signature of ``reference.<op>`` for ``dispatch``/``ops``.

The public op is ``torch.ops.probprune.<op>`` (``ops``), one op for every backend. The
``probprune_cuda`` schemas stay because the dispatcher is how ``_C`` hands its kernels to Python
(it binds no Python functions), and they cannot be kernels of the ``probprune`` ops themselves: a
CUDA kernel registered there would run for every CUDA tensor, whatever ``backend=`` asks (Triton
included). They have no fake (meta) implementations: the ``probprune`` op is opaque, so fake
tensors never reach them.

* ``available(op, device)`` is True only when ``_C`` imported, holds ``op``
  (``masked_attention_heads`` for ``masked_attention``), ``torch.cuda.is_available()``, the GPU is
  sm_80 or newer and the build holds code its architecture can run (the default build targets
  sm_80 / sm_90 with PTX for newer GPUs; a ``TORCH_CUDA_ARCH_LIST`` without the GPU's
  architecture gives one warning and the Triton backend);
* a missing ``_C`` (not built: ``PROBPRUNE_SKIP_CUDA_BUILD=1``, no nvcc) is quiet; a broken one
  (built against another torch, missing libraries) gives one ``RuntimeWarning`` and the cuda
  backend is off, everything else keeps working (torchao style).

``PROBPRUNE_DISABLE_CUDA_EXT=1`` turns the extension off without rebuilding.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import warnings
from typing import Optional

import torch

from ._shapes import group_slots

log = logging.getLogger("probprune_kernels")

NAMESPACE = "probprune_cuda"
# The ops of ``_C``: each a probprune_cuda schema with the arguments of reference.<op>.
KERNEL_OPS = ("sample_masks", "compact_masks", "sample_and_compact", "gather_rows_gemm",
              "gather_rows_swiglu", "gather_cols_gemm", "masked_attention_heads", "lm_head_ce")
# The ops of the cuda backend: the KV-group form of attention has no kernel of its own, it is
# converted here (``_shapes.group_slots``) to the general form.
OPS = KERNEL_OPS + ("masked_attention",)
_KERNEL_OF = {"masked_attention": "masked_attention_heads"}
MIN_CAPABILITY = (8, 0)

_state = {"tried": False, "module": None, "error": None}


def _load():
    """``probprune_kernels._C`` or None (the reason is kept in ``load_error()``)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("PROBPRUNE_DISABLE_CUDA_EXT", "0") == "1":
        _state["error"] = "disabled by PROBPRUNE_DISABLE_CUDA_EXT=1"
        log.debug("probprune_kernels._C: %s", _state["error"])
        return None
    try:
        spec = importlib.util.find_spec("probprune_kernels._C")
    except (ImportError, ValueError) as exc:
        spec, _state["error"] = None, f"cannot look up probprune_kernels._C: {exc}"
    if spec is None:
        _state["error"] = _state["error"] or (
            "probprune_kernels._C is not built (PROBPRUNE_SKIP_CUDA_BUILD=1, no nvcc or a CPU-only "
            "torch at install time); build it with `pip install -e . --no-build-isolation`")
        log.debug("%s", _state["error"])
        return None
    try:
        mod = importlib.import_module("probprune_kernels._C")
    except Exception as exc:  # built against another torch, missing CUDA runtime...
        _state["error"] = f"probprune_kernels._C failed to load ({type(exc).__name__}: {exc})"
        warnings.warn(f"{_state['error']}; the cuda backend is disabled, triton and reference "
                      f"still work. Rebuild with `pip install -e . --no-build-isolation`.",
                      RuntimeWarning, stacklevel=3)
        return None
    _state["module"] = mod
    return mod


def load_error() -> Optional[str]:
    """Why the extension is not loaded (None when it is, or was not tried yet)."""
    _load()
    return _state["error"]


def is_built() -> bool:
    """True when ``probprune_kernels._C`` imported."""
    return _load() is not None


def compiled_ops() -> tuple:
    """The ops the loaded extension holds (empty when it is not loaded)."""
    mod = _load()
    return tuple(getattr(mod, "OPS", ())) if mod is not None else ()


def parse_archs(archs: str):
    """(SASS architectures, PTX architectures) of a ``TORCH_CUDA_ARCH_LIST``-style string
    ("8.0;9.0+PTX", "8.6 9.0a"): each a set of (major, minor, arch_specific)."""
    sass, ptx = set(), set()
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item or "." not in item:
            continue
        name, plus_ptx = (item[:-4], True) if item.upper().endswith("+PTX") else (item, False)
        major, minor = name.split(".", 1)
        specific = minor.endswith("a")  # sm_90a: runs on sm_90 alone, no PTX fallback upward
        arch = (int(major), int(minor.rstrip("a")), specific)
        sass.add(arch)
        if plus_ptx:
            ptx.add(arch)
    return sass, ptx


def holds_code_for(archs: str, capability) -> bool:
    """True when a build for ``archs`` has a kernel image a GPU of ``capability`` can run: SASS
    of the same major version and a minor version no newer (sm_80 code runs on sm_86, not on
    sm_90), or PTX of an architecture no newer, which the driver compiles on load."""
    major, minor = capability
    sass, ptx = parse_archs(archs)
    if any((a, b) == (major, minor) if specific else (a == major and b <= minor)
           for a, b, specific in sass):
        return True
    return any(not specific and (a, b) <= (major, minor) for a, b, specific in ptx)


_warned_devices = set()


@functools.lru_cache(maxsize=None)
def unusable_reason(device_index: int) -> Optional[str]:
    """Why the loaded extension cannot run on GPU ``device_index`` (None when it can): too old a
    GPU, or a build without code for its architecture (a ``TORCH_CUDA_ARCH_LIST`` without it),
    which would fail every launch with "no kernel image is available"."""
    capability = torch.cuda.get_device_capability(device_index)
    name = f"sm_{capability[0]}{capability[1]}"
    if capability < MIN_CAPABILITY:
        return f"GPU {device_index} is {name}; the CUDA kernels need sm_80 or newer"
    archs = getattr(_load(), "CUDA_ARCHS", None)
    if archs and archs != "unknown" and not holds_code_for(archs, capability):
        return (f"probprune_kernels._C was built for TORCH_CUDA_ARCH_LIST={archs}, which holds "
                f"no code for GPU {device_index} ({name}); rebuild with TORCH_CUDA_ARCH_LIST "
                f"including {capability[0]}.{capability[1]} "
                f"(`pip install -e . --no-build-isolation`)")
    return None


def _device_index(device) -> int:
    index = torch.device(device).index if device is not None else None
    return torch.cuda.current_device() if index is None else index


def why_unavailable(op: str, device=None) -> Optional[str]:
    """Why :func:`available` says no for an op the extension holds on a present GPU (its
    architecture, see :func:`unusable_reason`); None otherwise."""
    if _KERNEL_OF.get(op, op) not in compiled_ops() or not torch.cuda.is_available():
        return None
    try:
        return unusable_reason(_device_index(device))
    except Exception:  # a driver problem: available() says no, with its own log line
        return None


def available(op: str, device=None) -> bool:
    """True when ``op`` can run on the CUDA backend on ``device`` (default: the current CUDA
    device; see the module docstring). A build without code for the GPU's architecture warns
    once per GPU, saying why, and is reported unavailable (dispatch then takes Triton)."""
    if op not in OPS or _KERNEL_OF.get(op, op) not in compiled_ops():
        return False
    if not torch.cuda.is_available():
        return False
    try:
        index = _device_index(device)
        why = unusable_reason(index)
    except Exception as exc:  # a driver problem must not break dispatch
        log.debug("probprune_kernels._cuda: capability query failed: %s", exc)
        return False
    if why is not None and index not in _warned_devices:
        _warned_devices.add(index)
        warnings.warn(f"{why}: the cuda backend is off on this GPU, Triton runs instead",
                      RuntimeWarning, stacklevel=2)
    return why is None


def info() -> dict:
    """What the extension holds, for bug reports and bench/gpu_check.sh."""
    mod = _load()
    out = {"built": mod is not None, "error": _state["error"], "ops": list(compiled_ops()),
           "cuda_available": torch.cuda.is_available()}
    if mod is not None:
        out["cuda_archs"] = getattr(mod, "CUDA_ARCHS", None)
        out["cudart_version"] = getattr(mod, "CUDART_VERSION", None)
        out["max_head_dim"] = getattr(mod, "MAX_HEAD_DIM", None)
    out["available"] = {op: available(op) for op in OPS}
    return out


def _ops():
    if _load() is None:
        raise RuntimeError(f"the probprune CUDA extension is unavailable: {_state['error']}")
    return getattr(torch.ops, NAMESPACE)


# ----------------------------------------------------------------------------------------------
# ops, positional signature of reference.<op>

def sample_masks(probs, uniforms):
    return _ops().sample_masks(probs, uniforms)


def compact_masks(masks, capacity=None):
    return tuple(_ops().compact_masks(masks, capacity))


def sample_and_compact(probs, uniforms, capacity=None):
    return tuple(_ops().sample_and_compact(probs, uniforms, capacity))


def gather_rows_gemm(x, w, idx, counts, group=1, bias=None):
    return _ops().gather_rows_gemm(x, w, idx, counts, group, bias)


def gather_rows_swiglu(x, w_gate, w_up, idx, counts):
    return _ops().gather_rows_swiglu(x, w_gate, w_up, idx, counts)


def gather_cols_gemm(h, w, idx, counts, group=1, residual=None):
    return _ops().gather_cols_gemm(h, w, idx, counts, group, residual)


def masked_attention_heads(q, k, v, q_counts, kv_slot, scale=None):
    return _ops().masked_attention_heads(q, k, v, q_counts, kv_slot, scale)


def lm_head_ce(h, w, labels, ignore_index=-100, chunk_size=4096):
    return _ops().lm_head_ce(h, w, labels, ignore_index, chunk_size)


def masked_attention(q, k, v, counts, scale=None):
    G = q.shape[3] // k.shape[3]
    return masked_attention_heads(q, k, v, *group_slots(counts, G, q.shape[3]), scale)
