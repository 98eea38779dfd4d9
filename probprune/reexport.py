"""Re-export of a prune run at another budget, from its saved scores, without a new search.

A run's ``scores.safetensors`` holds its final keep-probabilities per model unit, and its
``masks.safetensors`` the mask it exported. Two ways to share a new budget:

* ``scaled`` (the default): every layer's attention and MLP keep their share of the run's
  exported mask, all scaled by one factor to the new budget (capped at full size; protected
  layers stay whole, dropped layers dropped); inside each, the best-scored units; what the
  per-group cuts leave goes to the best-scored units that fit.
* ``global``: the run's own budget rebuilt at the new sparsity, the probabilities projected onto
  it and cut to the hard mask the run itself would take. The probabilities are sharp sigmoids
  around the run's threshold, so far from it they compare saturated tails across layers: on
  SmolLM2-135M, 0.5 from the scores of a 0.3 run emptied the MLPs of the last four layers
  (perplexity 447,993 on 8 windows, against 5,453 scaled; both bare, from a 10-step
  search).

The mask is then optionally compensated as ``prune`` does, and the smaller model exported. The
run's exported mask is the best one its search *scored* on held-out windows, so at the run's own
sparsity a re-export can differ from it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import fields

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import __version__
from .budget import Budget, BudgetError
from .config import ExportConfig, PruneConfig
from .preflight import check
from .data import eval_text, tokenize_joined
from .evaluate import perplexity
from .export import export_pruned
from .families import units_of
from .forward import MaskedCausalLM
from .importance import load_probs
from .model_card import write_model_card
from .models import MANIFEST, load_model, load_pruned, resolve_model_path
from .pipeline import Loaded, _ppl_kw, calibration, save_tensors
from .selection import compensate_mask
from .settings import CompensationSettings
from .units import UnitSpace

log = logging.getLogger(__name__)

SCORES = "scores.safetensors"
MASKS = "masks.safetensors"


class ScoresMismatch(ValueError):
    """A scores file that belongs to another model or unit layout than the run's."""


def run_config(cfg: ExportConfig) -> PruneConfig:
    """The run's settings with the re-export's budget, compensation, device and output."""
    with open(os.path.join(cfg.run, MANIFEST), encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    known = {f.name for f in fields(PruneConfig)}
    run = PruneConfig(**{k: v for k, v in settings.items() if k in known})
    # A per-type run's own attention / MLP ratios would override the new sparsity: both take it.
    # A uniform run's attention ratio is its shape's share, kept at any sparsity.
    compensation = {f.name: getattr(cfg, f.name) for f in fields(CompensationSettings)}
    attn = run.attn_sparsity if run.shape == "uniform" else None
    return dataclasses.replace(
        run, sparsity=cfg.sparsity, attn_sparsity=attn, mlp_sparsity=None, out=cfg.out,
        **compensation, eval_batch_size=cfg.eval_batch_size, device=cfg.device,
        progress=cfg.progress, resume=False, dry_run=False)


def read_scores(path: str, run: PruneConfig, units: UnitSpace) -> torch.Tensor:
    """The run's final model-unit probabilities, after checking they are this model's: the
    model the file records (runs since it does) and the unit count of the run's layout."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "model" in meta and meta["model"] != run.model:
        raise ScoresMismatch(f"{path!r} holds the scores of a run of model {meta['model']!r}, "
                             f"but the run's settings name model {run.model!r}")
    layers = "with" if units.include_layers else "without"
    if "n_units" in meta and int(meta["n_units"]) != units.n_units:
        raise ScoresMismatch(f"{path!r} holds {meta['n_units']} unit scores; model "
                             f"{run.model!r} {layers} layer units has {units.n_units}")
    try:
        return load_probs(path, units.n_units)
    except ValueError as e:  # the shape check of an --init scores file, in this context
        raise ScoresMismatch(f"{e} ({run.model!r} {layers} layer units): scores of another "
                             f"model or unit layout") from e


def budget_for(run: PruneConfig, units: UnitSpace) -> Budget:
    block = min(run.channel_block, units.shape.intermediate)  # as the run clamped it
    return Budget.build(UnitSpace(units.shape, run.prune_layers, block,
                                  attn_units=run.attn_units), run.sparsity,
                        run.budget, run.scope, run.attn_sparsity, run.mlp_sparsity,
                        run.protect_layers, run.shape)


def scaled_budget(run: PruneConfig, units: UnitSpace, run_mask: torch.Tensor) -> Budget:
    """A budget per layer and unit type (heads, MLP) that keeps the run's allocation: each
    group's kept parameters are those of the run's exported mask times one factor, capped at the
    group's size (protected layers whole, dropped layers empty), the factor chosen so that the
    groups together keep the new budget's parameters."""
    shape = units.shape
    block = min(run.channel_block, shape.intermediate)
    space = UnitSpace(shape, False, block)
    budget = Budget.build(space, run.sparsity, "per-type", "layer")
    m = units.split(run_mask.bool().cpu())
    layer_kept = m.layers.bool()
    kept = {"heads": m.heads.sum(-1) * shape.head_cost * layer_kept,
            "mlp": m.mlp.sum(-1) * shape.channel_cost * layer_kept}
    # Budget.build names its groups "<type> layer <l>"
    kind = [name.split()[0] for name in budget.names]
    layer = [int(name.split()[-1]) for name in budget.names]
    want = torch.tensor([float(kept[t][l]) for t, l in zip(kind, layer)], dtype=torch.float64)
    full = budget.kept_by_group(torch.ones(space.n_units, dtype=torch.float64))
    protected = torch.tensor([l in run.protect_layers for l in layer])
    cap = torch.where(layer_kept[layer], full, torch.zeros_like(full))
    low = torch.where(protected, cap, torch.zeros_like(cap))
    total = (1 - run.sparsity) * units.prunable_params
    if units.include_layers:  # kept layers pay their norms first
        total -= float(layer_kept.sum()) * shape.layer_fixed_cost
    if float(low.sum()) > total:
        raise BudgetError(f"sparsity {run.sparsity}: the protected layers alone keep "
                          f"{float(low.sum()):,.0f} parameters, more than the "
                          f"{total:,.0f} allowed")
    lo_f, hi_f = 0.0, 1.0
    while float(torch.minimum(torch.maximum(hi_f * want, low), cap).sum()) < total and hi_f < 1e6:
        hi_f *= 2
    for _ in range(60):
        f = 0.5 * (lo_f + hi_f)
        if float(torch.minimum(torch.maximum(f * want, low), cap).sum()) > total:
            hi_f = f
        else:
            lo_f = f
    targets = torch.minimum(torch.maximum(lo_f * want, low), cap)
    unit_lo = Budget.build(space, run.sparsity, protect_layers=run.protect_layers).lo
    return dataclasses.replace(budget, targets=targets, lo=unit_lo)


def fill_slack(keep: torch.Tensor, probs: torch.Tensor, budget: Budget,
               total: float) -> torch.Tensor:
    """Adds the highest-scored units left out that still fit ``total``: what the per-group
    cuts left over (less than one unit per group)."""
    costs = budget.space.costs()
    left = total - float((costs * keep.double()).sum())
    allowed = budget.targets[budget.group_of] > 0  # not a group of a dropped layer
    keep = keep.clone()
    for u in torch.argsort(probs.double(), descending=True, stable=True).tolist():
        if left < float(costs.min()):
            break
        if not keep[u] and allowed[u] and costs[u] <= left + 1e-6:
            keep[u] = True
            left -= float(costs[u])
    return keep


def read_run_mask(run_dir: str, units: UnitSpace) -> torch.Tensor:
    path = os.path.join(run_dir, MASKS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} holds no {MASKS}: --allocation scaled needs the "
                                f"run's exported mask (--allocation global needs only the scores)")
    mask = load_file(path).get("mask")
    if mask is None or tuple(mask.shape) != (units.n_units,):
        raise ScoresMismatch(f"{path!r} holds no 'mask' of this model's {units.n_units} units")
    return mask.bool()


def scaled_mask(probs: torch.Tensor, budget: Budget, units: UnitSpace,
                run_mask: torch.Tensor) -> torch.Tensor:
    """The hard model-unit mask of :func:`scaled_budget`: each group's best-scored units, then
    the slack filled; layer units as in the run's mask."""
    n = budget.space.model_units.n_units  # heads and channels: layer units come last
    space = budget.space.with_order(budget.space.rank_channels(probs[:n]))
    reduced = space.reduce(probs[:n])
    keep = fill_slack(budget.hard_mask(reduced), reduced, budget, budget.total_target)
    mask = space.expand(keep.double()[None])[0].bool()
    return torch.cat([mask, run_mask[n:].bool()]) if units.include_layers else mask


def mask_at_budget(probs: torch.Tensor, budget: Budget) -> torch.Tensor:
    """The hard model-unit mask of model-unit probabilities under ``budget``: each layer's
    channels ranked by their probability and cut into the run's blocks, the block
    probabilities projected onto the budget, and the budget's hard mask of those."""
    space = budget.space.with_order(budget.space.rank_channels(probs))
    keep = budget.hard_mask(budget.project(space.reduce(probs)))
    return space.expand(keep.double()[None])[0].bool()


def reexport(cfg: ExportConfig) -> dict:
    """Writes the run's model at ``cfg.sparsity`` to ``cfg.out``; returns what was exported."""
    check(cfg)
    from transformers import AutoConfig

    run = run_config(cfg)
    units = units_of(AutoConfig.from_pretrained(resolve_model_path(run.model)),
                     run.prune_layers, run.attn_units)
    probs = read_scores(os.path.join(cfg.run, SCORES), run, units)
    # a budget that cannot be met fails here, before loading
    if cfg.allocation == "scaled" and run.shape != "uniform":  # a uniform run's is its shape
        if units.query_heads:
            raise ValueError("--allocation scaled scales each layer's kept heads linearly, "
                              "which query-head units (a KV group's keys and values shared by "
                              "its query heads) do not allow; use --allocation global")
        run_mask = read_run_mask(cfg.run, units)
        budget = scaled_budget(run, units, run_mask)
        mask = scaled_mask(probs, budget, units, run_mask)
    else:
        budget = budget_for(run, units)
        mask = mask_at_budget(probs, budget)

    t0 = time.perf_counter()
    model, tokenizer = load_model(run.model, run.dtype, run.device)
    engine = MaskedCausalLM(model, include_layers=run.prune_layers, backend=run.backend,
                            attn_units=run.attn_units)
    bos = engine.family.window_bos(tokenizer)
    loaded = Loaded(model, tokenizer, engine, budget,
                    calibration(tokenizer, run, bos) if run.compensate != "none" else None,
                    None, None, time.perf_counter() - t0, bos)
    compensation = compensate_mask(run, loaded, mask, f"sparsity {run.sparsity}")
    if compensation is not None:  # its channels, where the compensation chose them
        mask = compensation.mask
    meta = {"settings": run.as_dict(), "probprune_version": __version__,
            "reexport": {"run": os.path.abspath(cfg.run), "sparsity": run.sparsity,
                         "allocation": cfg.allocation, "compensate": run.compensate,
                         "scores": SCORES}}
    os.makedirs(cfg.out, exist_ok=True)
    export_pruned(model, tokenizer, engine.units, mask, cfg.out, meta,
                  weights=compensation.weights if compensation else None, model_card=False)
    save_tensors(cfg.out, "masks.safetensors", mask=mask.to(torch.uint8))

    reloaded = load_pruned(cfg.out, dtype=run.dtype, device=run.device)
    record = {"run": cfg.run, "out": cfg.out, "model": run.model, "sparsity": run.sparsity,
              "compensate": run.compensate, "allocation": cfg.allocation,
              "params": {"base_total": sum(p.numel() for p in model.parameters()),
                         "total": sum(p.numel() for p in reloaded.parameters()),
                         "prunable": units.prunable_params,
                         "kept_prunable": float(units.kept_params(mask)),
                         "target_prunable": (1 - run.sparsity) * units.prunable_params},
              "perplexity": None}
    eval_name = None
    if cfg.perplexity:
        src = eval_text(run.eval, run.eval_file)
        eval_name = src.name
        ids = tokenize_joined(tokenizer, [src.text])
        record["perplexity"] = {"pruned": perplexity(
            reloaded, ids, desc="perplexity (export, reloaded)", **_ppl_kw(run, bos)).as_dict()}
        record["eval_data"] = eval_name
    write_model_card(cfg.out, perplexities=record["perplexity"], eval_data=eval_name)
    return record
