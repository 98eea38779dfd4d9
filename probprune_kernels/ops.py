"""Public ops: each validates its inputs, picks a backend, and calls the registered custom op
``torch.ops.probprune.<name>``.

Every op is registered once, here, with :func:`torch.library.custom_op` (an opaque op: under
``TRITON_INTERPRET=1``, ``triton_op``/``wrap_triton`` fails ``opcheck``'s fake-tensor test
because it traces into the kernel) and a fake (meta) implementation whose shapes come from
``_shapes``. Its arguments are those of ``reference.<op>`` followed by the resolved backend's
name, so ``torch.compile`` sees one op whatever the backend. Fake tensors stop at this opaque op,
so the ``torch.ops.probprune_cuda.*`` ops the cuda backend calls (see ``_cuda``) need no fakes.

Shapes (``K`` masks, ``n`` units, ``n_cap`` index capacity, ``group`` rows per unit):

====================== =========================================== ================================
op                     inputs                                      output
====================== =========================================== ================================
sample_masks           probs [n], uniforms [K, n]                  bool [K, n]
compact_masks          masks bool [K, n]                           idx int32 [K, cap], counts [K]
sample_and_compact     probs [n], uniforms [K, n]                  (masks, idx, counts)
gather_rows_gemm       x [K, M, Din], w [Dout, Din], bias [Dout]   [K, M, n_cap*group]
gather_rows_swiglu     x [K, M, Din], w_gate/w_up [F, Din]         [K, M, n_cap]
gather_cols_gemm       h [K, M, n_cap*group], w [Dout, Din]        [K, M, Dout] (+ residual)
masked_attention       q [K,B,T,Hq,D], k/v [K,B,T,Hkv,D], counts   [K, B, T, Hq, D]
masked_attention_heads q, k/v as above, q_counts, kv_slot [K,Hq]   [K, B, T, Hq, D]
lm_head_ce             h [K, M, d], w [V, d], labels [M] or [K, M] float32 [K]
====================== =========================================== ================================

Compact outputs are zero at and beyond ``counts[k] * group``. Attention has two forms and one
kernel per backend: ``masked_attention_heads`` (query slot ``h < q_counts[k]`` reads KV head
``kv_slot[k, h]``, for pruning single query heads; :func:`head_lists` builds its index lists) and
``masked_attention`` (``counts[k]`` whole KV groups), a conversion to the first.

``validate=True`` (the default) also checks values, which reads the tensors (a host sync on a
GPU): probabilities in [0, 1], kept counts <= capacity, index ranges and counts <= capacity of the
gather ops and of attention, labels in range.
``validate=False`` keeps the cheap shape/dtype/device checks only, for hot paths whose inputs are
right by construction (idx/counts built by :func:`compact_masks`, probabilities from a sigmoid).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _shapes, dispatch

__all__ = ["sample_masks", "compact_masks", "sample_and_compact", "gather_rows_gemm",
           "gather_rows_swiglu", "gather_cols_gemm", "masked_attention", "masked_attention_heads",
           "lm_head_ce", "HeadLists", "head_lists", "head_lists_from_groups"]


# ----------------------------------------------------------------------------------------------
# registered ops: reference.<op>'s positional arguments, then the backend that runs them. Their
# fakes take reference.<op>'s arguments and give empty outputs of the shapes _shapes computes.

def _fake_sample_masks(probs, uniforms):
    shape = _shapes.sample_shape(probs, uniforms, validate_values=False)
    return uniforms.new_empty(shape, dtype=torch.bool)


def _fake_compact_masks(masks, capacity):
    K, cap = _shapes.compact_shape(masks, capacity)
    return masks.new_empty((K, cap), dtype=torch.int32), masks.new_empty((K,), dtype=torch.int32)


def _fake_sample_and_compact(probs, uniforms, capacity):
    masks = _fake_sample_masks(probs, uniforms)
    return (masks, *_fake_compact_masks(masks, capacity))


def _fake_gather_rows_gemm(x, w, idx, counts, group, bias):
    return x.new_empty(_shapes.gather_rows_shape(x, w, idx, counts, group, bias, False))


def _fake_gather_rows_swiglu(x, w_gate, w_up, idx, counts):
    return x.new_empty(_shapes.gather_rows_swiglu_shape(x, w_gate, w_up, idx, counts, False))


def _fake_gather_cols_gemm(h, w, idx, counts, group, residual):
    return h.new_empty(_shapes.gather_cols_shape(h, w, idx, counts, group, residual, False))


def _fake_masked_attention(q, k, v, counts, scale):
    return q.new_empty(_shapes.masked_attention_shape(q, k, v, counts, False))


def _fake_masked_attention_heads(q, k, v, q_counts, kv_slot, scale):
    return q.new_empty(_shapes.masked_attention_heads_shape(q, k, v, q_counts, kv_slot, False))


def _fake_lm_head_ce(h, w, labels, ignore_index, chunk_size):
    shape = _shapes.lm_head_ce_shape(h, w, labels, ignore_index, chunk_size, False)
    return h.new_empty(shape, dtype=torch.float32)


# op -> (schema, fake). These are the schemas torch.library.infer_schema gives annotated Python
# functions; written out so that one generic body serves every op.
_OPS = {
    "sample_masks": ("(Tensor probs, Tensor uniforms, str backend) -> Tensor",
                     _fake_sample_masks),
    "compact_masks": ("(Tensor masks, SymInt? capacity, str backend) -> (Tensor, Tensor)",
                      _fake_compact_masks),
    "sample_and_compact": ("(Tensor probs, Tensor uniforms, SymInt? capacity, str backend) "
                           "-> (Tensor, Tensor, Tensor)", _fake_sample_and_compact),
    "gather_rows_gemm": ("(Tensor x, Tensor w, Tensor idx, Tensor counts, SymInt group, "
                         "Tensor? bias, str backend) -> Tensor", _fake_gather_rows_gemm),
    "gather_rows_swiglu": ("(Tensor x, Tensor w_gate, Tensor w_up, Tensor idx, Tensor counts, "
                           "str backend) -> Tensor", _fake_gather_rows_swiglu),
    "gather_cols_gemm": ("(Tensor h, Tensor w, Tensor idx, Tensor counts, SymInt group, "
                         "Tensor? residual, str backend) -> Tensor", _fake_gather_cols_gemm),
    "masked_attention": ("(Tensor q, Tensor k, Tensor v, Tensor counts, float? scale, "
                         "str backend) -> Tensor", _fake_masked_attention),
    "masked_attention_heads": ("(Tensor q, Tensor k, Tensor v, Tensor q_counts, Tensor kv_slot, "
                               "float? scale, str backend) -> Tensor",
                               _fake_masked_attention_heads),
    "lm_head_ce": ("(Tensor h, Tensor w, Tensor labels, SymInt ignore_index, SymInt chunk_size, "
                   "str backend) -> Tensor", _fake_lm_head_ce),
}


def _register(op: str, schema: str, fake) -> None:
    def run(*args):
        *inputs, backend = args
        return dispatch.implementation(backend, op)(*inputs)

    registered = torch.library.custom_op(f"probprune::{op}", run, mutates_args=(), schema=schema)
    registered.register_fake(lambda *args: fake(*args[:-1]))


for _op, (_schema, _fake) in _OPS.items():
    _register(_op, _schema, _fake)


# Arguments the kernels also read column-major: gather-cols' weight, whose gathered columns are
# then contiguous (vector loads for group 1, see MaskedSwiGLUMLP).
_COLUMN_MAJOR_OK = {("gather_cols_gemm", "w")}


def _call(op: str, device: torch.device, backend: Optional[str], **args):
    """``torch.ops.probprune.<op>(**args)`` on the backend resolved for ``device``; ``args`` are
    named as in the schema. Kernels (triton, cuda) index raw memory: their tensors must be
    contiguous (or column-major, for those of ``_COLUMN_MAJOR_OK``)."""
    name = dispatch.resolve(op, device, backend)
    if name != "reference":
        for arg, t in args.items():
            if (op, arg) in _COLUMN_MAJOR_OK and isinstance(t, Tensor):
                _shapes.check_row_or_column_major(arg, t)
            elif isinstance(t, Tensor):
                _shapes.check_contiguous(arg, t)
    try:
        return getattr(torch.ops.probprune, op)(**args, backend=name)
    except RuntimeError as e:
        # A build without code for this GPU fails at the launch: once, then Triton takes over
        # (an explicit backend="cuda" then raises, naming why).
        if name == "cuda" and dispatch.launch_failed(device, e):
            return _call(op, device, backend, **args)
        raise


# ----------------------------------------------------------------------------------------------
# public wrappers: validate -> resolve backend -> torch.ops.probprune.<name>

def sample_masks(probs: Tensor, uniforms: Tensor, *, backend: Optional[str] = None,
                 validate: bool = True) -> Tensor:
    """Bernoulli masks ``uniforms < probs``: probs [n] in [0, 1], uniforms [K, n] (the caller's
    generator, so every backend draws the same masks) -> bool [K, n]."""
    _shapes.sample_shape(probs, uniforms, validate_values=validate)
    return _call("sample_masks", uniforms.device, backend, probs=probs, uniforms=uniforms)


def compact_masks(masks: Tensor, capacity: Optional[int] = None, *,
                  backend: Optional[str] = None, validate: bool = True) -> Tuple[Tensor, Tensor]:
    """bool masks [K, n] -> (idx int32 [K, cap] kept unit ids ascending, zero-padded;
    counts int32 [K]). ``cap`` defaults to ``n``. A mask keeping more than ``capacity`` units
    raises (with ``validate=False`` idx holds its first ``capacity`` ids and counts stay true)."""
    _shapes.compact_shape(masks, capacity)
    idx, counts = _call("compact_masks", masks.device, backend, masks=masks, capacity=capacity)
    if validate:
        _shapes.check_kept(counts, capacity)
    return idx, counts


def sample_and_compact(probs: Tensor, uniforms: Tensor, capacity: Optional[int] = None, *,
                       backend: Optional[str] = None,
                       validate: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_masks` then :func:`compact_masks`, fused in one launch on triton/cuda.
    Returns (masks bool [K, n], idx int32 [K, cap], counts int32 [K])."""
    _, n = _shapes.sample_shape(probs, uniforms, validate_values=validate)
    _shapes.capacity_of(n, capacity)
    masks, idx, counts = _call("sample_and_compact", uniforms.device, backend, probs=probs,
                               uniforms=uniforms, capacity=capacity)
    if validate:
        _shapes.check_kept(counts, capacity)
    return masks, idx, counts


def gather_rows_gemm(x: Tensor, w: Tensor, idx: Tensor, counts: Tensor, group: int = 1,
                     bias: Optional[Tensor] = None, *, backend: Optional[str] = None,
                     validate: bool = True) -> Tensor:
    """y[k, :, j*group + g] = x[k] @ w[idx[k, j]*group + g] (+ bias) for j < counts[k], else 0.

    x [K, M, Din], w [Dout, Din] (``Dout = n * group``), idx int32 [K, n_cap], counts int32 [K],
    bias [Dout] -> y [K, M, n_cap * group]. Only the active rows of ``w`` are read.
    """
    _shapes.gather_rows_shape(x, w, idx, counts, group, bias, validate_values=validate)
    return _call("gather_rows_gemm", x.device, backend, x=x, w=w, idx=idx, counts=counts,
                 group=group, bias=bias)


def gather_rows_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, idx: Tensor, counts: Tensor, *,
                       backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """y[k, :, j] = silu(x[k] @ w_gate[idx[k, j]]) * (x[k] @ w_up[idx[k, j]]) for j < counts[k].

    x [K, M, Din], w_gate/w_up [F, Din] -> y [K, M, n_cap], zero beyond counts[k].
    """
    _shapes.gather_rows_swiglu_shape(x, w_gate, w_up, idx, counts, validate_values=validate)
    return _call("gather_rows_swiglu", x.device, backend, x=x, w_gate=w_gate, w_up=w_up, idx=idx,
                 counts=counts)


def gather_cols_gemm(h: Tensor, w: Tensor, idx: Tensor, counts: Tensor, group: int = 1,
                     residual: Optional[Tensor] = None, *, backend: Optional[str] = None,
                     validate: bool = True) -> Tensor:
    """y[k] = h[k, :, :counts[k]*group] @ w[:, cols_k].T (+ residual[k]); cols_k the active columns
    ``idx[k, j]*group + g``. h [K, M, n_cap*group], w [Dout, Din] -> y [K, M, Dout].

    ``w`` may be column-major (``wt.t()`` of a contiguous ``wt`` [Din, Dout]): the layout the
    kernels read fastest with ``group == 1``, where gathered columns are single columns."""
    _shapes.gather_cols_shape(h, w, idx, counts, group, residual, validate_values=validate)
    return _call("gather_cols_gemm", h.device, backend, h=h, w=w, idx=idx, counts=counts,
                 group=group, residual=residual)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, scale: Optional[float] = None,
                     *, backend: Optional[str] = None, validate: bool = True) -> Tensor:
    """Causal GQA attention over the first ``counts[i]`` KV heads of mask ``i``.

    q [K, B, T, Hq, D], k/v [K, B, T, Hkv, D]; query heads ``j*G .. j*G+G-1`` (G = Hq/Hkv) use KV
    head ``j``; heads at and beyond ``counts[i]*G`` are zero. ``scale`` defaults to 1/sqrt(D).
    Every backend runs it as :func:`masked_attention_heads` with ``q_counts = counts * G`` and
    ``kv_slot[i, h] = h // G``.
    """
    _shapes.masked_attention_shape(q, k, v, counts, validate_values=validate)
    return _call("masked_attention", q.device, backend, q=q, k=k, v=v, counts=counts, scale=scale)


def masked_attention_heads(q: Tensor, k: Tensor, v: Tensor, q_counts: Tensor, kv_slot: Tensor,
                           scale: Optional[float] = None, *, backend: Optional[str] = None,
                           validate: bool = True) -> Tensor:
    """Causal attention over the first ``q_counts[i]`` query slots of mask ``i``, slot ``h``
    reading KV head ``kv_slot[i, h]``: single query heads pruned inside a KV group.

    q [K, B, T, Hq_cap, D] (kept query heads, compact), k/v [K, B, T, Hkv_cap, D] (kept KV heads),
    q_counts int32 [K], kv_slot int32 [K, Hq_cap] (entries of inactive slots are ignored) ->
    o [K, B, T, Hq_cap, D], zero at and beyond ``q_counts[i]``. ``Hq_cap`` need not be a multiple
    of ``Hkv_cap``. :func:`head_lists` builds q_counts/kv_slot from query-head masks.
    """
    _shapes.masked_attention_heads_shape(q, k, v, q_counts, kv_slot, validate_values=validate)
    return _call("masked_attention_heads", q.device, backend, q=q, k=k, v=v, q_counts=q_counts,
                 kv_slot=kv_slot, scale=scale)


def lm_head_ce(h: Tensor, w: Tensor, labels: Tensor, ignore_index: int = -100,
               chunk_size: int = 4096, *, backend: Optional[str] = None,
               validate: bool = True) -> Tensor:
    """Mean next-token NLL per mask, fp32 [K]: loss[k] = mean_m CE(h[k, m] @ w.T, labels[m]).

    h [K, M, d], w [V, d], labels int64 [M] or [K, M] (``ignore_index`` rows do not count; a mask
    with no counted row gives NaN). No [K*M, V] logits tensor is built. ``validate`` checks that
    labels lie in [0, V) or equal ``ignore_index``.
    """
    _shapes.lm_head_ce_shape(h, w, labels, ignore_index, chunk_size, validate_values=validate)
    return _call("lm_head_ce", h.device, backend, h=h, w=w, labels=labels,
                 ignore_index=ignore_index, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# index lists of query-head pruning: device ops only (no host sync unless validate checks a
# capacity), so they run on any device and backend

class HeadLists(NamedTuple):
    """The compact index lists of one layer's attention under K query-head masks.

    q_idx int32 [K, q_cap] / q_counts [K]: kept query heads (ascending, zero padded), the rows of
    q_proj and the columns of o_proj to gather; kv_idx int32 [K, kv_cap] / kv_counts [K]: kept KV
    groups (kept while any of their query heads is), the rows of k_proj/v_proj; kv_slot int32
    [K, q_cap]: the compact KV slot each kept query head reads (0 beyond q_counts), the
    :func:`masked_attention_heads` argument.
    """
    q_idx: Tensor
    q_counts: Tensor
    kv_idx: Tensor
    kv_counts: Tensor
    kv_slot: Tensor


def head_lists(q_masks: Tensor, q_per_kv: int, capacity: Optional[int] = None, *,
               backend: Optional[str] = None, validate: bool = True) -> HeadLists:
    """:class:`HeadLists` of bool query-head masks [K, Hq] with ``q_per_kv`` query heads per KV
    group. ``capacity`` bounds the kept query heads (q_cap; kv_cap = min(Hkv, capacity): a mask
    keeps at most as many groups as heads); None: all heads. ``validate`` is
    :func:`compact_masks`' check that no mask keeps more than ``capacity`` heads (one host sync,
    only when a capacity is given)."""
    _shapes.compact_shape(q_masks, capacity, "q_masks")
    K, hq = q_masks.shape
    hkv = _shapes.check_q_per_kv(hq, q_per_kv)
    q_idx, q_counts = compact_masks(q_masks, capacity, backend=backend, validate=validate)
    kv_masks = q_masks.reshape(K, hkv, q_per_kv).any(dim=2)
    kv_cap = None if capacity is None else min(hkv, capacity)
    kv_idx, kv_counts = compact_masks(kv_masks, kv_cap, backend=backend, validate=False)
    # A kept group's compact slot is the number of kept groups before it.
    group_slot = kv_masks.cumsum(dim=1) - 1
    kv_slot = group_slot.gather(1, q_idx.long() // q_per_kv)
    return HeadLists(q_idx, q_counts, kv_idx, kv_counts, _zero_beyond(kv_slot, q_counts))


def head_lists_from_groups(kv_idx: Tensor, kv_counts: Tensor, q_per_kv: int) -> HeadLists:
    """:class:`HeadLists` of KV-group index lists (``compact_masks`` of group masks), every query
    head of a kept group kept: q_idx[i, j*G + g] = kv_idx[i, j]*G + g and kv_slot[i, h] = h // G
    (G = q_per_kv), so the KV-group case is one case of :func:`head_lists`."""
    _shapes.check_rank("kv_idx", kv_idx, 2, "[K, kv_cap]")
    K, kv_cap = kv_idx.shape
    _shapes.check_compacted(kv_idx, kv_counts, kv_cap, K, False, ("kv_idx", "kv_counts"))
    _shapes.check_q_per_kv(kv_cap * q_per_kv, q_per_kv)
    q_counts, kv_slot = _shapes.group_slots(kv_counts, q_per_kv, kv_cap * q_per_kv)
    head = torch.arange(kv_cap * q_per_kv, device=kv_idx.device) % q_per_kv
    q_idx = kv_idx.repeat_interleave(q_per_kv, dim=1) * q_per_kv + head
    return HeadLists(_zero_beyond(q_idx, q_counts), q_counts, kv_idx, kv_counts,
                     _zero_beyond(kv_slot, q_counts))


def _zero_beyond(t: Tensor, counts: Tensor) -> Tensor:
    """int32 ``t`` [K, cap] with the entries at and beyond ``counts[k]`` zeroed: the padding of
    every index list."""
    active = torch.arange(t.shape[1], device=t.device)[None, :] < counts[:, None]
    return torch.where(active, t, 0).to(torch.int32)
