"""Causal attention over each mask's active query heads, all K masks in one launch (online
softmax, as in the Triton fused-attention tutorial / FlashAttention).

One kernel, the general (query-head) form. For mask ``i`` with ``q_counts[i]`` active query slots,
slot ``h`` reading the compact KV head ``j = kv_slot[i, h]``:

    o[i, b, t, h] = sum_{s <= t} softmax_s(scale * q[i, b, t, h] . k[i, b, s, j]) v[i, b, s, j]
                                                             for h < q_counts[i]
    o[i, b, t, h] = 0                                        for h >= q_counts[i]

Shapes: q [K, B, T, Hq_cap, D], k/v [K, B, T, Hkv_cap, D], q_counts int32 [K], kv_slot int32
[K, Hq_cap] -> o [K, B, T, Hq_cap, D]. Heads are compact (the gather-rows GEMM put the kept heads
first), so a program whose slot is past ``q_counts[i]`` only stores zeros, and never reads its
kv_slot entry. The KV-group form (``counts`` KV heads, GQA ``h // G``) is the conversion
``_shapes.group_slots`` in front of the same kernel.
"""
import math

import torch
import triton
import triton.language as tl

from .._shapes import group_slots
from ._common import bucket, configs, dot_precision, dot_upcast, finish, on_device, out_dtype

_CONFIGS = configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=32), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=64), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=32), 4, 2),
        (dict(BLOCK_M=32, BLOCK_N=32), 4, 2),
    ],
    dict(BLOCK_M=16, BLOCK_N=16),
)


@triton.autotune(configs=_CONFIGS, key=["T_BUCKET", "D"])
@triton.jit
def _masked_attention_kernel(
    q_ptr, k_ptr, v_ptr, cnt_ptr, slot_ptr, o_ptr, qk_scale,
    T, HQ, D, T_BUCKET,
    stride_qk, stride_qb, stride_qt, stride_qh,
    stride_kk, stride_kb, stride_kt, stride_kh,
    stride_vk, stride_vb, stride_vt, stride_vh,
    stride_ok, stride_ob, stride_ot, stride_oh,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (query tile, batch*query slot, mask); ``cnt_ptr`` / ``slot_ptr`` are q_counts [K]
    and kv_slot [K, HQ] (contiguous). ``qk_scale`` = scale * log2(e) (exp2 softmax). The head
    dimension is contiguous (unit stride, checked by the launcher) and padded to ``BLOCK_D`` (a
    power of two >= 16) with masked loads.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    mask_id = tl.program_id(2).to(tl.int64)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < T
    o_ptrs = (o_ptr + mask_id * stride_ok + b * stride_ob + h * stride_oh
              + offs_m[:, None] * stride_ot + offs_d[None, :])
    if h >= tl.load(cnt_ptr + mask_id):
        # Pruned slot: zero output, no loads of q/k/v (its kv_slot entry may be garbage).
        tl.store(o_ptrs, tl.zeros((BLOCK_M, BLOCK_D), dtype=o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        return
    kvh = tl.load(slot_ptr + mask_id * HQ + h)

    q = tl.load(q_ptr + mask_id * stride_qk + b * stride_qb + h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + mask_id * stride_kk + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + mask_id * stride_vk + b * stride_vb + kvh * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Causal: keys past this tile's last query never contribute, so the loop stops there.
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where((offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :], s, float("-inf"))
        # Key 0 is visible to every query row, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_UPCAST:
            vt = vt.to(tl.float32)
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def masked_attention_heads(q, k, v, q_counts, kv_slot, scale=None):
    """Launcher; signature of ``reference.masked_attention_heads`` (inputs validated by ``ops``)."""
    K, B, T, hq, d = q.shape
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype(q.dtype))
    if o.numel() == 0 or k.numel() == 0:  # no KV head (Hkv_cap = 0): no slot can be active
        return finish(o.zero_(), q.dtype)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(4) != 1:
            raise ValueError(f"{name} must have a contiguous head dimension (stride 1), got "
                             f"strides {t.stride()}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(d))

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * hq, K)

    with on_device(q):
        _masked_attention_kernel[grid](
            q, k, v, q_counts, kv_slot, o, scale * 1.4426950408889634,
            T, hq, d, bucket(T),
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3),
            BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype),
            DOT_UPCAST=dot_upcast(q.dtype),
        )
    return finish(o, q.dtype)


def masked_attention(q, k, v, counts, scale=None):
    """The KV-group form; signature of ``reference.masked_attention``."""
    G = q.shape[3] // k.shape[3]
    return masked_attention_heads(q, k, v, *group_slots(counts, G, q.shape[3]), scale)
