"""lm_head + cross-entropy fused, the vocabulary split over programs: one mean NLL per mask, no
logits tensor.

    z[k, m, :] = h[k, m] @ w.T                                   (fp32 accumulation, never stored)
    nll[k, m] = logsumexp(z[k, m]) - z[k, m, labels[k, m]]       (0 where labels == ignore_index)
    loss[k]   = sum_m nll[k, m] / #{m : labels[k, m] != ignore_index}   (NaN when no row counts)

Shapes: h [K, M, d], w [V, d], labels int64 [M] (shared by the K masks) or [K, M] -> fp32 [K].

Two launches. ``_lm_head_ce_kernel``, grid (row tiles, K, S): each program owns BLOCK_M rows of
one mask and one of S contiguous slices of the vocabulary, walks its slice in BLOCK_V tiles with an
online logsumexp (base 2) and writes the slice's (running max, sum of 2^(z log2e - max), logit at
the label) of every row to an fp32 workspace [3, K, S, M]. ``_lm_head_ce_merge_kernel``, one
program per mask, merges the S partial logsumexps of each row and averages the counted rows.

Without the split, the grid was (row tiles, K): 8 to 16 programs at M = 508, K = 2, each streaming
the whole vocabulary, on GPUs with 100+ SMs. S is chosen (``vocab_splits``) so that the grid holds
``CTAS_PER_SM`` programs per SM at the largest BLOCK_M of the configs, with slices of at least
``MIN_SPLIT_TILES`` tiles of the widest BLOCK_V. The split axis is the slowest one: the programs of
one slice (every row tile and mask) are scheduled together, so the slice of w they all read is
fetched from memory once and served from L2 to the others.

Memory is O(K*S*M) floats whatever V is. ``chunk_size`` of the reference is not needed here (the
tile sizes bound the working set).
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, bucket, configs, dot_precision, dot_upcast, on_device

_GPU_CONFIGS = [
    (dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64), 8, 3),
    (dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=64), 4, 3),
    (dict(BLOCK_M=128, BLOCK_V=64, BLOCK_D=64), 4, 3),
    (dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=64), 4, 4),
]
_CONFIGS = configs(_GPU_CONFIGS, dict(BLOCK_M=16, BLOCK_V=16, BLOCK_D=16))

CTAS_PER_SM = 4
MIN_SPLIT_TILES = 2
# SMs assumed when the tensors are not on a GPU (the interpreter): an H100's.
DEFAULT_SM_COUNT = 132
# Rows of the merge kernel's blocks and splits merged per step.
_MERGE_BLOCK_M = 16 if INTERPRET else 128
_MERGE_BLOCK_S = 16 if INTERPRET else 32


def vocab_splits(M: int, K: int, V: int, sm_count: int, metas) -> tuple:
    """(S, span): the number of vocabulary slices and the vocabulary entries of each (the last may
    be shorter; none is empty).

    ``span`` is a whole number of tiles of the widest BLOCK_V of ``metas`` (the tile configs the
    kernel may run with; their BLOCK_V are powers of two, so every one divides it). The slices
    are the longest that still give ``CTAS_PER_SM * sm_count`` programs at the largest BLOCK_M,
    but at least ``MIN_SPLIT_TILES`` tiles long; large M needs no split (S = 1). The CUDA kernel
    plans its slices the same way (``csrc/probprune/lm_head_logic.h``: num_splits).
    """
    block_m = max(m["BLOCK_M"] for m in metas)
    unit = max(m["BLOCK_V"] for m in metas)
    tiles = max(triton.cdiv(V, unit), 1)
    want = triton.cdiv(CTAS_PER_SM * max(sm_count, 1), max(triton.cdiv(M, block_m) * K, 1))
    per_split = min(max(tiles // want, MIN_SPLIT_TILES), tiles)
    S = triton.cdiv(tiles, per_split)
    return S, triton.cdiv(tiles, S) * unit


def launch_grid(M: int, K: int, S: int):
    """The grid of ``_lm_head_ce_kernel`` for a tile config ``meta``: (row tiles, K, S)."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), K, S)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_SM_COUNT`` off the GPU)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "V", "D"])
@triton.jit
def _lm_head_ce_kernel(
    h_ptr, w_ptr, lab_ptr, part_ptr,
    M, V, D, M_BUCKET, SPAN, ignore_index,
    stride_hk, stride_hm, stride_hd,
    stride_wv, stride_wd,
    stride_lk, stride_lm,
    stride_pq,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row tile, mask k, vocabulary slice s): the slice [s * SPAN, (s + 1) * SPAN) of V.
    Writes part[q, k, s, rows] for q = 0 (max of z log2e), 1 (sum of 2^(z log2e - max)), 2 (z at
    the label, 0 when the label lies outside the slice); ``stride_pq`` = K * S * M. ``stride_lk``
    is 0 when the K masks share one label row."""
    pid_m = tl.program_id(0)
    mask_id = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    LOG2E: tl.constexpr = 1.4426950408889634
    # 64-bit row offsets: offs_m * stride_hm passes 2^31 for M * d > 2^31 (M = 2^19 at d = 4096)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    lab = tl.load(lab_ptr + mask_id * stride_lk + offs_m * stride_lm, mask=row_ok,
                  other=ignore_index)
    h_base = h_ptr + mask_id * stride_hk + offs_m[:, None] * stride_hm
    # vocabulary indices stay 32-bit (V < 2^31; 64-bit ones cost registers in the tile loop)
    v_begin = split * SPAN
    v_end = tl.minimum(v_begin + SPAN, V)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of z*log2(e)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # running sum of 2^(z*log2e - m)
    tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # z at the label
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
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
    out = part_ptr + (mask_id * tl.num_programs(2) + split) * M + offs_m
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + stride_pq, l_i, mask=row_ok)
    tl.store(out + stride_pq + stride_pq, tgt, mask=row_ok)


@triton.jit
def _lm_head_ce_merge_kernel(
    part_ptr, lab_ptr, loss_ptr,
    M, S, ignore_index,
    stride_lk, stride_lm,
    stride_pq,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program k: loss[k] from the partials of ``_lm_head_ce_kernel``. A row's slices merge like
    the tiles of one slice (online logsumexp); every slice holds at least one vocabulary entry, so
    the merged max of a real row is finite."""
    mask_id = tl.program_id(0).to(tl.int64)
    LN2: tl.constexpr = 0.6931471805599453
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    counted = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = offs_m < M
        lab = tl.load(lab_ptr + mask_id * stride_lk + offs_m * stride_lm, mask=row_ok,
                      other=ignore_index)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = (offs_s < S)[:, None]
            ok = s_ok & row_ok[None, :]
            at = part_ptr + (mask_id * S + offs_s[:, None]) * M + offs_m[None, :]
            # rows past M get a finite max (0): no -inf - -inf in the fold
            pm = tl.where(s_ok, tl.load(at, mask=ok, other=0.0), float("-inf"))
            pl = tl.load(at + stride_pq, mask=ok, other=0.0)
            tgt += tl.sum(tl.load(at + stride_pq + stride_pq, mask=ok, other=0.0), 0)
            m_new = tl.maximum(m_i, tl.max(pm, 0))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(pl * tl.math.exp2(pm - m_new[None, :]), 0)
            m_i = m_new
        use = row_ok & (lab != ignore_index)
        total += tl.where(use, (m_i + tl.math.log2(tl.where(use, l_i, 1.0))) * LN2 - tgt, 0.0)
        counted += use.to(tl.int32)
    n = tl.sum(counted, 0)
    loss = tl.where(n > 0, tl.sum(total, 0) / tl.maximum(n, 1).to(tl.float32), float("nan"))
    tl.store(loss_ptr + mask_id, loss)


def lm_head_ce(h, w, labels, ignore_index=-100, chunk_size=4096):
    """Launcher; signature of ``reference.lm_head_ce`` (``chunk_size`` unused: see module doc)."""
    K, M, d = h.shape
    V = w.shape[0]
    loss = torch.empty((K,), device=h.device, dtype=torch.float32)
    if K == 0:
        return loss
    S, span = vocab_splits(M, K, V, sm_count(h.device), [c.kwargs for c in _CONFIGS])
    part = torch.empty((3, K, S, M), device=h.device, dtype=torch.float32)
    stride_lk, stride_lm = (0, labels.stride(0)) if labels.dim() == 1 else labels.stride()
    with on_device(h):
        if M > 0:
            _lm_head_ce_kernel[launch_grid(M, K, S)](
                h, w, labels, part,
                M, V, d, bucket(M), span, ignore_index,
                h.stride(0), h.stride(1), h.stride(2),
                w.stride(0), w.stride(1),
                stride_lk, stride_lm,
                part.stride(0),
                DOT_PRECISION=dot_precision(h.dtype), DOT_UPCAST=dot_upcast(h.dtype),
            )
        _lm_head_ce_merge_kernel[(K,)](
            part, labels, loss,
            M, S, ignore_index,
            stride_lk, stride_lm,
            part.stride(0),
            BLOCK_M=_MERGE_BLOCK_M, BLOCK_S=_MERGE_BLOCK_S,
        )
    return loss
