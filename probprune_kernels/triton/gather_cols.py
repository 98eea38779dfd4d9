"""Gather-cols GEMM over K masks in one launch, with an optional fused residual add.

For mask ``k`` with ``c = counts[k]`` active units of ``group`` columns each, compact input
column ``j < c*group`` multiplies weight column ``col(j) = idx[k, j // group] * group + j % group``:

    y[k, m, o] = sum_{j < c*group} h[k, m, j] * w[o, col(j)]  (+ residual[k, m, o])

Shapes: h [K, M, n_cap*group], w [Dout, Din], idx int32 [K, n_cap], counts int32 [K],
residual [K, M, Dout] -> y [K, M, Dout]. The reduction loop stops at the mask's active width, read
from ``counts`` on the device: a mask with no kept unit costs only the residual copy (or zeros).
Coalescing: for ``group`` >= 16 (heads) each unit reads contiguous runs of a weight row; for
``group == 1`` (MLP channels) the gathered columns are scattered and a transposed ``down_proj``
would read better (see DESIGN, Deja Vu) -- the contract keeps ``w`` as [Dout, Din].
"""
import torch
import triton
import triton.language as tl

from ._common import (GEMM_CONFIGS, bucket, dot_precision, dot_upcast, finish, gemm_tile,
                      out_dtype)


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N_IN", "DOUT", "GROUP"])
@triton.jit
def _gather_cols_gemm_kernel(
    h_ptr, w_ptr, r_ptr, idx_ptr, cnt_ptr, y_ptr,
    M, N_IN, DOUT, GROUP, M_BUCKET,
    stride_hk, stride_hm, stride_hj,
    stride_wo, stride_wd,
    stride_ik,
    stride_rk, stride_rm, stride_ro,
    stride_yk, stride_ym, stride_yo,
    HAS_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program computes a [BLOCK_M, BLOCK_N] tile of y[k] (output features) for mask
    k = program_id(1), reducing over the mask's active compact columns only.

    ``N_IN = n_cap * group`` is the compact input width (static); ``M_BUCKET`` is only an
    autotune key.
    """
    mask_id, _, n_active, offs_m, offs_n = gemm_tile(cnt_ptr, M, DOUT, GROUP, BLOCK_M, BLOCK_N,
                                                     GROUP_M)
    offs_j = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < DOUT
    h_ptrs = h_ptr + mask_id * stride_hk + offs_m[:, None] * stride_hm + offs_j[None, :] * stride_hj
    idx_row = idx_ptr + mask_id * stride_ik
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Runtime trip count from the device-side count: no work at all for pruned units.
    for j0 in range(0, n_active, BLOCK_K):
        j = j0 + offs_j
        j_ok = j < n_active
        unit = tl.load(idx_row + j // GROUP, mask=j_ok, other=0)
        cols = unit.to(tl.int64) * GROUP + j % GROUP
        ht = tl.load(h_ptrs, mask=m_ok & j_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * stride_wd + offs_n[None, :] * stride_wo,
                     mask=j_ok[:, None] & n_ok, other=0.0)  # [BLOCK_K, BLOCK_N] = w[:, cols].T
        if DOT_UPCAST:
            ht = ht.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(ht, wt, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hj
    if HAS_RESIDUAL:
        # Fused residual: added in fp32 before the single rounding of the store.
        r = tl.load(r_ptr + mask_id * stride_rk + offs_m[:, None] * stride_rm
                    + offs_n[None, :] * stride_ro, mask=m_ok & n_ok, other=0.0)
        acc += r.to(tl.float32)
    y_ptrs = y_ptr + mask_id * stride_yk + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yo
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

    _gather_cols_gemm_kernel[grid](
        h, w, r, idx, counts, y,
        M, n_in, dout, group, bucket(M),
        h.stride(0), h.stride(1), h.stride(2),
        w.stride(0), w.stride(1),
        idx.stride(0),
        r.stride(0), r.stride(1), r.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        HAS_RESIDUAL=residual is not None, DOT_PRECISION=dot_precision(h.dtype),
        DOT_UPCAST=dot_upcast(h.dtype),
    )
    return finish(y, h.dtype)
