"""lm_head + cross-entropy fused, streaming the vocabulary: one mean NLL per mask, no logits tensor.

    z[k, m, :] = h[k, m] @ w.T                                   (fp32 accumulation, never stored)
    nll[k, m] = logsumexp(z[k, m]) - z[k, m, labels[k, m]]       (0 where labels == ignore_index)
    loss[k]   = sum_m nll[k, m] / #{m : labels[k, m] != ignore_index}   (NaN when no row counts)

Shapes: h [K, M, d], w [V, d], labels int64 [M] (shared by the K masks) or [K, M] -> fp32 [K].
Each program owns BLOCK_M rows of one mask and walks the vocabulary in BLOCK_V tiles with an online
logsumexp (base 2), so memory is O(K*M) floats for the per-row NLL, whatever V is. ``chunk_size``
of the reference is not needed here (the tile sizes bound the working set).
"""
import torch
import triton
import triton.language as tl

from ._common import bucket, configs, dot_precision, dot_upcast

_CONFIGS = configs(
    [
        (dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=64), 4, 3),
        (dict(BLOCK_M=128, BLOCK_V=64, BLOCK_D=64), 4, 3),
        (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=64), 4, 4),
    ],
    dict(BLOCK_M=16, BLOCK_V=16, BLOCK_D=16),
)


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "V", "D"])
@triton.jit
def _lm_head_ce_kernel(
    h_ptr, w_ptr, lab_ptr, nll_ptr,
    M, V, D, M_BUCKET, ignore_index,
    stride_hk, stride_hm, stride_hd,
    stride_wv, stride_wd,
    stride_lk, stride_lm,
    stride_nk,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row tile, mask k). Writes nll[k, rows] (fp32, 0 for ignored/out-of-range rows).
    ``stride_lk`` is 0 when the K masks share one label row."""
    pid_m = tl.program_id(0)
    mask_id = tl.program_id(1).to(tl.int64)
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    lab = tl.load(lab_ptr + mask_id * stride_lk + offs_m * stride_lm, mask=row_ok,
                  other=ignore_index)
    h_base = h_ptr + mask_id * stride_hk + offs_m[:, None] * stride_hm
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of z*log2(e)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # running sum of 2^(z*log2e - m)
    tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # z at the label
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = offs_d < D - d0
            ht = tl.load(h_base + (d0 + offs_d)[None, :] * stride_hd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_v[None, :].to(tl.int64) * stride_wv
                         + (d0 + offs_d)[:, None] * stride_wd,
                         mask=d_ok[:, None] & v_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_V]
            if DOT_UPCAST:
                ht = ht.to(tl.float32)
                wt = wt.to(tl.float32)
            z = tl.dot(ht, wt, z, input_precision=DOT_PRECISION)
        tgt += tl.sum(tl.where(offs_v[None, :] == lab[:, None], z, 0.0), 1)
        s = tl.where(v_ok[None, :], z * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    nll = (m_i + tl.math.log2(l_i)) / LOG2E - tgt
    nll = tl.where(row_ok & (lab != ignore_index), nll, 0.0)
    tl.store(nll_ptr + mask_id * stride_nk + offs_m, nll, mask=row_ok)


def lm_head_ce(h, w, labels, ignore_index=-100, chunk_size=4096):
    """Launcher; signature of ``reference.lm_head_ce`` (``chunk_size`` unused: see module doc)."""
    K, M, d = h.shape
    V = w.shape[0]
    nll = torch.zeros((K, M), device=h.device, dtype=torch.float32)
    if K * M > 0:
        stride_lk, stride_lm = (0, labels.stride(0)) if labels.dim() == 1 else labels.stride()
        _lm_head_ce_kernel[(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), K))](
            h, w, labels, nll,
            M, V, d, bucket(M), ignore_index,
            h.stride(0), h.stride(1), h.stride(2),
            w.stride(0), w.stride(1),
            stride_lk, stride_lm,
            nll.stride(0),
            DOT_PRECISION=dot_precision(h.dtype), DOT_UPCAST=dot_upcast(h.dtype),
        )
    n = (labels.expand(K, M) != ignore_index).sum(dim=1)
    return nll.sum(dim=1) / n
