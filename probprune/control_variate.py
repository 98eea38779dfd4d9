"""A linear control variate for the mask-loss: f(m) = w . (m - s), fitted on past samples only.

The score-function identity holds for any function of the mask, so with g(L) the estimator of
dE[L]/ds built from the losses L,

    dE[L]/ds = w + E[g(L - f(m))]        (dE[f]/ds = w exactly, s held fixed inside f)

stays unbiased whatever w is, as long as w does not depend on this step's masks. What is left
for the sampled masks to explain is the residual L - f(m): the part of the loss a linear model
of the mask could not predict from the recent past.

w is a ridge regression of within-step loss differences on within-step mask differences over the
last ``history`` samples. Differences within a step share the calibration batch, so the batch's
own difficulty (much larger than any mask's effect) cancels. The fit is solved in its dual form,
an [H, H] system for H samples, because the number of units is larger than the history.
"""
from __future__ import annotations

from typing import Optional

import torch


class LinearControlVariate:
    """Ring buffer of (mask deviation, loss deviation) rows and the ridge fit over them. All
    state is on the device and no method reads a value back to the host."""

    def __init__(self, n_units: int, history: int, ridge: float, device,
                 state: Optional[dict] = None):
        if history < 2:
            raise ValueError(f"the control variate needs a history of at least 2 samples, "
                             f"got {history}")
        if ridge <= 0:
            raise ValueError(f"the control variate's ridge must be > 0, got {ridge}")
        self.ridge = ridge
        if state is None:
            state = {"rows": torch.zeros(history, n_units, dtype=torch.float32, device=device),
                     "targets": torch.zeros(history, dtype=torch.float64, device=device),
                     "written": torch.zeros((), dtype=torch.int64, device=device)}
        if state["rows"].shape != (history, n_units):
            raise ValueError(f"control-variate state holds {tuple(state['rows'].shape)} rows, "
                             f"expected ({history}, {n_units})")
        self.state = {k: v.to(device) for k, v in state.items()}

    def weights(self) -> torch.Tensor:
        """w [n] float64 from the rows written so far (0 before the first)."""
        D = self.state["rows"].double()
        gram = D @ D.T
        # Ridge in units of the mean squared row norm: the same strength for any mask size.
        alpha = self.ridge * gram.diagonal().mean() + 1e-12
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return D.T @ torch.linalg.solve(gram + alpha * eye, self.state["targets"])

    @staticmethod
    def deviations(losses: torch.Tensor, masks: torch.Tensor, finite: torch.Tensor):
        """Loss and mask deviations from this step's mean over the finite samples (0 where a
        loss is not finite): the rows the fit learns from."""
        n = finite.sum().clamp_min(1).double()
        L = torch.where(finite, losses.double(), 0.0)
        m = torch.where(finite[:, None], masks.double(), 0.0)
        dy = torch.where(finite, L - L.sum() / n, 0.0)
        dm = torch.where(finite[:, None], m - m.sum(0) / n, 0.0)
        return dy, dm

    def explained(self, w: torch.Tensor, losses, masks, finite) -> torch.Tensor:
        """Share of this step's loss-deviation energy that ``w`` (fitted before the step)
        predicts: 1 - |dy - dm w|^2 / |dy|^2, out of sample; NaN when the losses tie."""
        dy, dm = self.deviations(losses, masks, finite)
        total = dy.pow(2).sum()
        resid = (dy - dm @ w).pow(2).sum()
        return torch.where(total > 0, 1 - resid / total.clamp_min(1e-300), float("nan"))

    def add(self, losses: torch.Tensor, masks: torch.Tensor, finite: torch.Tensor,
            take: torch.Tensor) -> None:
        """Write this step's K rows over the oldest ones, where ``take`` (a 0-dim bool) holds."""
        dy, dm = self.deviations(losses, masks, finite)
        st, H = self.state, self.state["rows"].shape[0]
        slots = (st["written"] + torch.arange(dy.numel(), device=dy.device)) % H
        rows = st["rows"].index_copy(0, slots, dm.to(st["rows"].dtype))
        targets = st["targets"].index_copy(0, slots, dy)
        st["rows"] = torch.where(take, rows, st["rows"])
        st["targets"] = torch.where(take, targets, st["targets"])
        st["written"] = st["written"] + take.long() * dy.numel()
