"""Bernoulli keep-probabilities and their REINFORCE update.

For masks m_k ~ Bernoulli(s) and losses L(m_k), the score-function estimator of dE[L]/ds is

    g_u = 1/K sum_k (L(m_k) - b_k) (m_k,u - s_u) / (s_u (1 - s_u))

unbiased whenever the baseline b_k does not depend on m_k: the moving average of past mean
losses (the paper's) or the leave-one-out mean of the other K-1 samples. Two variance reducers
stay unbiased too: antithetic pairs (mask k and k + K/2 drawn from u and 1 - u, with the DisARM
estimator of Dong, Mnih & Tucker 2020, which needs no baseline) and a linear control variate
(:mod:`probprune.control_variate`). The step divides by
sqrt(s(1-s) + eps) instead of s(1-s) (DESIGN.md): the unbiased gradient times the positive
preconditioner sqrt(s(1-s)), which keeps steps bounded near 0 and 1.

The update never reads a value back to the host: every per-step quantity (baseline, advantage
scale, counters) is a device tensor and a step with too few finite losses is undone by
``torch.where``, so the search loop syncs once per step, for its progress bar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .control_variate import LinearControlVariate
from .settings.search import BASELINES, OPTIMIZERS, SearchSettings


def advantages(losses: torch.Tensor, finite: torch.Tensor, baseline: str,
               past_mean: torch.Tensor) -> torch.Tensor:
    """L_k - b_k [K] for the finite losses (0 elsewhere). ``past_mean``: the moving average of
    past mean losses, NaN before the first step (the mean of this step's losses is used then)."""
    n_ok = finite.sum().double()
    L = torch.where(finite, losses.double(), torch.zeros((), dtype=torch.float64,
                                                         device=losses.device))
    if baseline == "leave-one-out":
        if losses.numel() < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 samples per step (--k)")
        adv = L - (L.sum() - L) / (n_ok - 1)
    elif baseline == "moving-average":
        adv = L - torch.where(torch.isnan(past_mean), L.sum() / n_ok, past_mean)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    return torch.where(finite, adv, torch.zeros_like(adv))


def score_gradient(adv: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                   eps: Optional[float] = None, n_samples=None) -> torch.Tensor:
    """1/n sum_k adv_k (m_k - s) / denom, denom = s(1-s) (eps None: the unbiased gradient) or
    sqrt(s(1-s) + eps) (the preconditioned step direction). Zero where s is 0 or 1. ``n_samples``
    (default K) counts the samples whose ``adv`` is not masked out to 0."""
    s = probs.double()
    diff = masks.double() - s
    prod = adv.double()[:, None] * diff
    num = prod.mean(0) if n_samples is None else prod.sum(0) / n_samples
    return per_variance(num, s, eps)


def per_variance(num: torch.Tensor, s: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """num / (s(1-s)) (eps None: the unbiased gradient; 0 where s is 0 or 1) or
    num / sqrt(s(1-s) + eps) (the preconditioned step direction)."""
    var = s * (1 - s)
    if eps is None:
        return torch.where(var > 0, num / var.clamp_min(1e-300), torch.zeros_like(num))
    return num / torch.sqrt(var + eps)


def antithetic_gradient(losses: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                        finite: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """DisARM over K/2 antithetic pairs: mask k from u, mask k + K/2 from 1 - u. Per pair,

        1/2 (L - L~) (m_u - m~_u) max(s_u, 1 - s_u)

    is an unbiased estimate of dE[L]/d logit(s_u); the pair's own difference is its baseline and
    a unit scores only where the two masks disagree. Divided by s(1-s) (eps None): dE[L]/ds; by
    sqrt(s(1-s) + eps): the preconditioned step, as :func:`score_gradient`. Pairs with a
    non-finite loss are left out."""
    h = losses.numel() // 2
    ok = finite[:h] & finite[h:2 * h]
    dl = torch.where(ok, losses[:h].double() - losses[h:2 * h].double(), 0.0)
    diff = masks[:h].double() - masks[h:2 * h].double()
    s = probs.double()
    num = (0.5 * dl[:, None] * diff).sum(0) / ok.sum().clamp_min(1) * torch.maximum(s, 1 - s)
    return per_variance(num, s, eps)


def cosine_lr(step: int, total: int, lr: float, min_ratio: float = 0.0) -> float:
    if total <= 1:
        return lr
    t = min(step, total) / total
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _scalar(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, device=device)


@dataclass
class PolicyState:
    """Everything the update needs across steps (saved in checkpoints); all but ``step`` are
    device tensors."""
    probs: torch.Tensor
    step: int = 0
    past_means: Optional[torch.Tensor] = None  # [ma_window] float64, oldest first, NaN = empty
    nan_samples: Optional[torch.Tensor] = None    # int64 scalar
    skipped_steps: Optional[torch.Tensor] = None  # int64 scalar
    adv_scale: Optional[torch.Tensor] = None      # running RMS of the advantages, NaN = none yet
    adam_m: Optional[torch.Tensor] = None         # Adam's moment estimates (optimizer "adam")
    adam_v: Optional[torch.Tensor] = None
    adam_steps: Optional[torch.Tensor] = None     # int64 scalar: steps Adam has taken
    control_variate: Optional[dict] = None        # LinearControlVariate.state, when used

    def __post_init__(self):
        dev = self.probs.device
        if self.nan_samples is None:
            self.nan_samples = torch.zeros((), dtype=torch.int64, device=dev)
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=dev)
        if self.adv_scale is None:
            self.adv_scale = _scalar(float("nan"), dev)
        if self.adam_m is None:
            self.adam_m = torch.zeros_like(self.probs, dtype=torch.float64)
            self.adam_v = torch.zeros_like(self.probs, dtype=torch.float64)
        if self.adam_steps is None:
            self.adam_steps = torch.zeros((), dtype=torch.int64, device=dev)

    def state_dict(self):
        return {"probs": self.probs.detach().cpu(), "step": self.step,
                "past_means": None if self.past_means is None else self.past_means.cpu(),
                "nan_samples": int(self.nan_samples), "skipped_steps": int(self.skipped_steps),
                "adv_scale": float(self.adv_scale), "adam_m": self.adam_m.cpu(),
                "adam_v": self.adam_v.cpu(), "adam_steps": int(self.adam_steps),
                "control_variate": None if self.control_variate is None else
                {k: v.cpu() for k, v in self.control_variate.items()}}

    @classmethod
    def from_state_dict(cls, d, device):
        past = d["past_means"]
        return cls(d["probs"].to(device), d["step"],
                   None if past is None else past.to(device),
                   torch.tensor(d["nan_samples"], device=device),
                   torch.tensor(d["skipped_steps"], device=device),
                   _scalar(d["adv_scale"], device),
                   *(None if d.get(k) is None else d[k].to(device) for k in ("adam_m", "adam_v")),
                   torch.tensor(d.get("adam_steps", 0), device=device),
                   None if d.get("control_variate") is None else
                   {k: v.to(device) for k, v in d["control_variate"].items()})


@dataclass(kw_only=True)
class PolicyConfig(SearchSettings):
    """The search's settings (their defaults are the command line's) and the update's own
    constants, which no flag sets; ``PolicyConfig.taken_from(cfg)`` reads a run's."""
    eps: float = 1e-2
    normalize: bool = True  # advantages in units of their running RMS: lr independent of loss scale
    betas: tuple = (0.5, 0.999)  # of --optimizer adam (the paper's code)
    adam_eps: float = 1e-8


class Policy:
    def __init__(self, config: PolicyConfig, state: PolicyState):
        if config.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {config.baseline!r}; choose one of {BASELINES}")
        if config.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")
        self.config, self.state = config, state
        self.control_variate = None
        if config.control_variate:
            self.control_variate = LinearControlVariate(
                state.probs.numel(), config.cv_history, config.cv_ridge, state.probs.device,
                state.control_variate)
            state.control_variate = self.control_variate.state
        if state.past_means is None:
            state.past_means = torch.full((config.ma_window,), float("nan"), dtype=torch.float64,
                                          device=state.probs.device)

    @property
    def probs(self) -> torch.Tensor:
        return self.state.probs

    def baseline_value(self) -> torch.Tensor:
        """Mean of the past mean losses in the window (NaN before the first step)."""
        return torch.nanmean(self.state.past_means)

    def update(self, losses: torch.Tensor, masks: torch.Tensor, project) -> dict:
        """One REINFORCE step from K losses of K masks; ``project`` maps probabilities onto the
        budget. Samples with a non-finite loss are dropped and counted; a step left with too few
        samples (2 for leave-one-out, 1 otherwise) changes nothing but the counters.

        With ``antithetic``, masks k and k + K/2 must come from u and 1 - u (K even) and a step
        needs one pair of finite losses.

        Returns 0-dim device tensors: ``lr`` (a float), ``baseline`` (NaN when none yet),
        ``valid`` (samples used), ``mean_loss`` (NaN on a skipped step) and ``cv_explained``
        (the control variate's out-of-sample share of the loss deviations; NaN without one)."""
        cfg, st = self.config, self.state
        if cfg.antithetic and losses.numel() % 2:
            raise ValueError(f"antithetic pairs need an even number of masks, got {losses.numel()}")
        finite = torch.isfinite(losses)
        n_ok = finite.sum()
        if cfg.antithetic:
            h = losses.numel() // 2
            ok = (finite[:h] & finite[h:2 * h]).any()
        else:
            ok = n_ok >= (2 if cfg.baseline == "leave-one-out" else 1)
        lr = cosine_lr(st.step, cfg.steps, cfg.lr, cfg.min_lr_ratio)
        baseline = self.baseline_value()
        n = n_ok.double()
        mean_loss = torch.where(finite, losses.double(), 0.0).sum() / n
        scale = torch.ones((), dtype=torch.float64, device=losses.device)
        if cfg.normalize:
            # In units of the running RMS advantage: one lr then fits any model and loss scale,
            # while a step whose masks differ a lot still moves more than one whose masks tie
            # (dividing by this step's own spread would make every K=2 step count the same).
            # The scale uses past steps only, so it does not correlate with this step's masks;
            # it is taken on the plain advantages whatever the estimator, so that one lr means
            # the same step size for each.
            adv = advantages(losses, finite, cfg.baseline, baseline)
            rms = (adv.pow(2).sum() / n).sqrt()
            past = torch.where(torch.isnan(st.adv_scale), rms, st.adv_scale)
            scale = torch.where(past > 0, past, scale)
            new_scale = torch.where(torch.isnan(st.adv_scale), rms, 0.9 * st.adv_scale + 0.1 * rms)
            st.adv_scale = torch.where(ok, new_scale, st.adv_scale)
        target, explained = losses.double(), torch.tensor(float("nan"), device=losses.device)
        grad = torch.zeros_like(st.probs, dtype=torch.float64)
        if self.control_variate is not None:
            cv = self.control_variate
            w = cv.weights()  # from past steps only: the estimate stays unbiased
            explained = cv.explained(w, losses, masks, finite)
            target = target - (masks.double() - st.probs.double()) @ w
            s = st.probs.double()
            grad = per_variance(w * s * (1 - s), s, cfg.eps)  # dE[w.(m - s)]/ds = w, preconditioned
            cv.add(losses, masks, finite, ok)
        if cfg.antithetic:
            grad = grad + antithetic_gradient(target, masks, st.probs, finite, cfg.eps)
        else:
            grad = grad + score_gradient(advantages(target, finite, cfg.baseline, baseline),
                                         masks, st.probs, cfg.eps, n_samples=n)
        grad = grad / scale
        if cfg.optimizer == "adam":
            grad = self._adam(grad, ok)
        stepped = project((st.probs.double() - lr * grad).clamp(0, 1)).to(st.probs.dtype)
        st.probs = torch.where(ok, stepped, st.probs)
        st.past_means = torch.where(ok, torch.cat([st.past_means[1:], mean_loss[None]]),
                                    st.past_means)
        st.nan_samples = st.nan_samples + (losses.numel() - n_ok)
        st.skipped_steps = st.skipped_steps + (~ok).long()
        st.step += 1
        return {"lr": lr, "baseline": baseline, "valid": n_ok,
                "mean_loss": torch.where(ok, mean_loss, float("nan")),
                "cv_explained": explained}

    def _adam(self, grad: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Adam's bias-corrected direction for ``grad``; the moments advance on taken steps only."""
        st, (b1, b2) = self.state, self.config.betas
        m = b1 * st.adam_m + (1 - b1) * grad
        v = b2 * st.adam_v + (1 - b2) * grad * grad
        t = (st.adam_steps + 1).double()
        direction = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.config.adam_eps)
        st.adam_m = torch.where(ok, m, st.adam_m)
        st.adam_v = torch.where(ok, v, st.adam_v)
        st.adam_steps = st.adam_steps + ok.long()
        return direction
