"""Gather-cols GEMM over K masks in one launch, with an optional fused residual add.

For mask ``k`` with ``c = counts[k]`` active units of ``group`` columns each, compact input
column ``j < c*group`` multiplies weight column ``col(j) = idx[k, j // group] * group + j % group``:

    y[k, m, o] = sum_{j < c*group} h[k, m, j] * w[o, col(j)]  (+ residual[k, m, o])

Shapes: h [K, M, n_cap*group], w [Dout, Din], idx int32 [K, n_cap], counts int32 [K],
residual [K, M, Dout] -> y [K, M, Dout]. The reduction loop stops at the mask's active width, read
from ``counts`` on the device: a mask with no kept unit costs only the residual copy (or zeros).
Weight layout: ``w`` is [Dout, Din] either row-major or column-major (the transposed view of a
contiguous [Din, Dout] tensor, ``wt.t()``). Column-major is the one to use with ``group == 1``
(MLP channels, down_proj): a gathered column is then a contiguous row of ``wt``, read with vector
loads along Dout; row-major scatters every load of a tile across Din (one scalar load per
element). ``MaskedSwiGLUMLP`` stores down_proj that way on the kernel backends.
"""
import torch
import triton
import triton.language as tl

from ._common import (GEMM_CONFIGS, bucket, dot_precision, dot_upcast, finish, gemm_tile,
                      on_device, out_dtype)


@triton.jit
def _reduce_cols(acc, h_rows, w_cols, idx_row, j_start, j_end, limit, GROUP, stride_hj, stride_wd,
                 m_ok, n_ok, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 DOT_UPCAST: tl.constexpr):
    """``acc += h[:, j] @ w[:, col(j)].T`` over the k tiles [j_start, j_end), compact columns at
    and beyond ``limit`` masked off (h's padding is never read, w's columns load as zeros)."""
    offs_j = tl.arange(0, BLOCK_K)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + offs_j
        j_ok = j < limit
        unit = tl.load(idx_row + j // GROUP, mask=j_ok, other=0)
        cols = unit.to(tl.int64) * GROUP + j % GROUP
        ht = tl.load(h_rows + j[None, :] * stride_hj, mask=m_ok & j_ok[None, :], other=0.0)
        wt = tl.load(w_cols + cols[:, None] * stride_wd, mask=j_ok[:, None] & n_ok,
                     other=0.0)  # [BLOCK_K, BLOCK_N] = w[:, cols].T
        if DOT_UPCAST:
            ht = ht.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(ht, wt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N_IN", "DOUT", "GROUP", "W_COL_MAJOR"])
@triton.jit
def _gather_cols_gemm_kernel(
    h_ptr, w_ptr, r_ptr, idx_ptr, cnt_ptr, y_ptr,
    M, N_IN, DOUT, GROUP, M_BUCKET,
    stride_hk, stride_hm, stride_hj,
    stride_wo, stride_wd,
    stride_ik,
    stride_rk, stride_rm, stride_ro,
    stride_yk, stride_ym, stride_yo,
    HAS_RESIDUAL: tl.constexpr, W_COL_MAJOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program computes a [BLOCK_M, BLOCK_N] tile of y[k] (output features) for mask
    k = program_id(1), reducing over the mask's active compact columns only.

    ``N_IN = n_cap * group`` is the compact input width (static); ``M_BUCKET`` is only an
    autotune key. ``W_COL_MAJOR``: ``stride_wo`` is 1, made a compile-time fact so that the
    weight tile's rows are provably contiguous (vector loads).
    """
    mask_id, _, n_active, offs_m, offs_n = gemm_tile(cnt_ptr, M, DOUT, GROUP, BLOCK_M, BLOCK_N,
                                                     GROUP_M)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < DOUT
    # Row offsets in int64: a mask's [M, width] slab may exceed 2**31 elements.
    rows = offs_m.to(tl.int64)[:, None]
    h_rows = h_ptr + mask_id * stride_hk + rows * stride_hm
    if W_COL_MAJOR:
        w_cols = w_ptr + offs_n[None, :]
    else:
        w_cols = w_ptr + offs_n[None, :] * stride_wo
    idx_row = idx_ptr + mask_id * stride_ik
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Runtime trip counts from the device-side count: no work at all for pruned units. Whole k
    # tiles first, under a limit known to be a multiple of BLOCK_K: their column mask is then
    # constant along a tile and h's loads vectorize too; the ragged last tile after them.
    n_whole = tl.multiple_of(n_active // BLOCK_K * BLOCK_K, BLOCK_K)
    acc = _reduce_cols(acc, h_rows, w_cols, idx_row, 0, n_whole, n_whole, GROUP, stride_hj,
                       stride_wd, m_ok, n_ok, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
    acc = _reduce_cols(acc, h_rows, w_cols, idx_row, n_whole, n_active, n_active, GROUP,
                       stride_hj, stride_wd, m_ok, n_ok, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
    if HAS_RESIDUAL:
        # Fused residual: added in fp32 before the single rounding of the store.
        r = tl.load(r_ptr + mask_id * stride_rk + rows * stride_rm
                    + offs_n[None, :] * stride_ro, mask=m_ok & n_ok, other=0.0)
        acc += r.to(tl.float32)
    y_ptrs = y_ptr + mask_id * stride_yk + rows * stride_ym + offs_n[None, :] * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


def gather_cols_gemm(h, w, idx, counts, group=1, residual=None):
    """Launcher; signature of ``reference.gather_cols_gemm`` (inputs validated by ``ops``)."""
    K, M, n_in = h.shape
    dout = w.shape[0]
    y = torch.empty((K, M, dout), device=h.device, dtype=out_dtype(h.dtype))
    if y.numel() == 0:
        return finish(y, h.dtype)
    r = residual if residual is not None else y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(dout, meta["BLOCK_N"]), K)

    with on_device(h):
        _gather_cols_gemm_kernel[grid](
            h, w, r, idx, counts, y,
            M, n_in, dout, group, bucket(M),
            h.stride(0), h.stride(1), h.stride(2),
            w.stride(0), w.stride(1),
            idx.stride(0),
            r.stride(0), r.stride(1), r.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            HAS_RESIDUAL=residual is not None, W_COL_MAJOR=w.stride(0) == 1,
            DOT_PRECISION=dot_precision(h.dtype), DOT_UPCAST=dot_upcast(h.dtype),
        )
    return finish(y, h.dtype)
