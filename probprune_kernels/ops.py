"""Public ops: each validates its inputs, picks a backend, and calls the registered custom op
``torch.ops.probprune.<name>``.

Every op is registered once with :func:`torch.library.custom_op` (an opaque op: under
``TRITON_INTERPRET=1``, ``triton_op``/``wrap_triton`` fails ``opcheck``'s fake-tensor test
because it traces into the kernel) and a fake (meta) implementation whose shapes come from
``_shapes``. The resolved backend name is an argument of the op, so ``torch.compile`` sees one op
whatever the backend.

Shapes (``K`` masks, ``n`` units, ``n_cap`` index capacity, ``group`` rows per unit):

==================== ============================================ =================================
op                   inputs                                       output
==================== ============================================ =================================
sample_masks         probs [n], uniforms [K, n]                   bool [K, n]
compact_masks        masks bool [K, n]                            idx int32 [K, cap], counts [K]
sample_and_compact   probs [n], uniforms [K, n]                   (masks, idx, counts)
gather_rows_gemm     x [K, M, Din], w [Dout, Din], bias [Dout]    [K, M, n_cap*group]
gather_rows_swiglu   x [K, M, Din], w_gate/w_up [F, Din]          [K, M, n_cap]
gather_cols_gemm     h [K, M, n_cap*group], w [Dout, Din]         [K, M, Dout] (+ residual)
masked_attention     q [K,B,T,Hq,D], k/v [K,B,T,Hkv,D], counts    [K, B, T, Hq, D]
lm_head_ce           h [K, M, d], w [V, d], labels [M] or [K, M]  float32 [K]
==================== ============================================ =================================

Compact outputs are zero at and beyond ``counts[k] * group``. ``validate=True`` also checks values
(index range, counts <= capacity), which reads the tensors (a host sync on a GPU);
``validate=False`` keeps the cheap shape/dtype/device checks only, for hot paths that built
idx/counts with :func:`compact_masks`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _shapes
from . import backends as _backends

__all__ = ["sample_masks", "compact_masks", "sample_and_compact", "gather_rows_gemm",
           "gather_rows_swiglu", "gather_cols_gemm", "masked_attention", "lm_head_ce"]


def _impl(backend: str, op: str):
    return _backends.implementation(backend, op)


def _backend_for(op: str, device: torch.device, backend: Optional[str], tensors) -> str:
    """Resolves the backend; kernels (triton, cuda) index raw memory and need contiguous inputs."""
    name = _backends.resolve(op, device, backend)
    if name != "reference":
        for tname, t in tensors:
            if t is not None:
                _shapes.check_contiguous(tname, t)
    return name


# ----------------------------------------------------------------------------------------------
# registered ops (opaque custom ops + fakes from _shapes)

@torch.library.custom_op("probprune::sample_masks", mutates_args=())
def _sample_masks_op(probs: Tensor, uniforms: Tensor, backend: str) -> Tensor:
    return _impl(backend, "sample_masks")(probs, uniforms)


@_sample_masks_op.register_fake
def _(probs, uniforms, backend):
    return uniforms.new_empty(_shapes.sample_shape(probs, uniforms), dtype=torch.bool)


@torch.library.custom_op("probprune::compact_masks", mutates_args=())
def _compact_masks_op(masks: Tensor, capacity: Optional[int],
                      backend: str) -> Tuple[Tensor, Tensor]:
    return tuple(_impl(backend, "compact_masks")(masks, capacity))


@_compact_masks_op.register_fake
def _(masks, capacity, backend):
    K, cap = _shapes.compact_shape(masks, capacity)
    return (masks.new_empty((K, cap), dtype=torch.int32), masks.new_empty((K,), dtype=torch.int32))


@torch.library.custom_op("probprune::sample_and_compact", mutates_args=())
def _sample_and_compact_op(probs: Tensor, uniforms: Tensor, capacity: Optional[int],
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_impl(backend, "sample_and_compact")(probs, uniforms, capacity))


@_sample_and_compact_op.register_fake
def _(probs, uniforms, capacity, backend):
    shape = _shapes.sample_shape(probs, uniforms)
    masks = uniforms.new_empty(shape, dtype=torch.bool)
    K, cap = _shapes.compact_shape(masks, capacity)
    return (masks, uniforms.new_empty((K, cap), dtype=torch.int32),
            uniforms.new_empty((K,), dtype=torch.int32))


@torch.library.custom_op("probprune::gather_rows_gemm", mutates_args=())
def _gather_rows_gemm_op(x: Tensor, w: Tensor, idx: Tensor, counts: Tensor, group: int,
                         bias: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend, "gather_rows_gemm")(x, w, idx, counts, group, bias)


@_gather_rows_gemm_op.register_fake
def _(x, w, idx, counts, group, bias, backend):
    return x.new_empty(_shapes.gather_rows_shape(x, w, idx, counts, group, bias,
                                                 validate_values=False))


@torch.library.custom_op("probprune::gather_rows_swiglu", mutates_args=())
def _gather_rows_swiglu_op(x: Tensor, w_gate: Tensor, w_up: Tensor, idx: Tensor, counts: Tensor,
                           backend: str) -> Tensor:
    return _impl(backend, "gather_rows_swiglu")(x, w_gate, w_up, idx, counts)


@_gather_rows_swiglu_op.register_fake
def _(x, w_gate, w_up, idx, counts, backend):
    return x.new_empty(_shapes.gather_rows_swiglu_shape(x, w_gate, w_up, idx, counts,
                                                        validate_values=False))


@torch.library.custom_op("probprune::gather_cols_gemm", mutates_args=())
def _gather_cols_gemm_op(h: Tensor, w: Tensor, idx: Tensor, counts: Tensor, group: int,
                         residual: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend, "gather_cols_gemm")(h, w, idx, counts, group, residual)


@_gather_cols_gemm_op.register_fake
def _(h, w, idx, counts, group, residual, backend):
    return h.new_empty(_shapes.gather_cols_shape(h, w, idx, counts, group, residual,
                                                 validate_values=False))


@torch.library.custom_op("probprune::masked_attention", mutates_args=())
def _masked_attention_op(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, scale: Optional[float],
                         backend: str) -> Tensor:
    return _impl(backend, "masked_attention")(q, k, v, counts, scale)


@_masked_attention_op.register_fake
def _(q, k, v, counts, scale, backend):
    return q.new_empty(_shapes.masked_attention_shape(q, k, v, counts, validate_values=False))


@torch.library.custom_op("probprune::lm_head_ce", mutates_args=())
def _lm_head_ce_op(h: Tensor, w: Tensor, labels: Tensor, ignore_index: int, chunk_size: int,
                   backend: str) -> Tensor:
    return _impl(backend, "lm_head_ce")(h, w, labels, ignore_index, chunk_size)


@_lm_head_ce_op.register_fake
def _(h, w, labels, ignore_index, chunk_size, backend):
    return h.new_empty(_shapes.lm_head_ce_shape(h, w, labels), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# public wrappers: validate -> resolve backend -> torch.ops.probprune.<name>

def sample_masks(probs: Tensor, uniforms: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Bernoulli masks ``uniforms < probs``: probs [n], uniforms [K, n] (the caller's generator,
    so every backend draws the same masks) -> bool [K, n]."""
    _shapes.sample_shape(probs, uniforms)
    name = _backend_for("sample_masks", uniforms.device, backend,
                        [("probs", probs), ("uniforms", uniforms)])
    return torch.ops.probprune.sample_masks(probs, uniforms, name)


def compact_masks(masks: Tensor, capacity: Optional[int] = None, *,
                  backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """bool masks [K, n] -> (idx int32 [K, cap] kept unit ids ascending, zero-padded;
    counts int32 [K]). ``cap`` defaults to ``n``; counts are the true counts, so choose
    ``capacity >= counts.max()`` (the gather ops reject counts above capacity when validating)."""
    _shapes.compact_shape(masks, capacity)
    name = _backend_for("compact_masks", masks.device, backend, [("masks", masks)])
    return tuple(torch.ops.probprune.compact_masks(masks, capacity, name))


def sample_and_compact(probs: Tensor, uniforms: Tensor, capacity: Optional[int] = None, *,
                       backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_masks` then :func:`compact_masks`, fused in one launch on triton/cuda.
    Returns (masks bool [K, n], idx int32 [K, cap], counts int32 [K])."""
    shape = _shapes.sample_shape(probs, uniforms)
    if capacity is not None and not 0 <= capacity <= shape[1]:
        raise ValueError(f"capacity must lie in [0, {shape[1]}], got {capacity}")
    name = _backend_for("sample_and_compact", uniforms.device, backend,
                        [("probs", probs), ("uniforms", uniforms)])
    return tuple(torch.ops.probprune.sample_and_compact(probs, uniforms, capacity, name))


def gather_rows_gemm(x: Tensor, w: Tensor, idx: Tensor, counts: Tensor, group: int = 1,
                     bias: Optional[Tensor] = None, *, backend: Optional[str] = None,
                     validate: bool = True) -> Tensor:
    """y[k, :, j*group + g] = x[k] @ w[idx[k, j]*group + g] (+ bias) for j < counts[k], else 0.

    x [K, M, Din], w [Dout, Din] (``Dout = n * group``), idx int32 [K, n_cap], counts int32 [K],
    bias [Dout] -> y [K, M, n_cap * group]. Only the active rows of ``w`` are read.
    """
    _shapes.gather_rows_shape(x, w, idx, counts, group, bias, validate_values=validate)
    name = _backend_for("gather_rows_gemm", x.device, backend,
                        [("x", x), ("w", w), ("idx", idx), ("counts", counts), ("bias", bias)])
    return torch.ops.probprune.gather_rows_gemm(x, w, idx, counts, group, bias, name)


def gather_rows_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, idx: Tensor, counts: Tensor, *,
                       backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """y[k, :, j] = silu(x[k] @ w_gate[idx[k, j]]) * (x[k] @ w_up[idx[k, j]]) for j < counts[k].

    x [K, M, Din], w_gate/w_up [F, Din] -> y [K, M, n_cap], zero beyond counts[k].
    """
    _shapes.gather_rows_swiglu_shape(x, w_gate, w_up, idx, counts, validate_values=validate)
    name = _backend_for("gather_rows_swiglu", x.device, backend,
                        [("x", x), ("w_gate", w_gate), ("w_up", w_up), ("idx", idx),
                         ("counts", counts)])
    return torch.ops.probprune.gather_rows_swiglu(x, w_gate, w_up, idx, counts, name)


def gather_cols_gemm(h: Tensor, w: Tensor, idx: Tensor, counts: Tensor, group: int = 1,
                     residual: Optional[Tensor] = None, *, backend: Optional[str] = None,
                     validate: bool = True) -> Tensor:
    """y[k] = h[k, :, :counts[k]*group] @ w[:, cols_k].T (+ residual[k]); cols_k the active columns
    ``idx[k, j]*group + g``. h [K, M, n_cap*group], w [Dout, Din] -> y [K, M, Dout]."""
    _shapes.gather_cols_shape(h, w, idx, counts, group, residual, validate_values=validate)
    name = _backend_for("gather_cols_gemm", h.device, backend,
                        [("h", h), ("w", w), ("idx", idx), ("counts", counts),
                         ("residual", residual)])
    return torch.ops.probprune.gather_cols_gemm(h, w, idx, counts, group, residual, name)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, scale: Optional[float] = None,
                     *, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """Causal GQA attention over the first ``counts[i]`` KV heads of mask ``i``.

    q [K, B, T, Hq, D], k/v [K, B, T, Hkv, D]; query heads ``j*G .. j*G+G-1`` (G = Hq/Hkv) use KV
    head ``j``; heads at and beyond ``counts[i]*G`` are zero. ``scale`` defaults to 1/sqrt(D).
    """
    _shapes.masked_attention_shape(q, k, v, counts, validate_values=validate)
    name = _backend_for("masked_attention", q.device, backend,
                        [("q", q), ("k", k), ("v", v), ("counts", counts)])
    return torch.ops.probprune.masked_attention(q, k, v, counts, scale, name)


def lm_head_ce(h: Tensor, w: Tensor, labels: Tensor, ignore_index: int = -100,
               chunk_size: int = 4096, *, backend: Optional[str] = None) -> Tensor:
    """Mean next-token NLL per mask, fp32 [K]: loss[k] = mean_m CE(h[k, m] @ w.T, labels[m]).

    h [K, M, d], w [V, d], labels int64 [M] or [K, M] (``ignore_index`` rows do not count; a mask
    with no counted row gives NaN). No [K*M, V] logits tensor is built. Labels are checked to lie in
    [0, V) or equal ``ignore_index`` (one small host sync per call).
    """
    _shapes.lm_head_ce_shape(h, w, labels)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if labels.numel():
        bad = ((labels < 0) | (labels >= w.shape[0])) & (labels != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, vocab={w.shape[0]}) or equal ignore_index="
                             f"{ignore_index}; got values in [{int(labels.min())}, "
                             f"{int(labels.max())}]")
    name = _backend_for("lm_head_ce", h.device, backend,
                        [("h", h), ("w", w), ("labels", labels)])
    return torch.ops.probprune.lm_head_ce(h, w, labels, ignore_index, chunk_size, name)
