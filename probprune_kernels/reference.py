"""Pure-torch implementation of every op: the oracle of the tests and the CPU path.

Each op gathers the active rows/columns of the weight, then multiplies: on the CPU this is the
fastest honest way to pay only for the kept units. The per-mask loop reads ``counts`` on the host,
which is free on the CPU and a sync on a GPU (where the Triton/CUDA backends take over).
Shapes and validation live in ``_shapes``; these functions assume checked inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._shapes import group_slots

# The contract of every backend: its results match this reference within the tolerance of their
# dtype (fp32 tight; low precision by dtype). The kernel tests and the GPU micro-benchmarks'
# output check both apply it.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def _unit_rows(idx_k: torch.Tensor, group: int) -> torch.Tensor:
    """Expands unit ids into the ``group`` consecutive row (or column) ids each unit owns."""
    return (idx_k.long()[:, None] * group + torch.arange(group, device=idx_k.device)).reshape(-1)


def sample_masks(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Bernoulli masks ``uniforms < probs`` [K, n]; uniforms come from the caller's generator so
    every backend draws the same masks."""
    return uniforms < probs.to(uniforms.dtype)


def compact_masks(masks: torch.Tensor, capacity: Optional[int] = None):
    """bool [K, n] -> (idx int32 [K, cap] ascending kept ids, zero padded; counts int32 [K])."""
    K, n = masks.shape
    cap = n if capacity is None else capacity
    counts = masks.sum(dim=1, dtype=torch.int32)
    # A stable sort of "dropped" flags puts the kept ids first, in ascending order.
    order = torch.sort((~masks).to(torch.uint8), dim=1, stable=True).indices[:, :cap]
    valid = torch.arange(cap, device=masks.device)[None, :] < counts[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order)).to(torch.int32)
    return idx.contiguous(), counts


def gather_rows_gemm(x, w, idx, counts, group: int, bias: Optional[torch.Tensor] = None):
    """y[k, :, j*group + g] = x[k] @ w[idx[k, j]*group + g] (+ bias) for j < counts[k]; else 0."""
    K, M, _ = x.shape
    y = x.new_zeros(K, M, idx.shape[1] * group)
    for k, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        rows = _unit_rows(idx[k, :c], group)
        y[k, :, : c * group] = F.linear(x[k], w[rows], None if bias is None else bias[rows])
    return y


def gather_rows_swiglu(x, w_gate, w_up, idx, counts):
    """y[k, :, j] = silu(x[k] @ w_gate[idx[k, j]]) * (x[k] @ w_up[idx[k, j]]) for j < counts[k]."""
    K, M, _ = x.shape
    y = x.new_zeros(K, M, idx.shape[1])
    for k, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        rows = idx[k, :c].long()
        gate = F.linear(x[k], w_gate[rows]).float()
        up = F.linear(x[k], w_up[rows]).float()
        y[k, :, :c] = (F.silu(gate) * up).to(y.dtype)
    return y


def gather_cols_gemm(h, w, idx, counts, group: int, residual: Optional[torch.Tensor] = None):
    """y[k] = h[k, :, :counts[k]*group] @ w[:, cols_k].T (+ residual[k]), cols_k the active columns."""
    K, M, _ = h.shape
    y = h.new_zeros(K, M, w.shape[0]) if residual is None else residual.clone()
    for k, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        cols = _unit_rows(idx[k, :c], group)
        y[k] += F.linear(h[k, :, : c * group], w[:, cols])
    return y


def masked_attention_heads(q, k, v, q_counts, kv_slot, scale: Optional[float] = None):
    """Causal attention of the first ``q_counts[i]`` query slots of mask ``i``, slot ``h`` over KV
    head ``kv_slot[i, h]``. q [K, B, T, Hq_cap, D], k/v [K, B, T, Hkv_cap, D] -> o like q;
    inactive slots give zeros."""
    o = torch.zeros_like(q)
    for i, c in enumerate(q_counts.tolist()):
        if c == 0:
            continue
        slots = kv_slot[i, :c].long()
        qi = q[i, :, :, :c].transpose(1, 2)  # [B, c, T, D]
        ki = k[i][:, :, slots].transpose(1, 2)
        vi = v[i][:, :, slots].transpose(1, 2)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        o[i, :, :, :c] = oi.transpose(1, 2)
    return o


def masked_attention(q, k, v, counts, scale: Optional[float] = None):
    """The KV-group form: the first ``counts[i]`` KV heads of each mask and their query heads."""
    G = q.shape[3] // k.shape[3]
    return masked_attention_heads(q, k, v, *group_slots(counts, G, q.shape[3]), scale)


# The narrowest vocabulary slice of an lm_head_ce tile: narrower slices make GEMMs too thin to
# run at speed, so a tight memory budget shortens the tile's rows instead.
MIN_VOCAB_TILE = 4096


def lm_head_ce(h, w, labels, ignore_index: int = -100, chunk_size: int = 4096):
    """Mean next-token NLL per mask: loss[k] = mean_m CE(h[k, m] @ w.T, labels[m]).

    No [K*M, vocab] logits tensor: at most the logits of ``chunk_size`` rows of every mask
    (K * chunk_size * V fp32 values) are live, built as tiles of many rows by a slice of the
    vocabulary with an online log-sum-exp across the slices. Tiling the vocabulary rather than
    the rows reads ``w`` once per row block instead of once per ``chunk_size`` rows: with Gemma 3's
    262k-token head (671 MB in fp32) at a search step's 1016 rows, 1 read instead of 16, and the
    whole step 1.41x faster on 2 CPU cores (``python -m bench --models gemma3-270m``). Rows whose
    label is ``ignore_index`` do not count; a mask with no counted row gives NaN.
    """
    K, M, d = h.shape
    V = w.shape[0]
    x = h.reshape(K * M, d)
    labels = labels.expand(K, M).reshape(-1)
    counted = labels != ignore_index
    target_id = torch.where(counted, labels, 0)
    budget = K * max(1, min(chunk_size, M)) * V
    cols = min(V, max(MIN_VOCAB_TILE, budget // max(1, K * M)))
    rows = max(1, budget // cols)
    nll = torch.empty(K * M, dtype=torch.float32, device=h.device)
    for r in range(0, K * M, rows):
        xr, tr = x[r:r + rows], target_id[r:r + rows]
        top = torch.full((len(xr),), -float("inf"), device=h.device)
        sum_exp = torch.zeros(len(xr), device=h.device)
        target = torch.zeros(len(xr), device=h.device)
        for c in range(0, V, cols):
            z = (xr @ w[c:c + cols].T).float()
            here = (tr >= c) & (tr < c + z.shape[1])
            at_label = z.gather(-1, (tr - c).clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1)
            target = torch.where(here, at_label, target)
            new_top = torch.maximum(top, z.amax(-1))
            sum_exp = sum_exp * (top - new_top).exp() + z.sub_(new_top[:, None]).exp_().sum(-1)
            top = new_top
            del z  # before the next tile's
        nll[r:r + rows] = sum_exp.log() + top - target
    nll = torch.where(counted, nll, 0.0).reshape(K, M)
    return nll.sum(1) / counted.reshape(K, M).sum(1)
