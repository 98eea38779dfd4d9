"""Gather-rows GEMM (optionally with bias, or fused SwiGLU) over K masks in one launch.

For mask ``k`` with ``c = counts[k]`` active units of ``group`` rows each, output column ``j``
(``j < c*group``) is weight row ``r(j) = idx[k, j // group] * group + j % group``:

    y[k, m, j] = sum_d x[k, m, d] * w[r(j), d]  (+ bias[r(j)])                      (GEMM)
    y[k, m, j] = silu(x[k, m] . w_gate[r(j)]) * (x[k, m] . w_up[r(j)])               (SwiGLU)
    y[k, m, j] = 0                                                    for j >= c*group

Shapes: x [K, M, Din], w/w_gate/w_up [Dout, Din], idx int32 [K, n_cap], counts int32 [K],
bias [Dout] -> y [K, M, n_cap*group]. Rows are expanded from ``idx`` in the kernel (never
materialised), so a head unit (group = head_dim) reads head_dim contiguous weight rows.
"""
import torch
import triton
import triton.language as tl

from ._common import (GEMM_CONFIGS, SWIGLU_CONFIGS, bucket, dot_precision, dot_upcast, finish,
                      gemm_tile, on_device, out_dtype)

_KEY = ["M_BUCKET", "DIN", "N_OUT", "GROUP"]


@triton.jit
def _gather_rows_kernel(
    x_ptr, w_ptr, w2_ptr, b_ptr, idx_ptr, cnt_ptr, y_ptr,
    M, DIN, N_OUT, GROUP, M_BUCKET,
    stride_xk, stride_xm, stride_xd,
    stride_wo, stride_wd,
    stride_ik,
    stride_yk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program computes a [BLOCK_M, BLOCK_N] tile of y[k] for mask k = program_id(1).

    ``N_OUT = n_cap * group`` is the (static) capacity width; the active width ``counts[k]*group``
    is read here from device memory, so tiles past it store zeros and return without touching w.
    ``w2_ptr`` (SWIGLU only) is w_up, with w_gate's strides. ``M_BUCKET`` is only an autotune key.
    """
    mask_id, pid_n, n_active, offs_m, offs_n = gemm_tile(cnt_ptr, M, N_OUT, GROUP, BLOCK_M,
                                                         BLOCK_N, GROUP_M)
    # Row offsets in int64: a mask's [M, width] slab may exceed 2**31 elements.
    m_rows = offs_m.to(tl.int64)[:, None]
    y_ptrs = y_ptr + mask_id * stride_yk + m_rows * stride_ym + offs_n[None, :] * stride_yn
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N_OUT)
    if pid_n * BLOCK_N >= n_active:
        # Whole tile beyond this mask's kept units: the compact output is zero there.
        tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=y_mask)
        return

    col_ok = offs_n < n_active
    # Unit expansion: column j -> weight row idx[j // GROUP] * GROUP + j % GROUP (int64: large w).
    unit = tl.load(idx_ptr + mask_id * stride_ik + offs_n // GROUP, mask=col_ok, other=0)
    rows = unit.to(tl.int64) * GROUP + offs_n % GROUP
    offs_d = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + mask_id * stride_xk + m_rows * stride_xm + offs_d[None, :] * stride_xd
    w_ptrs = w_ptr + rows[None, :] * stride_wo + offs_d[:, None] * stride_wd  # [BLOCK_K, BLOCK_N]
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        w2_ptrs = w2_ptr + rows[None, :] * stride_wo + offs_d[:, None] * stride_wd
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, DIN, BLOCK_K):
        d_ok = offs_d < DIN - d0
        xt = tl.load(x_ptrs, mask=m_ok & d_ok[None, :], other=0.0)
        # Inactive columns load zeros, so a partly active tile yields exact zeros past the count.
        wt = tl.load(w_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            w2t = tl.load(w2_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_UPCAST:
                w2t = w2t.to(tl.float32)
            acc2 = tl.dot(xt, w2t, acc2, input_precision=DOT_PRECISION)
            w2_ptrs += BLOCK_K * stride_wd
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        # silu(g) * u in fp32, one rounding at the store.
        acc = acc * tl.sigmoid(acc) * acc2
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# One kernel, two tunings: the SwiGLU variant holds two accumulators, and the largest GEMM tiles
# spill there (docs/gpu-static-checks.md), so it tunes over the tiles that fit.
_gather_rows_gemm_kernel = triton.autotune(configs=GEMM_CONFIGS, key=_KEY)(_gather_rows_kernel)
_gather_rows_swiglu_kernel = triton.autotune(configs=SWIGLU_CONFIGS, key=_KEY)(
    _gather_rows_kernel)


def _launch(x, w, w2, bias, idx, counts, group, swiglu):
    K, M, din = x.shape
    n_out = idx.shape[1] * group
    y = torch.empty((K, M, n_out), device=x.device, dtype=out_dtype(x.dtype))
    if y.numel() == 0:
        return finish(y, x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]), K)

    kernel = _gather_rows_swiglu_kernel if swiglu else _gather_rows_gemm_kernel
    with on_device(x):
        kernel[grid](
            x, w, w2 if w2 is not None else w, bias if bias is not None else w, idx, counts, y,
            M, din, n_out, group, bucket(M),
            x.stride(0), x.stride(1), x.stride(2),
            w.stride(0), w.stride(1),
            idx.stride(0),
            y.stride(0), y.stride(1), y.stride(2),
            HAS_BIAS=bias is not None, SWIGLU=swiglu, DOT_PRECISION=dot_precision(x.dtype),
            DOT_UPCAST=dot_upcast(x.dtype),
        )
    return finish(y, x.dtype)


def gather_rows_gemm(x, w, idx, counts, group=1, bias=None):
    """Launcher; signature of ``reference.gather_rows_gemm`` (inputs validated by ``ops``)."""
    return _launch(x, w, None, bias, idx, counts, group, False)


def gather_rows_swiglu(x, w_gate, w_up, idx, counts):
    """Launcher; signature of ``reference.gather_rows_swiglu`` (w_up must share w_gate's strides,
    which contiguity guarantees)."""
    return _launch(x, w_gate, w_up, None, idx, counts, 1, True)
