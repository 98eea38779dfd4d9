"""Bernoulli keep-probabilities and their REINFORCE update.

For masks m_k ~ Bernoulli(s) and losses L(m_k), the score-function estimator of dE[L]/ds is

    g_u = 1/K sum_k (L(m_k) - b_k) (m_k,u - s_u) / (s_u (1 - s_u))

unbiased whenever the baseline b_k does not depend on m_k: the moving average of past mean
losses (the paper's) or the leave-one-out mean of the other K-1 samples. The step divides by
sqrt(s(1-s) + eps) instead of s(1-s) (DESIGN.md): the unbiased gradient times the positive
preconditioner sqrt(s(1-s)), which keeps steps bounded near 0 and 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

BASELINES = ("moving-average", "leave-one-out")


def advantages(losses: torch.Tensor, baseline: str, past_mean: Optional[float]) -> torch.Tensor:
    """L_k - b_k for finite losses [K]."""
    if baseline == "leave-one-out":
        K = losses.numel()
        if K < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 samples per step (--k)")
        return losses - (losses.sum() - losses) / (K - 1)
    if baseline == "moving-average":
        b = losses.mean() if past_mean is None else torch.as_tensor(past_mean, dtype=losses.dtype)
        return losses - b
    raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")


def score_gradient(adv: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor,
                   eps: Optional[float] = None) -> torch.Tensor:
    """1/K sum_k adv_k (m_k - s) / denom, denom = s(1-s) (eps None: the unbiased gradient) or
    sqrt(s(1-s) + eps) (the preconditioned step direction). Zero where s is 0 or 1."""
    s = probs.double()
    diff = masks.double() - s
    num = (adv.double()[:, None] * diff).mean(0)
    var = s * (1 - s)
    if eps is None:
        return torch.where(var > 0, num / var.clamp_min(1e-300), torch.zeros_like(num))
    return num / torch.sqrt(var + eps)


def cosine_lr(step: int, total: int, lr: float, min_ratio: float = 0.0) -> float:
    if total <= 1:
        return lr
    t = min(step, total) / total
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class PolicyState:
    """Everything the update needs across steps (saved in checkpoints)."""
    probs: torch.Tensor
    step: int = 0
    past_means: List[float] = field(default_factory=list)
    nan_samples: int = 0
    skipped_steps: int = 0
    adv_scale: Optional[float] = None  # running RMS of the advantages

    def state_dict(self):
        return {"probs": self.probs.detach().cpu(), "step": self.step,
                "past_means": list(self.past_means), "nan_samples": self.nan_samples,
                "skipped_steps": self.skipped_steps, "adv_scale": self.adv_scale}

    @classmethod
    def from_state_dict(cls, d, device):
        return cls(d["probs"].to(device), d["step"], list(d["past_means"]), d["nan_samples"],
                   d["skipped_steps"], d["adv_scale"])


@dataclass
class PolicyConfig:
    lr: float = 0.01
    steps: int = 200
    baseline: str = "leave-one-out"
    ma_window: int = 5
    min_lr_ratio: float = 0.0
    eps: float = 1e-2
    normalize: bool = True  # advantages in units of their running RMS: lr independent of loss scale


class Policy:
    def __init__(self, config: PolicyConfig, state: PolicyState):
        if config.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {config.baseline!r}; choose one of {BASELINES}")
        self.config, self.state = config, state

    @property
    def probs(self) -> torch.Tensor:
        return self.state.probs

    def baseline_value(self) -> Optional[float]:
        past = self.state.past_means[-self.config.ma_window:]
        return sum(past) / len(past) if past else None

    def update(self, losses: torch.Tensor, masks: torch.Tensor, project) -> dict:
        """One REINFORCE step from K losses of K masks; ``project`` maps probabilities onto the
        budget. Samples with a non-finite loss are dropped and counted."""
        cfg, st = self.config, self.state
        finite = torch.isfinite(losses)
        n_ok = int(finite.sum())
        st.nan_samples += losses.numel() - n_ok
        lr = cosine_lr(st.step, cfg.steps, cfg.lr, cfg.min_lr_ratio)
        stats = {"lr": lr, "baseline": self.baseline_value(), "valid": n_ok}
        need = 2 if cfg.baseline == "leave-one-out" else 1
        if n_ok < need:
            st.skipped_steps += 1
            st.step += 1
            return stats
        L, m = losses[finite].double(), masks[finite]
        adv = advantages(L, cfg.baseline, self.baseline_value())
        if cfg.normalize:
            # In units of the running RMS advantage: one lr then fits any model and loss scale,
            # while a step whose masks differ a lot still moves more than one whose masks tie
            # (dividing by this step's own spread would make every K=2 step count the same).
            # The scale uses past steps only, so it does not correlate with this step's masks.
            rms = float(adv.pow(2).mean().sqrt())
            scale = st.adv_scale if st.adv_scale is not None else rms
            if scale > 0:
                adv = adv / scale
            st.adv_scale = rms if st.adv_scale is None else 0.9 * st.adv_scale + 0.1 * rms
        grad = score_gradient(adv, m, st.probs, cfg.eps)
        st.probs = project((st.probs.double() - lr * grad).clamp(0, 1)).to(st.probs.dtype)
        st.past_means.append(float(L.mean()))
        st.past_means = st.past_means[-cfg.ma_window:]
        st.step += 1
        stats["mean_loss"] = float(L.mean())
        return stats
