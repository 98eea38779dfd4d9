"""Re-export of a prune run at another budget, from its saved scores, without a new search.

A run's ``scores.safetensors`` holds its final keep-probabilities per model unit. For a new
sparsity the budget is rebuilt with the run's own settings (budget mode, scope, channel blocks,
protected layers, layer units), the probabilities are projected onto it and cut to the hard mask
the run itself would take from them, the mask is optionally compensated as ``prune`` does, and
the smaller model is exported. The run's exported mask is the best one its search *scored* on
held-out windows, so at the run's own sparsity a re-export can differ from it.
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

from . import __version__
from .budget import Budget
from .config import ExportConfig, PruneConfig
from .data import eval_text, tokenize_joined
from .evaluate import perplexity
from .export import export_pruned
from .forward import MaskedCausalLM
from .importance import load_probs
from .model_card import write_model_card
from .models import MANIFEST, load_model, load_pruned, resolve_model_path
from .pipeline import Loaded, _ppl_kw, calibration, compensate_mask, save_tensors
from .units import UnitSpace

log = logging.getLogger(__name__)

SCORES = "scores.safetensors"


class ScoresMismatch(ValueError):
    """A scores file that belongs to another model or unit layout than the run's."""


def run_config(cfg: ExportConfig) -> PruneConfig:
    """The run's settings with the re-export's budget, compensation, device and output."""
    with open(os.path.join(cfg.run, MANIFEST), encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    known = {f.name for f in fields(PruneConfig)}
    run = PruneConfig(**{k: v for k, v in settings.items() if k in known})
    # A per-type run's own attention / MLP ratios would override the new sparsity: both take it.
    return dataclasses.replace(
        run, sparsity=cfg.sparsity, attn_sparsity=None, mlp_sparsity=None, out=cfg.out,
        compensate=cfg.compensate, compensate_bias=cfg.compensate_bias,
        compensate_damping=cfg.compensate_damping, compensate_windows=cfg.compensate_windows,
        eval_batch_size=cfg.eval_batch_size, device=cfg.device, progress=cfg.progress,
        resume=False, dry_run=False)


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
    return Budget.build(UnitSpace(units.shape, run.prune_layers, block), run.sparsity,
                        run.budget, run.scope, run.attn_sparsity, run.mlp_sparsity,
                        run.protect_layers)


def mask_at_budget(probs: torch.Tensor, budget: Budget) -> torch.Tensor:
    """The hard model-unit mask of model-unit probabilities under ``budget``: each layer's
    channels ranked by their probability and cut into the run's blocks, the block
    probabilities projected onto the budget, and the budget's hard mask of those."""
    space = budget.space.with_order(budget.space.rank_channels(probs))
    keep = budget.hard_mask(budget.project(space.reduce(probs)))
    return space.expand(keep.double()[None])[0].bool()


def reexport(cfg: ExportConfig) -> dict:
    """Writes the run's model at ``cfg.sparsity`` to ``cfg.out``; returns what was exported."""
    cfg.validate()
    from transformers import AutoConfig

    run = run_config(cfg)
    units = UnitSpace.of_model(AutoConfig.from_pretrained(resolve_model_path(run.model)),
                               run.prune_layers)
    probs = read_scores(os.path.join(cfg.run, SCORES), run, units)
    budget = budget_for(run, units)  # a budget that cannot be met fails before loading
    mask = mask_at_budget(probs, budget)

    t0 = time.perf_counter()
    model, tokenizer = load_model(run.model, run.dtype, run.device)
    engine = MaskedCausalLM(model, include_layers=run.prune_layers, backend=run.backend)
    loaded = Loaded(model, tokenizer, engine, budget,
                    calibration(tokenizer, run) if run.compensate != "none" else None,
                    None, None, time.perf_counter() - t0)
    compensation = compensate_mask(run, loaded, mask, f"sparsity {run.sparsity}")
    meta = {"settings": run.as_dict(), "probprune_version": __version__,
            "reexport": {"run": os.path.abspath(cfg.run), "sparsity": run.sparsity,
                         "compensate": run.compensate, "scores": SCORES}}
    os.makedirs(cfg.out, exist_ok=True)
    export_pruned(model, tokenizer, engine.units, mask, cfg.out, meta,
                  weights=compensation.weights if compensation else None)
    save_tensors(cfg.out, "masks.safetensors", mask=mask.to(torch.uint8))

    reloaded = load_pruned(cfg.out, dtype=run.dtype, device=run.device)
    record = {"run": cfg.run, "out": cfg.out, "model": run.model, "sparsity": run.sparsity,
              "compensate": run.compensate,
              "params": {"base_total": sum(p.numel() for p in model.parameters()),
                         "total": sum(p.numel() for p in reloaded.parameters()),
                         "prunable": units.prunable_params,
                         "kept_prunable": float(units.kept_params(mask)),
                         "target_prunable": budget.total_target},
              "perplexity": None}
    eval_name = None
    if cfg.perplexity:
        src = eval_text(run.eval, run.eval_file)
        eval_name = src.name
        ids = tokenize_joined(tokenizer, [src.text])
        record["perplexity"] = {"pruned": perplexity(
            reloaded, ids, desc="perplexity (export, reloaded)", **_ppl_kw(run)).as_dict()}
        record["eval_data"] = eval_name
    write_model_card(cfg.out, perplexities=record["perplexity"], eval_data=eval_name)
    return record
