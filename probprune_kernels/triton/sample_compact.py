"""Mask sampling and compaction for K masks, one program per mask, one launch in all.

    masks[k, u] = uniforms[k, u] < probs[u]                       (in uniforms' dtype)
    idx[k, :counts[k]] = the kept unit ids u in ascending order, idx[k, counts[k]:cap] = 0
    counts[k] = sum_u masks[k, u]                                  (the true count, even if > cap)

Shapes: probs [n], uniforms [K, n] (or masks bool [K, n]) -> masks bool [K, n], idx int32
[K, cap], counts int32 [K]. The ascending order comes from a running prefix sum over blocks of
units; a unit's slot is ``running_count + cumsum(keep) - 1`` within its block.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, configs, on_device

_CONFIGS = configs(
    [  # one program per mask walks all n units: wider blocks and more warps for wide layers
        (dict(BLOCK_N=1024), 4, 1),
        (dict(BLOCK_N=2048), 8, 1),
        (dict(BLOCK_N=4096), 8, 1),
    ],
    dict(BLOCK_N=16),
)


@triton.autotune(configs=_CONFIGS, key=["N", "CAP"])
@triton.jit
def _sample_compact_kernel(
    probs_ptr, u_ptr, m_ptr, idx_ptr, cnt_ptr,
    N, CAP,
    stride_uk, stride_mk, stride_ik,
    SAMPLE: tl.constexpr, WRITE_MASK: tl.constexpr, COMPACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Mask k = program_id(0). ``SAMPLE``: keep = u < p, else keep = masks (read from ``m_ptr``,
    bool viewed as uint8). ``WRITE_MASK`` stores keep into ``m_ptr``; ``COMPACT`` writes idx/counts.
    """
    k = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    total = tl.zeros((), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        u_ids = n0 + offs
        ok = u_ids < N
        if SAMPLE:
            u = tl.load(u_ptr + k * stride_uk + u_ids, mask=ok, other=1.0)
            # Same rule as the reference: probs cast to uniforms' dtype, then compared (in fp32,
            # exact for every input dtype).
            p = tl.load(probs_ptr + u_ids, mask=ok, other=0.0).to(u.dtype)
            keep = (u.to(tl.float32) < p.to(tl.float32)) & ok
        else:
            keep = (tl.load(m_ptr + k * stride_mk + u_ids, mask=ok, other=0) != 0) & ok
        if WRITE_MASK:
            tl.store(m_ptr + k * stride_mk + u_ids, keep.to(tl.uint8), mask=ok)
        if COMPACT:
            keep_i = keep.to(tl.int32)
            slot = total + tl.cumsum(keep_i, 0) - 1
            tl.store(idx_ptr + k * stride_ik + slot, u_ids.to(tl.int32), mask=keep & (slot < CAP))
            total += tl.sum(keep_i, 0)
    if COMPACT:
        tl.store(cnt_ptr + k, total)
        # Zero padding past the count, so idx is fully defined without a separate memset.
        for c0 in range(0, CAP, BLOCK_N):
            slots = c0 + offs
            tl.store(idx_ptr + k * stride_ik + slots, tl.zeros((BLOCK_N,), dtype=tl.int32),
                     mask=(slots >= total) & (slots < CAP))


def _launch(probs, uniforms, masks, capacity, sample, write_mask, compact):
    src = uniforms if sample else masks
    K, n = src.shape
    cap = n if capacity is None else capacity
    device = src.device
    if write_mask:
        masks = torch.empty((K, n), device=device, dtype=torch.bool)
    idx = torch.empty((K, cap), device=device, dtype=torch.int32)
    counts = torch.empty((K,), device=device, dtype=torch.int32)
    if sample and INTERPRET and probs.dtype != uniforms.dtype:
        # The interpreter's fp32 -> bf16 cast truncates; torch rounds like the GPU does.
        probs = probs.to(uniforms.dtype)
    if K > 0:
        m8 = masks.view(torch.uint8)  # bool and uint8 share storage: no copy
        with on_device(src):
            _sample_compact_kernel[(K,)](
                probs if sample else m8, uniforms if sample else m8, m8, idx, counts,
                n, cap,
                src.stride(0), m8.stride(0), idx.stride(0),
                SAMPLE=sample, WRITE_MASK=write_mask, COMPACT=compact,
            )
    return masks, idx, counts


def sample_masks(probs, uniforms):
    """Launcher; signature of ``reference.sample_masks``."""
    return _launch(probs, uniforms, None, None, True, True, False)[0]


def compact_masks(masks, capacity=None):
    """Launcher; signature of ``reference.compact_masks``."""
    _, idx, counts = _launch(None, None, masks, capacity, False, False, True)
    return idx, counts


def sample_and_compact(probs, uniforms, capacity=None):
    """Fused sampling + compaction: the mask never round-trips through memory before compaction."""
    return _launch(probs, uniforms, None, capacity, True, True, True)
