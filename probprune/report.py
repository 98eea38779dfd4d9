"""PNG plots of a pruning run: kept fraction per layer, score histogram, loss curve."""
from __future__ import annotations

import os
from typing import List

import torch

from .units import UnitLayout


def write_plots(out: str, layout: UnitLayout, mask: torch.Tensor, probs: torch.Tensor,
                history: List[dict]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    m = layout.split(mask.bool().cpu().float())
    layers = torch.arange(layout.n_layers)
    heads = (m.heads.mean(-1) * m.layers).numpy()
    chans = (m.channels.mean(-1) * m.layers).numpy()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(layers.numpy() - 0.2, heads, width=0.4, label="KV-head groups")
    ax.bar(layers.numpy() + 0.2, chans, width=0.4, label="MLP channels")
    ax.set(xlabel="layer", ylabel="kept fraction", ylim=(0, 1.05), title="Kept units per layer")
    ax.legend()
    paths.append(_save(fig, out, "kept_per_layer.png"))

    p = layout.split(probs.detach().cpu().float())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([p.heads.flatten().numpy(), p.channels.flatten().numpy()], bins=40, range=(0, 1),
            label=["KV-head groups", "MLP channels"], density=True)
    ax.set(xlabel="keep probability", ylabel="density", title="Final keep probabilities")
    ax.legend()
    paths.append(_save(fig, out, "score_histogram.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [h["step"] for h in history if "mean_loss" in h]
    if steps:
        ax.plot(steps, [h["mean_loss"] for h in history if "mean_loss" in h], lw=0.8,
                label="mean sampled loss")
    base = [(h["step"], h["baseline"]) for h in history if h.get("baseline") is not None]
    if base:
        ax.plot(*zip(*base), lw=0.8, label="moving average of mean loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="hard mask, held-out loss")
    ax.set(xlabel="step", ylabel="loss", title="Search")
    ax.legend()
    paths.append(_save(fig, out, "loss_curve.png"))
    return paths


def _save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
