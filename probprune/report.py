"""What a run reports: ``report.json`` (settings, parameters, perplexities, search statistics,
time and memory) and PNG plots (kept fraction per layer, score histogram, loss curve)."""
from __future__ import annotations

import json
import os
import resource
import statistics
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import torch

import probprune_kernels as pk

from .files import atomic_write_text
from .units import UnitSpace


def peak_memory_mib(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def layer_sizes(units: UnitSpace, mask: torch.Tensor) -> List[dict]:
    """Per-layer kept KV groups, query heads and channels of a hard model-unit mask."""
    m = units.split(mask.bool().cpu())
    return [{"layer": l, "kept": bool(m.layers[l]), "kv_heads": int(units.kv_kept(m.heads[l]).sum()),
             "q_heads": int(units.query_kept(m.heads[l]).sum()),
             "channels": int(m.mlp[l].sum())} for l in range(units.n_layers)]


def search_summary(history: List[dict], times: List[float]) -> dict:
    """Wall time of the steps, and the control variate's median out-of-sample share of the loss
    deviations (None without one): how much of the sampled losses' spread it predicted. The
    median, because a step whose K losses nearly tie makes that share's ratio explode."""
    explained = [h["cv_explained"] for h in history if "cv_explained" in h]
    return {"steps": len(history), "wall_s": sum(times),
            "cv_explained": statistics.median(explained) if explained else None}


@dataclass
class Measurements:
    """What a run measures after its search, for the report."""
    dense_params: int
    # pruned_bare, pruned; with compensation init_compensated, and search_bare and
    # search_compensated when the search's best mask lost the selection
    perplexity: Dict[str, dict]
    compensation: Optional[dict] = None       # the export's Compensation.summary()
    compensation_init: Optional[dict] = None  # the init mask's, without its per-layer records
    pruned_params: int = 0                    # of the export, reloaded
    peak_memory_mib: float = 0.0              # after its evaluation, before its speed
    zero_shot: Optional[dict] = None          # with --eval-tasks
    # with --speed-tokens: {"dense": Speed.as_dict(), "pruned": ..., "check": SpeedCheck's}
    speed: Optional[dict] = None


@dataclass
class Report:
    """``report.json``: one entry per field, in this order; an optional entry that is None is
    left out of the file."""
    settings: dict
    eval_data: str
    params: dict
    perplexity: Dict[str, dict]
    val_loss: dict
    search_units: dict
    layers: List[dict]
    median_step_s: Optional[float]
    search: dict
    steps_timed: int
    peak_memory_mib: float
    peak_memory_kind: str
    nan_samples: int
    skipped_steps: int
    model_load_s: float
    backend: str
    backends_available: list
    compensation: Optional[dict] = None
    compensation_init: Optional[dict] = None
    zero_shot: Optional[dict] = None
    selection: Optional[List[dict]] = None
    memory_plan_mib: Optional[dict] = None
    speed: Optional[dict] = None

    OPTIONAL = ("compensation", "compensation_init", "zero_shot", "selection",
                "memory_plan_mib", "speed")

    def as_dict(self) -> dict:
        entries = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in entries.items() if v is not None or k not in self.OPTIONAL}


def build_report(cfg, *, measured: Measurements, units: UnitSpace, space: UnitSpace, budget,
                 mask: torch.Tensor, ckpt, policy_state, selection: list, memory=None,
                 eval_data: str, load_s: float) -> Report:
    """The report of a finished run. ``ckpt``: its :class:`probprune.checkpoint.RunCheckpoint`
    (the dense and init records, the search state); ``selection``: the
    :class:`probprune.selection.CandidateScore` of each candidate that competed; ``memory``: the
    :class:`probprune.memory.MemoryPlan` made before loading, if any."""
    st = ckpt.search
    times = st.step_times
    device = torch.device(cfg.device)
    return Report(
        settings=cfg.as_dict(),
        eval_data=eval_data,
        params={"total": measured.dense_params,
                "prunable": units.prunable_params,
                "kept_prunable": float(units.kept_params(mask)),
                "target_prunable": budget.total_target,
                "pruned_model_total": measured.pruned_params},
        perplexity={"dense": ckpt.dense, "init": ckpt.init, **measured.perplexity},
        val_loss={"init": st.init_val_loss, "best": st.best_val_loss,
                  "best_step": st.best_step,
                  "history": [{"step": h["step"], "val_loss": h["val_loss"]}
                              for h in st.history if "val_loss" in h]},
        search_units={"heads": space.n_heads, "channel_blocks": space.n_mlp,
                      "channel_block": space.channel_block,
                      "layers": space.n_layers if space.include_layers else 0},
        layers=layer_sizes(units, mask),
        median_step_s=statistics.median(times) if times else None,
        search=search_summary(st.history, times),
        steps_timed=len(times),
        peak_memory_mib=measured.peak_memory_mib,
        peak_memory_kind="cuda max allocated" if device.type == "cuda" else "process peak RSS",
        nan_samples=int(policy_state.nan_samples),
        skipped_steps=int(policy_state.skipped_steps),
        model_load_s=load_s,
        backend=cfg.backend or "auto",
        backends_available=pk.backends(),
        compensation=measured.compensation,
        compensation_init=measured.compensation_init,
        zero_shot=measured.zero_shot,
        selection=[asdict(s) for s in selection] or None,
        # planned before loading, next to the measured peak_memory_mib
        memory_plan_mib=None if memory is None else {
            "peak": memory.peak / 2**20, **{k: v / 2**20 for k, v in memory.terms.items()}},
        speed=measured.speed,
    )


def write_report(out: str, report: Report) -> str:
    return atomic_write_text(os.path.join(out, "report.json"),
                             json.dumps(report.as_dict(), indent=1))


def write_plots(out: str, units: UnitSpace, mask: torch.Tensor, probs: torch.Tensor,
                history: List[dict]) -> List[str]:
    """Plots of a hard model-unit mask and the final model-unit probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    m = units.split(mask.bool().cpu().float())
    layers = torch.arange(units.n_layers)
    heads = (m.heads.mean(-1) * m.layers).numpy()
    chans = (m.mlp.mean(-1) * m.layers).numpy()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(layers.numpy() - 0.2, heads, width=0.4, label="KV-head groups")
    ax.bar(layers.numpy() + 0.2, chans, width=0.4, label="MLP channels")
    ax.set(xlabel="layer", ylabel="kept fraction", ylim=(0, 1.05), title="Kept units per layer")
    ax.legend()
    paths.append(_save(fig, out, "kept_per_layer.png"))

    p = units.split(probs.detach().cpu().float())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([p.heads.flatten().numpy(), p.mlp.flatten().numpy()], bins=40, range=(0, 1),
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
