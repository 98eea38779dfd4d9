"""Inputs and the attention oracles shared by the kernel tests: test_cuda_emulation.py (the CUDA
kernels' block logic on the CPU), test_cuda_ops.py (the kernels on a GPU), and the query-head
attention cases every backend runs (test_ops_masked_attention.py, test_triton_masked_attention.py).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from probprune_kernels import ops, reference
from tests.conftest import TOLERANCES, assert_close


def counts_for(kind, K, cap):
    """Kept units of K masks: "ragged" (all, none, two thirds), "zero" or "full"."""
    if kind == "ragged":
        return [cap, 0, max(1, (2 * cap) // 3)][:K] if K > 1 else [max(1, (2 * cap) // 3)]
    if kind == "zero":
        return [0] * K
    return [cap] * K


def compact_inputs(K, n, counts, cap=None, device="cpu"):
    """(idx, counts): idx [K, cap] holds ascending random subsets of the n units with the given
    counts, zero padded."""
    cap = n if cap is None else cap
    idx = torch.zeros(K, cap, dtype=torch.int32)
    for k, c in enumerate(counts):
        idx[k, :c] = torch.randperm(n)[:c].sort().values.to(torch.int32)
    return idx.to(device), torch.tensor(counts, dtype=torch.int32, device=device)


def check_flash_rule(got, oracle, inputs, dtype, msg, fp32_tol=None):
    """fp32: within fp32_tol (default: the dtype's tolerance) of ``oracle(*inputs)``. fp16 / bf16
    (flash-attention's rule): the error against the oracle on the inputs in fp32 is at most twice
    the error of the oracle computed in the same dtype, plus the dtype's absolute tolerance."""
    ref32 = oracle(*(t.float() for t in inputs))
    if dtype == torch.float32:
        assert_close(got, ref32, dtype, msg=msg, **(fp32_tol or {}))
        return
    ref_low = oracle(*inputs)
    err = (got.float() - ref32).abs().max().item()
    ref_err = (ref_low.float() - ref32).abs().max().item()
    assert err <= 2 * ref_err + TOLERANCES[dtype]["atol"], \
        f"{msg}: max error {err:.3g}, same-dtype oracle {ref_err:.3g}"


def check_attention(got, q, k, v, counts, scale, dtype, msg, fp32_tol=None):
    """The KV-group form against the reference (flash-attention's rule for fp16 / bf16)."""
    check_flash_rule(got, lambda q, k, v: reference.masked_attention(q, k, v, counts, scale),
                     (q, k, v), dtype, msg, fp32_tol)


# ----------------------------------------------------------------------------------------------
# the query-head (general) form of attention: single query heads pruned inside KV groups

HEAD_KINDS = ["one-left", "none", "all", "mixed"]


def query_head_masks(kind: str, hkv: int, G: int) -> torch.Tensor:
    """bool [K, hkv*G] query-head masks: "one-left" (random, but KV group 0 keeps exactly one
    query head, its last), "none", "all", or "mixed" (those three and a random mask, K = 4)."""
    hq = hkv * G
    none, full = torch.zeros(1, hq, dtype=torch.bool), torch.ones(1, hq, dtype=torch.bool)
    one_left = torch.rand(1, hq) < 0.5
    one_left[0, :G] = False
    one_left[0, G - 1] = True
    cases = {"one-left": one_left, "none": none, "all": full,
             "mixed": torch.cat([one_left, none, full, torch.rand(1, hq) < 0.5])}
    return cases[kind]


class HeadCase(NamedTuple):
    """A query-head attention problem: the full (unpruned) q [K, B, T, Hq, D], k/v
    [K, B, T, Hkv, D], the masks, their :class:`ops.HeadLists`, and the compact inputs of
    ``masked_attention_heads``: q/k/v gathered by q_idx/kv_idx, NaN in every slot and KV head no
    active slot may read, kv_slot with -1 (out of range) in inactive slots."""
    masks: torch.Tensor
    q_full: torch.Tensor
    k_full: torch.Tensor
    v_full: torch.Tensor
    lists: ops.HeadLists
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_slot: torch.Tensor

    def args(self, device="cpu"):
        """(q, k, v, q_counts, kv_slot) on ``device``."""
        return [t.to(device) for t in (self.q, self.k, self.v, self.lists.q_counts, self.kv_slot)]


def _gather_heads(x, idx, counts):
    """x [K, B, T, H, D] -> [K, B, T, cap, D]: head idx[i, j] in slot j, NaN at and beyond
    counts[i]."""
    out = torch.stack([x[i][:, :, idx[i].long()] for i in range(x.shape[0])])
    for i, c in enumerate(counts.tolist()):
        out[i, :, :, c:] = float("nan")
    return out


def head_case(masks, G, B, T, D, dtype, tight: bool = False) -> HeadCase:
    """Random inputs for ``masks`` [K, Hq]; ``tight``: the smallest query capacity that holds
    every mask (at least 1), so Hq_cap is generally not a multiple of Hkv_cap."""
    K, hq = masks.shape
    q_full = torch.randn(K, B, T, hq, D).to(dtype)
    k_full = torch.randn(K, B, T, hq // G, D).to(dtype)
    v_full = torch.randn(K, B, T, hq // G, D).to(dtype)
    capacity = max(int(masks.sum(1).max()), 1) if tight else None
    lists = ops.head_lists(masks, G, capacity)
    active = torch.arange(lists.kv_slot.shape[1])[None, :] < lists.q_counts[:, None]
    kv_slot = torch.where(active, lists.kv_slot, -1).to(torch.int32)
    return HeadCase(masks, q_full, k_full, v_full, lists,
                    _gather_heads(q_full, lists.q_idx, lists.q_counts),
                    _gather_heads(k_full, lists.kv_idx, lists.kv_counts),
                    _gather_heads(v_full, lists.kv_idx, lists.kv_counts), kv_slot)


def sliced_attention(q_full, k_full, v_full, masks, G, q_cap, scale=None):
    """The oracle of the query-head form, physically sliced: for each mask, causal attention of
    only its kept query heads (ascending ids) over KV head ``id // G`` of the full tensors, in
    compact slots 0, 1, ...; zero beyond."""
    K, B, T, _, D = q_full.shape
    o = q_full.new_zeros(K, B, T, q_cap, D)
    for i in range(K):
        kept = masks[i].nonzero().flatten()
        if kept.numel() == 0:
            continue
        qs = q_full[i][:, :, kept].transpose(1, 2)        # [B, c, T, D]
        ks = k_full[i][:, :, kept // G].transpose(1, 2)
        vs = v_full[i][:, :, kept // G].transpose(1, 2)
        o[i, :, :, : kept.numel()] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale).transpose(1, 2)
    return o


def dense_gqa(q, k, v, scale=None):
    """Unpruned causal GQA attention of [K, B, T, H, D] tensors (query head h reads KV head
    h // G)."""
    K, B, T, hq, D = q.shape
    o = F.scaled_dot_product_attention(q.flatten(0, 1).transpose(1, 2),
                                       k.flatten(0, 1).transpose(1, 2),
                                       v.flatten(0, 1).transpose(1, 2), is_causal=True,
                                       scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(K, B, T, hq, D)


def check_head_attention(got, case: HeadCase, G, scale, dtype, msg,
                         fp32_tol: Optional[dict] = None):
    """``got`` (the op on ``case.args()``) against the sliced oracle (flash-attention's rule for
    fp16 / bf16); inactive slots exactly zero; with every head kept, also against dense GQA."""
    q_cap = case.q.shape[3]
    assert got.shape == case.q.shape and got.dtype == dtype, msg
    check_flash_rule(got, lambda q, k, v: sliced_attention(q, k, v, case.masks, G, q_cap, scale),
                     (case.q_full, case.k_full, case.v_full), dtype, msg, fp32_tol)
    for i, c in enumerate(case.lists.q_counts.tolist()):
        assert (got[i, :, :, c:] == 0).all(), f"{msg}: mask {i} slots >= {c} not zero"
    if bool(case.masks.all()):
        check_flash_rule(got, lambda q, k, v: dense_gqa(q, k, v, scale),
                         (case.q_full, case.k_full, case.v_full), dtype, f"{msg} (dense GQA)",
                         fp32_tol)



def routing_case():
    """A hand-built case: v is constant over positions within each KV head (10*i + j + 1 in head
    j of mask i), so every output row of an active slot is the value of the KV head it reads,
    whatever q and k. Mask 0 keeps 3 slots, reading KV heads 2, 0, 0; mask 1 keeps 1 slot
    reading head 2; Hq_cap 4 over Hkv_cap 3; inactive kv_slot entries are garbage.
    Returns ((q, k, v, q_counts, kv_slot), expected o)."""
    K, B, T, hq, hkv, D = 2, 2, 20, 4, 3, 8
    q, k = torch.randn(K, B, T, hq, D), torch.randn(K, B, T, hkv, D)
    value = 10 * torch.arange(K)[:, None] + torch.arange(hkv)[None, :] + 1.0
    v = value.view(K, 1, 1, hkv, 1).expand(K, B, T, hkv, D).contiguous()
    q_counts = torch.tensor([3, 1], dtype=torch.int32)
    kv_slot = torch.tensor([[2, 0, 0, -1], [2, 7, -3, 9]], dtype=torch.int32)
    expected = torch.zeros(K, B, T, hq, D)
    for i, h, val in ((0, 0, 3.0), (0, 1, 1.0), (0, 2, 1.0), (1, 0, 13.0)):
        expected[i, :, :, h] = val
    return (q, k, v, q_counts, kv_slot), expected
