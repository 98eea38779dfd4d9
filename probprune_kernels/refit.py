"""Each mask's output as if the reading projection were refit to that mask's kept inputs.

A masked layer's input-side GEMM (o_proj reading the kept heads, down_proj reading the kept
channels) computes ``x_S W_S^T`` for each mask's kept input columns S. With a
:class:`LeastSquaresRefit` attached (``layer.refit = LeastSquaresRefit(...)``) it computes
instead ``x_S V_S^T``, where V_S is the ridge least-squares refit of W to the columns S on
calibration inputs with second moment C (what :func:`probprune.compensate.refit` solves in the
parallel mode, without a bias):

    V_S^T = A_S^-1 (C_S: W^T + lambda_S W_S^T),   A_S = C_SS + lambda_S I,
    lambda_S = damping * mean(diag(C_SS)).

The refit weight is never formed: ``x_S V_S^T = z (W C)_S^T + lambda_S z W_S^T`` with
``z = x_S A_S^-1``, so the two GEMMs are the same gather-cols kernels the bare layer runs, on the
shared weights ``W C`` (precomputed once) and ``W``. What each mask adds is one Cholesky
factorisation of A_S and two triangular solves on its inputs: ``O(|S|^3 + M |S|^2)`` per mask,
batched over the K masks. A search scored this way ranks masks by what they give after
compensation rather than as bare slices.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .layers import _unit_columns


class LeastSquaresRefit:
    """The refit of one input-side projection ``weight`` [out, in] on inputs whose second
    moment is ``gram`` [in, in] (any positive scale: the solve is scale-free); ``group``: input
    columns per unit (``head_dim`` for o_proj, 1 for down_proj)."""

    def __init__(self, weight: Tensor, gram: Tensor, damping: float, group: int = 1):
        if not damping > 0:  # also catches NaN
            raise ValueError(f"the refit needs a damping > 0 (a Cholesky solve per mask), got "
                             f"{damping!r}")
        if gram.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"gram must be [{weight.shape[1]}, {weight.shape[1]}] (the weight's "
                             f"inputs), got {tuple(gram.shape)}")
        if group < 1 or weight.shape[1] % group:
            raise ValueError(f"the weight's {weight.shape[1]} inputs are not units of {group}")
        self.gram = gram.to(device=weight.device, dtype=torch.float32)
        self.damping, self.group = float(damping), group
        # W C, in the weight's layout (column-major down_proj: see MaskedSwiGLUMLP)
        if weight.t().is_contiguous() and not weight.is_contiguous():
            self.weight_gram = (self.gram.mT @ weight.float().mT).to(weight.dtype).mT
        else:
            self.weight_gram = (weight.float() @ self.gram).to(weight.dtype)

    def solve(self, x: Tensor, idx: Tensor, counts: Tensor, width: int):
        """(z [K, M, width], lambda [K]): ``z = x_S A_S^-1`` per mask over the first ``width``
        compact columns (the widest mask's; narrower masks are zero beyond theirs)."""
        n_valid = counts.long() * self.group
        cols = _unit_columns(idx, self.group)[:, :width]
        valid = torch.arange(width, device=x.device) < n_valid[:, None]       # [K, width]
        A = self.gram[cols[:, :, None], cols[:, None, :]]
        A = torch.where(valid[:, :, None] & valid[:, None, :], A, 0.0)
        lam = self.damping * A.diagonal(dim1=1, dim2=2).sum(1) / n_valid.clamp_min(1)
        # Identity on the padding: its inputs are zero, so z is zero there too.
        A.diagonal(dim1=1, dim2=2).add_(torch.where(valid, lam[:, None], 1.0))
        z = _solve_right(x[..., :width].float(), A)
        return z.to(x.dtype), lam

    def output(self, x: Tensor, weight: Tensor, idx: Tensor, counts: Tensor,
               residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
        """x [K, M, cap*group] compact inputs (zero beyond counts) -> [K, M, out] (+ residual):
        each mask's refit output, as ``ops.gather_cols_gemm`` gives the bare one."""
        # One sync: the solve's size, and whether there is anything to solve.
        narrowest, width = (torch.stack([counts.min(), counts.max()]).long() * self.group).tolist()
        if narrowest == weight.shape[1]:  # every mask keeps every input: the refit is W itself
            return ops.gather_cols_gemm(x, weight, idx, counts, self.group, residual,
                                        backend=backend, validate=False)
        if width == 0:  # every mask drops all of this layer's inputs
            K, M = x.shape[:2]
            out = x.new_zeros(K, M, weight.shape[0])
            return out if residual is None else out + residual
        z, lam = self.solve(x, idx, counts, width)
        idx = idx[:, : width // self.group].contiguous()
        y = ops.gather_cols_gemm(z, self.weight_gram, idx, counts, self.group, residual,
                                 backend=backend, validate=False)
        return ops.gather_cols_gemm(z * lam.to(z.dtype)[:, None, None], weight, idx, counts,
                                    self.group, y, backend=backend, validate=False)


def _solve_right(x: Tensor, A: Tensor) -> Tensor:
    """x A^-1 for x [K, M, n] and symmetric positive definite A [K, n, n], by Cholesky; in
    float64 when a float32 factorisation fails (a nearly singular A)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        L = torch.linalg.cholesky(A.double())
        x = x.double()
    # z A = x with A = L L^T: y L^T = x, then z L = y.
    y = torch.linalg.solve_triangular(L.mT, x.to(L.dtype), upper=True, left=False)
    # The kernels read row-major inputs; the solver may hand back a transposed layout.
    return torch.linalg.solve_triangular(L, y, upper=False, left=False).float().contiguous()
