"""The one definition of every op's shapes and input rules, shared by the public ops (checks before
any launch) and their fake (meta) registrations; the launchers assume checked inputs.

Each ``*_shape`` function validates an op's arguments *before any launch* and returns its output
shape; ``validate_values=False`` skips the checks that read tensor values (a host sync on a GPU).
``check_kept`` checks a compaction's result. Errors are ``ValueError``/``TypeError`` whose text
names the argument and the rule broken.

Conventions (the kernel contract, see DESIGN.md):

* ``K`` masks are evaluated at once; ``n`` units; a unit is ``group`` consecutive rows (gather-rows)
  or columns (gather-cols) of a weight, e.g. one KV head group = ``q_per_kv * head_dim`` rows of
  ``q_proj``.
* Compacted masks are ``idx`` int32 ``[K, n_cap]`` (kept unit ids, ascending, entries at and beyond
  ``counts[k]`` are 0) and ``counts`` int32 ``[K]``. ``n_cap`` is the capacity (``n`` by default).
* Outputs of gather-rows ops are compact: ``[K, M, n_cap * group]``; columns at and beyond
  ``counts[k] * group`` are zero.
* Attention heads are compact too. The general (query-head) form: ``q_counts`` int32 ``[K]``
  active query slots and ``kv_slot`` int32 ``[K, Hq_cap]``, the compact KV head each active slot
  reads (any slot-to-KV map: a KV group may keep some of its query heads only, and ``Hq_cap``
  need not be a multiple of ``Hkv_cap``). The KV-group form (``counts`` KV heads, every query
  head of a kept group kept) is one case of it, converted by ``group_slots``; the kernels only
  implement the general form.
"""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str):
    raise ValueError(msg)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same(names_tensors, what: str = "dtype") -> None:
    (n0, t0), *rest = names_tensors
    for n, t in rest:
        a, b = getattr(t0, what), getattr(t, what)
        if a != b:
            _fail(f"{n} has {what} {b} but {n0} has {what} {a}; they must match")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        _fail(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); "
              f"call .contiguous() first")


def check_row_or_column_major(name: str, t: torch.Tensor) -> None:
    """A matrix the kernels read in either order: contiguous, or the transposed view ``wt.t()``
    of a contiguous ``wt`` (gather-cols reads its gathered columns as contiguous rows of ``wt``)."""
    if not (t.is_contiguous() or t.t().is_contiguous()):
        _fail(f"{name} must be contiguous or the transposed view of a contiguous matrix (got "
              f"strides {t.stride()} for shape {tuple(t.shape)}); call .contiguous() first")


def check_compacted(idx: torch.Tensor, counts: torch.Tensor, n_units: int, K: int,
                    validate_values: bool = True, names=("idx", "counts")) -> int:
    """Checks ``idx [K, n_cap]`` / ``counts [K]`` for ``n_units`` units; returns ``n_cap``.
    ``names``: the two arguments' names in the messages.

    Value checks (range, counts <= capacity) read the tensors; the engine, which builds them with
    ``compact_masks``, turns them off on its hot path to avoid a host sync.
    """
    ni, nc = names
    check_rank(ni, idx, 2, "[K, n_cap]")
    check_rank(nc, counts, 1, "[K]")
    if idx.dtype != torch.int32 or counts.dtype != torch.int32:
        raise TypeError(f"{ni} and {nc} must be int32, got {idx.dtype} and {counts.dtype}")
    if idx.shape[0] != K or counts.shape[0] != K:
        _fail(f"{ni} {tuple(idx.shape)} and {nc} {tuple(counts.shape)} must have K={K} rows")
    n_cap = idx.shape[1]
    if n_cap > n_units:
        _fail(f"{ni} capacity {n_cap} exceeds the number of units {n_units}")
    check_same([(ni, idx), (nc, counts)], "device")
    if validate_values and K > 0:
        cmax, cmin = int(counts.max()), int(counts.min())
        if cmin < 0 or cmax > n_cap:
            _fail(f"{nc} must lie in [0, capacity={n_cap}], got min {cmin} max {cmax}")
        if n_cap > 0:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n_units:
                _fail(f"{ni} out of range: values must lie in [0, {n_units}), got [{lo}, {hi}]")
    return n_cap


def check_units(name: str, dim: int, group: int) -> int:
    if group < 1:
        _fail(f"group must be >= 1, got {group}")
    if dim % group:
        _fail(f"{name} ({dim}) is not a multiple of group ({group})")
    return dim // group


def gather_rows_shape(x, w, idx, counts, group: int, bias: Optional[torch.Tensor] = None,
                      validate_values: bool = True):
    """x [K, M, Din], w [Dout, Din], bias [Dout] -> y [K, M, n_cap * group]."""
    check_rank("x", x, 3, "[K, M, in_features]")
    check_rank("w", w, 2, "[out_features, in_features]")
    check_float("x", x)
    check_same([("x", x), ("w", w)] + ([("bias", bias)] if bias is not None else []), "dtype")
    check_same([("x", x), ("w", w), ("idx", idx)] + ([("bias", bias)] if bias is not None else []),
               "device")
    K, M, din = x.shape
    if w.shape[1] != din:
        _fail(f"x has in_features {din} but w has shape {tuple(w.shape)}")
    n_units = check_units("w.shape[0]", w.shape[0], group)
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        _fail(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    n_cap = check_compacted(idx, counts, n_units, K, validate_values)
    return (K, M, n_cap * group)


def gather_rows_swiglu_shape(x, w_gate, w_up, idx, counts, validate_values: bool = True):
    """x [K, M, Din], w_gate/w_up [F, Din] -> y [K, M, n_cap]."""
    if w_gate.shape != w_up.shape:
        _fail(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must have one shape")
    check_same([("w_gate", w_gate), ("w_up", w_up)], "dtype")
    check_same([("w_gate", w_gate), ("w_up", w_up)], "device")
    return gather_rows_shape(x, w_gate, idx, counts, 1, None, validate_values)


def gather_cols_shape(h, w, idx, counts, group: int, residual: Optional[torch.Tensor] = None,
                      validate_values: bool = True):
    """h [K, M, n_cap * group], w [Dout, Din], residual [K, M, Dout] -> y [K, M, Dout]."""
    check_rank("h", h, 3, "[K, M, n_cap * group]")
    check_rank("w", w, 2, "[out_features, in_features]")
    check_float("h", h)
    others = [("residual", residual)] if residual is not None else []
    check_same([("h", h), ("w", w)] + others, "dtype")
    check_same([("h", h), ("w", w), ("idx", idx)] + others, "device")
    K, M, hc = h.shape
    n_units = check_units("w.shape[1]", w.shape[1], group)
    n_cap = check_compacted(idx, counts, n_units, K, validate_values)
    if hc != n_cap * group:
        _fail(f"h has {hc} columns but idx capacity {n_cap} x group {group} = {n_cap * group}")
    out = (K, M, w.shape[0])
    if residual is not None and tuple(residual.shape) != out:
        _fail(f"residual must have shape {out}, got {tuple(residual.shape)}")
    return out


def _attention_operands(q, k, v, index_args):
    """Checks shared by both attention forms; returns (K, Hq_cap, Hkv_cap)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(name, t, 5, "[K, B, T, heads, head_dim]")
    check_float("q", q)
    check_same([("q", q), ("k", k), ("v", v)], "dtype")
    check_same([("q", q), ("k", k), ("v", v)] + index_args, "device")
    if k.shape != v.shape:
        _fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if k.shape[:3] != q.shape[:3] or k.shape[4] != q.shape[4]:
        _fail(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in K, B, T or head_dim")
    return q.shape[0], q.shape[3], k.shape[3]


def masked_attention_heads_shape(q, k, v, q_counts, kv_slot, validate_values: bool = True):
    """q [K, B, T, Hq_cap, D], k/v [K, B, T, Hkv_cap, D], q_counts int32 [K] active query slots,
    kv_slot int32 [K, Hq_cap] -> o [K, B, T, Hq_cap, D]. Slot ``h < q_counts[i]`` of mask ``i``
    reads KV head ``kv_slot[i, h]``; the entries of inactive slots are never read (nor checked).
    Value checks: q_counts in [0, Hq_cap], active kv_slot entries in [0, Hkv_cap)."""
    K, hq, hkv = _attention_operands(q, k, v, [("q_counts", q_counts), ("kv_slot", kv_slot)])
    check_rank("q_counts", q_counts, 1, "[K]")
    check_rank("kv_slot", kv_slot, 2, "[K, Hq_cap]")
    if q_counts.dtype != torch.int32 or kv_slot.dtype != torch.int32:
        raise TypeError(f"q_counts and kv_slot must be int32, got {q_counts.dtype} and "
                        f"{kv_slot.dtype}")
    if q_counts.shape[0] != K:
        _fail(f"q_counts must have shape ({K},) (K masks), got {tuple(q_counts.shape)}")
    if tuple(kv_slot.shape) != (K, hq):
        _fail(f"kv_slot must have shape ({K}, {hq}) [K, Hq_cap], got {tuple(kv_slot.shape)}")
    if validate_values and K > 0:
        cmin, cmax = int(q_counts.min()), int(q_counts.max())
        if cmin < 0 or cmax > hq:
            _fail(f"q_counts must lie in [0, Hq_cap={hq}] query slots, got min {cmin} max {cmax}")
        active = torch.arange(hq, device=kv_slot.device)[None, :] < q_counts[:, None]
        bad = active & ((kv_slot < 0) | (kv_slot >= hkv))
        if bool(bad.any()):
            i, h = bad.nonzero()[0].tolist()
            _fail(f"kv_slot[{i}, {h}] = {int(kv_slot[i, h])}: the KV slot of an active query "
                  f"slot (h < q_counts[{i}] = {int(q_counts[i])}) must lie in [0, "
                  f"Hkv_cap={hkv}); {int(bad.sum())} active entries are outside")
    return tuple(q.shape)


def masked_attention_shape(q, k, v, counts, validate_values: bool = True):
    """q [K, B, T, Hq_cap, D], k/v [K, B, T, Hkv_cap, D], counts [K] active KV heads
    -> o [K, B, T, Hq_cap, D]. Query heads ``j*G .. j*G+G-1`` use KV head ``j`` (G = Hq/Hkv):
    the case ``group_slots`` of the general form."""
    K, hq, hkv = _attention_operands(q, k, v, [("counts", counts)])
    if hkv == 0 or hq % hkv:
        _fail(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    check_rank("counts", counts, 1, "[K]")
    if counts.dtype != torch.int32 or counts.shape[0] != K:
        _fail(f"counts must be int32 [K={K}], got {counts.dtype} {tuple(counts.shape)}")
    if validate_values and K > 0:
        cmin, cmax = int(counts.min()), int(counts.max())
        if cmin < 0 or cmax > hkv:
            _fail(f"counts must lie in [0, {hkv}] KV heads, got min {cmin} max {cmax}")
    return tuple(q.shape)


def group_slots(counts: torch.Tensor, q_per_kv: int, hq: int):
    """The KV-group form of masked attention as its general (query-head) form: ``counts[i]``
    kept KV groups of ``q_per_kv`` query heads are ``q_counts = counts * q_per_kv`` query slots,
    and slot ``h`` reads KV head ``h // q_per_kv``. Returns (q_counts int32 [K], kv_slot int32
    [K, hq]); device ops only (no host sync)."""
    slots = torch.arange(hq, dtype=torch.int32, device=counts.device) // q_per_kv
    return counts * q_per_kv, slots.expand(counts.shape[0], hq).contiguous()


def check_q_per_kv(hq: int, q_per_kv: int) -> int:
    """``hq`` query heads split into KV groups of ``q_per_kv``; returns the number of groups."""
    if q_per_kv < 1:
        _fail(f"q_per_kv must be >= 1, got {q_per_kv}")
    if hq % q_per_kv:
        _fail(f"{hq} query heads do not split into KV groups of q_per_kv={q_per_kv}")
    return hq // q_per_kv


def lm_head_ce_shape(h, w, labels, ignore_index: int = -100, chunk_size: int = 4096,
                     validate_values: bool = True):
    """h [K, M, d], w [V, d], labels [M] or [K, M] int64 -> loss [K] float32. Value check: every
    label lies in [0, V) or equals ``ignore_index``."""
    check_rank("h", h, 3, "[K, M, hidden]")
    check_rank("w", w, 2, "[vocab, hidden]")
    check_float("h", h)
    check_same([("h", h), ("w", w)], "dtype")
    check_same([("h", h), ("w", w), ("labels", labels)], "device")
    K, M, d = h.shape
    if w.shape[1] != d:
        _fail(f"h has hidden size {d} but w has shape {tuple(w.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if tuple(labels.shape) not in ((M,), (K, M)):
        _fail(f"labels must have shape ({M},) or ({K}, {M}), got {tuple(labels.shape)}")
    if chunk_size < 1:
        _fail(f"chunk_size must be >= 1, got {chunk_size}")
    if validate_values and labels.numel():
        vocab = w.shape[0]
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            _fail(f"labels must lie in [0, vocab={vocab}) or equal ignore_index={ignore_index}; "
                  f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return (K,)


def capacity_of(n: int, capacity: Optional[int]) -> int:
    """The index capacity for ``n`` units: ``n`` when None, else ``capacity`` within [0, n]."""
    cap = n if capacity is None else capacity
    if not 0 <= cap <= n:
        _fail(f"capacity must lie in [0, {n}], got {cap}")
    return cap


def check_kept(counts: torch.Tensor, capacity: Optional[int]) -> None:
    """After compaction: every mask's kept count fits the capacity, else units would be dropped
    from idx without a word (``counts`` are the true counts). One host sync."""
    if capacity is None or counts.numel() == 0:
        return
    kept = int(counts.max())
    if kept > capacity:
        _fail(f"capacity={capacity} is below the kept count: mask {int(counts.argmax())} keeps "
              f"{kept} units, which idx cannot hold; pass capacity >= {kept} (or None: all units)")


def compact_shape(masks: torch.Tensor, capacity: Optional[int] = None, name: str = "masks"):
    """masks bool [K, n] -> idx [K, cap]."""
    check_rank(name, masks, 2, "[K, n]")
    if masks.dtype != torch.bool:
        raise TypeError(f"{name} must be bool, got {masks.dtype}")
    K, n = masks.shape
    return (K, capacity_of(n, capacity))


def sample_shape(probs: torch.Tensor, uniforms: torch.Tensor, validate_values: bool = True):
    """probs [n], uniforms [K, n] (floating point) -> masks [K, n]. Value check: probs are
    probabilities (a NaN would prune its unit on every sample, a value above 1 keep it)."""
    check_rank("uniforms", uniforms, 2, "[K, n]")
    check_float("uniforms", uniforms)
    check_float("probs", probs)
    if probs.dim() != 1 or probs.shape[0] != uniforms.shape[1]:
        _fail(f"probs must have shape ({uniforms.shape[1]},), got {tuple(probs.shape)}")
    check_same([("probs", probs), ("uniforms", uniforms)], "device")
    if validate_values and probs.numel():
        bad = ~((probs >= 0) & (probs <= 1))  # NaN fails both comparisons
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            _fail(f"probs must lie in [0, 1] (no NaN): probs[{first}] = {float(probs[first])}, "
                  f"{int(bad.sum())} of {probs.numel()} values outside")
    return tuple(uniforms.shape)
