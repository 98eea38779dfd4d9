"""A pruning run, as the data flows: load -> init -> search -> best mask -> export -> evaluate ->
report.

``prune(config)`` validates every setting before anything is loaded, checkpoints the search
atomically every ``checkpoint_every`` steps, and with ``resume=True`` continues a killed run so
that it ends exactly as the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import save_file

from . import __version__
from .budget import Budget
from .checkpoint import load_checkpoint
from .checkpoint import save_checkpoint as write_checkpoint
from .config import PruneConfig
from .preflight import check
from .data import DataError, calibration_texts, eval_text, random_windows, tokenize_joined
from .evaluate import masked_nll, masked_perplexity, model_nll, perplexity
from .compensate import compensate, input_grams
from .distributed import (SINGLE, World, close_world, init_world, local_device, local_devices,
                          world_size_from_env)
from .export import export_pruned, pruned_model
from .files import atomic_write
from .forward import MaskedCausalLM
from .importance import initial_probs
from .memory import MemoryPlan, check_fits, plan_for, trim_host_memory
from .model_card import write_model_card
from .models import auto_dtype, load_model, load_pruned, resolve_model_path
from .policy import Policy, PolicyConfig, PolicyState
from .report import build_report, write_plots, write_report
from .search import Search, SearchForward, SearchState
from .speed import measure
from .units import UnitSpace

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"  # probprune.checkpoint: tensors + JSON, no pickle
LEGACY_CHECKPOINT = "checkpoint.pt"


class StopRequested(KeyboardInterrupt):
    """Raised after ``config.stop_after`` steps (the resume tests' stand-in for a killed run)."""


@dataclass
class Calibration:
    pool: torch.Tensor    # [nsamples, seqlen] windows the steps draw their batches from
    val: torch.Tensor     # [val_windows, seqlen] held-out windows that pick the best bare mask
    select: torch.Tensor  # [select_windows, seqlen] held-out windows the compensated masks
    #                       compete on, apart from val: the best bare mask won its place on val,
    #                       so its loss there is biased low against the init's


def calibration(tokenizer, cfg: PruneConfig) -> Calibration:
    """Random windows of the calibration text; the tail of the stream is held out, so the
    best-mask choice never sees windows the search trained on. The tail's first half gives the
    search's held-out windows, its second half the selection's."""
    ids = tokenize_joined(tokenizer, calibration_texts(cfg.calib))
    n_val_tokens = cfg.val_windows * cfg.seqlen
    need = (cfg.nsamples + cfg.val_windows) * cfg.seqlen
    if ids.numel() < need:
        raise DataError(f"calibration source {cfg.calib!r} has {ids.numel():,} tokens; "
                        f"{cfg.nsamples} + {cfg.val_windows} windows of {cfg.seqlen} need {need:,}")
    cut = max(ids.numel() - 4 * n_val_tokens, ids.numel() * 9 // 10)
    half = cut + (ids.numel() - cut) // 2
    return Calibration(random_windows(ids[:cut], cfg.nsamples, cfg.seqlen, cfg.seed),
                       random_windows(ids[cut:half], cfg.val_windows, cfg.seqlen, cfg.seed + 1),
                       random_windows(ids[half:], cfg.select_windows, cfg.seqlen, cfg.seed + 2))


def read_checkpoint(cfg: PruneConfig):
    """The run directory's checkpoint when resuming (None when there is none), after checking
    that the settings a resume must match are those of the checkpoint."""
    path = os.path.join(cfg.out, CHECKPOINT)
    if not cfg.resume:
        if os.path.exists(path):
            log.warning("%s holds a checkpoint; starting over (pass --resume to continue it)",
                        cfg.out)
        return None
    if not os.path.exists(path):
        if os.path.exists(os.path.join(cfg.out, LEGACY_CHECKPOINT)):
            raise ValueError(f"{cfg.out} holds a {LEGACY_CHECKPOINT} of an older probprune "
                             f"(a pickle, which this version does not read); start the run "
                             f"again without --resume")
        return None
    ckpt = load_checkpoint(path)
    diff = cfg.resume_mismatch(ckpt["settings"])
    if diff:
        raise ValueError(f"cannot resume {path}: settings differ from the checkpoint's in "
                         + ", ".join(diff))
    return ckpt


@dataclass
class Loaded:
    """What every stage reads: the model, its K-mask forward, the budget and the data."""
    model: torch.nn.Module
    tokenizer: object
    engine: MaskedCausalLM
    budget: Budget
    data: Calibration
    eval_name: str
    eval_ids: torch.Tensor
    load_s: float


@dataclass
class Start:
    """Where the search starts: fresh from the init, or from a checkpoint."""
    space: UnitSpace           # search units, channels ranked by the init metric
    policy: PolicyState
    state: SearchState
    fixed: dict                # checkpoint entries that never change during the search


def prune(cfg: PruneConfig, model=None, tokenizer=None) -> Optional[dict]:
    """The run; under torchrun, one rank of a mask-parallel run (:mod:`probprune.distributed`):
    the report on rank 0, None on the others. ``model`` and ``tokenizer``: a Hugging Face causal
    LM already in memory to prune instead of loading ``cfg.model`` (the run takes its device and
    dtype; it is read, never changed)."""
    check(cfg, skip=("model",) if model is not None else ())
    if model is not None:
        head = model.get_output_embeddings().weight
        cfg = dataclasses.replace(cfg, device=str(head.device), devices=[],
                                  dtype=str(head.dtype).replace("torch.", ""))
        model_config = model.config
    else:
        from transformers import AutoConfig
        model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    # With --devices, this rank's share of them; its last device holds lm_head (the engine's).
    devices = local_devices(cfg.devices)
    device = devices[-1] if devices else local_device(cfg.device)
    if cfg.dtype == "auto":  # the run records, plans and resumes with what auto chose here
        cfg = dataclasses.replace(cfg, dtype=auto_dtype(model_config, device, devices))
        log.info("dtype: %s", cfg.dtype)
    memory = plan_for(cfg, model_config, world_size_from_env(), max(1, len(devices)))
    if cfg.dry_run:
        return {"memory_plan": {"peak": memory.peak, **memory.terms},
                "memory_plan_text": "\n".join(memory.lines())}
    log.info("%s", "\n".join(memory.lines()))
    for d in devices or [device]:
        check_fits(memory, d)
    world = init_world(device, cfg.dist_timeout)
    try:
        cfg = dataclasses.replace(cfg, device=device, devices=devices,
                                  progress=cfg.progress and world.is_main)
        os.makedirs(cfg.out, exist_ok=True)
        ckpt = world.broadcast(read_checkpoint(cfg) if world.is_main else None)
        run = load(cfg, model, tokenizer)
        if ckpt is not None:
            start = resume(cfg, run, ckpt, announce=world.is_main)
        elif world.is_main:
            start = initialize(cfg, run)
        if world.size > 1 and ckpt is None:
            # Rank 0 alone runs the init (its perplexities included); the others start from its
            # result in checkpoint form, so every rank starts from the same state bit for bit.
            shared = world.broadcast(start_checkpoint(start) if world.is_main else None)
            if not world.is_main:
                start, ckpt = resume(cfg, run, shared, announce=False), shared
        search = search_masks(cfg, run, start, ckpt, world)
        if not world.is_main:
            return None
        return finish(cfg, run, start.space, search, start.fixed, memory)
    finally:
        close_world(world)


def start_checkpoint(start: Start) -> dict:
    """A fresh start in the checkpoint's format (what :func:`resume` reads)."""
    return {**start.fixed, **start.state.to_dict(), "policy": start.policy.state_dict()}


def load(cfg: PruneConfig, model=None, tokenizer=None) -> Loaded:
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.devices)
    elif tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    load_s = time.perf_counter() - t0
    engine = MaskedCausalLM(model, include_layers=cfg.prune_layers, backend=cfg.backend,
                            attn_units=cfg.attn_units)
    shape = engine.units.shape
    block = min(cfg.channel_block, shape.intermediate)
    if block < cfg.channel_block:
        log.warning("channel block %d exceeds the %d MLP channels of a layer; using %d",
                    cfg.channel_block, shape.intermediate, block)
    # The budget needs the search units' structure only, not the init's channel order: built
    # now, bad budgets fail before any long work.
    budget = Budget.build(UnitSpace(shape, cfg.prune_layers, block, attn_units=cfg.attn_units),
                          cfg.sparsity, cfg.budget,
                          cfg.scope, cfg.attn_sparsity, cfg.mlp_sparsity, cfg.protect_layers)
    data = calibration(tokenizer, cfg)
    eval_src = eval_text(cfg.eval, cfg.eval_file)
    return Loaded(model, tokenizer, engine, budget, data, eval_src.name,
                  tokenize_joined(tokenizer, [eval_src.text]), load_s)


def _ppl_kw(cfg: PruneConfig) -> dict:
    return dict(seqlen=cfg.seqlen, batch_size=cfg.eval_batch_size,
                max_windows=cfg.max_eval_windows, stride=cfg.window_stride, progress=cfg.progress)


def initialize(cfg: PruneConfig, run: Loaded) -> Start:
    """Dense perplexity, the init's probabilities and hard mask, and their scores."""
    dense = perplexity(run.model, run.eval_ids, desc="dense perplexity", **_ppl_kw(cfg))
    space, probs = initial_probs(run.model, run.budget, cfg.init, run.data.pool[: cfg.init_windows],
                                 cfg.init_temperature, cfg.eval_batch_size, cfg.progress,
                                 cfg.init_attn_sparsity)
    forward = SearchForward(run.engine, space)
    init_mask = run.budget.hard_mask(probs)
    init_ppl = masked_perplexity(forward, init_mask, run.eval_ids, desc="init perplexity",
                                 **_ppl_kw(cfg))
    use_search_loss(cfg, run)  # the held-out losses the search compares are scored its way
    init_val = masked_nll(forward, init_mask, run.data.val, cfg.batch_size)
    fixed = {"settings": cfg.as_dict(), "dense": dense.as_dict(), "init": init_ppl.as_dict(),
             "channel_order": space.channel_order}
    return Start(space, PolicyState(probs.to(run.engine.device)),
                 SearchState.start(probs, init_mask, init_val), fixed)


def resume(cfg: PruneConfig, run: Loaded, ckpt: dict, announce: bool = True) -> Start:
    policy = PolicyState.from_state_dict(ckpt["policy"], run.engine.device)
    if announce:
        log.warning("resuming %s at step %d of %d", cfg.out, policy.step, cfg.steps)
    use_search_loss(cfg, run)
    fixed = {k: ckpt[k] for k in ("settings", "dense", "init", "channel_order")}
    return Start(run.budget.space.with_order(ckpt["channel_order"]), policy,
                 SearchState.from_dict(ckpt), fixed)


def use_search_loss(cfg: PruneConfig, run: Loaded) -> None:
    """Makes the engine score masks as ``--search-loss`` says (refit: after each mask's own
    least-squares refit, on the dense model's input statistics)."""
    if cfg.search_loss != "refit":
        return
    t0 = time.perf_counter()
    grams = input_grams(run.engine, run.data.pool[: cfg.search_refit_windows],
                        cfg.eval_batch_size, cfg.progress)
    run.engine.use_refits(grams, cfg.compensate_damping)
    log.info("search loss: refit (input statistics of %d windows, %.1f s)",
             min(cfg.search_refit_windows, len(run.data.pool)), time.perf_counter() - t0)


def search_masks(cfg: PruneConfig, run: Loaded, start: Start, ckpt,
                 world: World = SINGLE) -> Search:
    """The search loop, checkpointed (by rank 0) every ``checkpoint_every`` steps and at the
    end."""
    policy = Policy(PolicyConfig.taken_from(cfg), start.policy)
    search = Search(SearchForward(run.engine, start.space, world), run.budget, policy, start.state,
                    run.data.pool, run.data.val, steps=cfg.steps, k=cfg.k,
                    batch_size=cfg.batch_size, eval_every=cfg.eval_every, seed=cfg.seed,
                    backend=cfg.backend, candidates=cfg.select_candidates)
    if ckpt is not None and "data_rng" in ckpt:  # a fresh start's streams are the seed's
        search.restore_rng(ckpt)

    def on_step(record):
        if world.is_main and (search.step % cfg.checkpoint_every == 0 or search.done):
            save_checkpoint(cfg.out, {**start.fixed, **search.checkpoint()})
        if cfg.stop_after is not None and search.step >= cfg.stop_after:
            raise StopRequested(f"stopped after step {search.step} (stop_after)")

    search.run(on_step, cfg.progress)
    return search


def finish(cfg: PruneConfig, run: Loaded, space: UnitSpace, search: Search, fixed: dict,
           memory: Optional[MemoryPlan] = None) -> dict:
    """Best mask -> compensation -> export -> evaluate -> report. Everything written out is in
    model units, usable without knowing the search space."""
    st = search.state
    init_mask, final_probs, init_probs = space.expand(torch.stack([
        st.init_mask.float().cpu(), search.policy.probs.detach().float().cpu(),
        st.init_probs.float().cpu()]))
    init_mask = init_mask.bool()
    units = run.engine.units
    run.engine.use_refits(None)  # from here on, bare slices are bare

    searched, compensation, selection, init_comp = choose_mask(cfg, run, space, st)
    # the export's mask: the searched one, or its channels as the compensation chose them
    mask = compensation.mask if compensation is not None else searched
    chosen_step = next(c["step"] for c in selection if c["chosen"]) if selection else st.best_step
    meta = {"settings": cfg.as_dict(), "probprune_version": __version__,
            "best_step": chosen_step}
    export_pruned(run.model, run.tokenizer, units, mask, cfg.out, meta,
                  weights=compensation.weights if compensation else None)
    save_tensors(cfg.out, "scores.safetensors", metadata=scores_metadata(cfg, units),
                 probs=final_probs, init_probs=init_probs)
    save_tensors(cfg.out, "masks.safetensors", mask=mask.to(torch.uint8),
                 init_mask=init_mask.to(torch.uint8), searched_mask=searched.to(torch.uint8))

    perplexities = {"pruned_bare": masked_perplexity(
        run.engine, searched, run.eval_ids, desc="pruned perplexity (bare slice)",
        **_ppl_kw(cfg)).as_dict()}
    extra = {}
    if compensation is not None:
        extra["compensation"] = compensation.summary()
        # The init mask under the same compensation: the search must beat this, not the bare init.
        if torch.equal(init_mask, searched):
            init_comp = compensation
        elif init_comp is None:
            init_comp = compensate_mask(cfg, run, init_mask, "init")
        init_model = pruned_model(run.model, units, init_comp.mask, init_comp.weights)
        perplexities["init_compensated"] = perplexity(
            init_model, run.eval_ids, desc="init perplexity (compensated)", **_ppl_kw(cfg)).as_dict()
        extra["compensation_init"] = {k: v for k, v in init_comp.summary().items() if k != "layers"}
        del init_model
    dense_params = sum(p.numel() for p in run.model.parameters())
    speed = ({"dense": model_speed(cfg, run.model, cfg.model, resolve_model_path(cfg.model))}
             if cfg.speed_tokens else None)
    del compensation, init_comp
    release_dense_model(run, search)
    reloaded = load_pruned(cfg.out, dtype=cfg.dtype, device=cfg.device, devices=cfg.devices)
    perplexities["pruned"] = perplexity(reloaded, run.eval_ids,
                                        desc="pruned perplexity (export, reloaded)",
                                        **_ppl_kw(cfg)).as_dict()
    if cfg.eval_tasks:
        extra["zero_shot"] = zero_shot_of_export(cfg, reloaded, run.tokenizer)

    report = build_report(cfg, dense_params=dense_params, reloaded=reloaded, units=units,
                          space=space, budget=run.budget, mask=mask, ckpt=fixed, search=search,
                          perplexities=perplexities, eval_data=run.eval_name, load_s=run.load_s)
    report.update(extra)
    if selection:
        report["selection"] = selection
    if memory is not None:  # planned before loading, next to the measured peak_memory_mib
        report["memory_plan_mib"] = {"peak": memory.peak / 2**20,
                                     **{k: v / 2**20 for k, v in memory.terms.items()}}
    if speed is not None:
        report["speed"] = {**speed, "pruned": model_speed(cfg, reloaded, cfg.out, cfg.out)}
    write_report(cfg.out, report)
    write_model_card(cfg.out, perplexities=report["perplexity"], eval_data=run.eval_name,
                     speed=report.get("speed"))
    write_plots(cfg.out, units, mask, final_probs, st.history)
    return report


def release_dense_model(run: Loaded, search: Search) -> None:
    """Drops the last references to the dense weights (the run's model, its K-mask forward, and
    the search's), so that the reloaded export is evaluated without the dense model beside it:
    the process peak is then the larger of the two models plus activations, not their sum."""
    run.model = run.engine = None
    search.forward = None
    gc.collect()
    trim_host_memory()


def zero_shot_of_export(cfg: PruneConfig, model, tokenizer) -> dict:
    """lm-eval's scores of the reloaded export; a task that fails leaves its error in the report
    instead of the whole run's results (``probprune-fast eval --tasks`` can score the export
    again)."""
    from .zero_shot import ZeroShotError, zero_shot

    try:
        return zero_shot(model, tokenizer, cfg.eval_tasks, cfg.tasks_path, cfg.eval_batch_size,
                         cfg.task_limit)
    except ZeroShotError as e:
        log.error("zero-shot evaluation failed: %s", e)
        return {"error": str(e)}


def model_speed(cfg: PruneConfig, model, name: str, path: str) -> dict:
    """A model's speed, in this process (a few tokens: cheap), for report.json's speed."""
    return measure(model, name, path, batch=1, seqlen=cfg.seqlen, new_tokens=cfg.speed_tokens,
                   repeats=2).as_dict()


def scores_metadata(cfg: PruneConfig, units: UnitSpace) -> dict:
    """What a scores file records of where it came from (safetensors metadata: strings), so a
    re-export can tell scores of another model from this one's."""
    return {"model": cfg.model, "n_units": str(units.n_units),
            "prune_layers": str(units.include_layers)}


def choose_mask(cfg: PruneConfig, run: Loaded, space: UnitSpace, st: SearchState):
    """The hard model-unit mask to export and its compensation (None without one), and the
    selection's record. With compensation on, the candidates (the best bare mask, or the
    ``select_candidates`` best) and the init mask are each compensated and scored on the
    selection windows as the export would be, and the lowest wins: the search optimises bare
    slices, so after compensation the init can be the better mask, and the export is never worse
    than it on those windows. Also the init mask's compensation (None when not computed)."""
    best_bare = {"step": st.best_step, "val_loss": st.best_val_loss, "mask": st.best_mask}
    pool = list(st.candidates) if cfg.select_candidates > 1 and st.candidates else [best_bare]
    if not any(torch.equal(c["mask"], st.init_mask) for c in pool):
        pool.append({"step": 0, "val_loss": st.init_val_loss, "mask": st.init_mask})
    if cfg.compensate == "none" or len(pool) == 1:
        mask = space.expand(st.best_mask.float().cpu()[None])[0].bool()
        return mask, compensate_mask(cfg, run, mask, "pruned"), [], None
    units, best, init_comp = run.engine.units, None, None
    selection = []
    for c in pool:
        mask = space.expand(c["mask"].float().cpu()[None])[0].bool()
        comp = compensate_mask(cfg, run, mask, f"step {c['step']}")
        model = pruned_model(run.model, units, comp.mask, comp.weights)
        loss = model_nll(model, run.data.select, cfg.eval_batch_size)
        del model
        if torch.equal(c["mask"], st.init_mask):
            init_comp = comp  # the report's init-compensated perplexity needs it again
        selection.append({"step": c["step"], "val_loss": c["val_loss"],
                          "select_loss_compensated": loss, "chosen": False})
        if best is None or loss < best[0]:
            best = (loss, len(selection) - 1, mask, comp)
    selection[best[1]]["chosen"] = True
    log.info("selection: step %d (compensated held-out loss %.4f)",
             selection[best[1]]["step"], best[0])
    return best[2], best[3], selection, init_comp


def compensate_mask(cfg: PruneConfig, run: Loaded, mask: torch.Tensor, what: str):
    """The refit of a hard model-unit mask by ``cfg.compensate`` (None when it is 'none')."""
    if cfg.compensate == "none":
        return None
    if cfg.compensate_windows > len(run.data.pool):
        log.warning("--compensate-windows %d exceeds the %d calibration windows of --nsamples; "
                    "using %d", cfg.compensate_windows, len(run.data.pool), len(run.data.pool))
    result = compensate(run.engine, mask, run.data.pool[: cfg.compensate_windows], cfg,
                        batch_size=cfg.eval_batch_size, progress=cfg.progress)
    log.info("compensation of the %s mask (%s): %.1f s", what, cfg.compensate, result.seconds)
    return result


def save_checkpoint(out: str, ckpt: dict) -> None:
    write_checkpoint(os.path.join(out, CHECKPOINT), ckpt)


def save_tensors(out: str, name: str, metadata: Optional[dict] = None, **tensors) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(os.path.join(out, name), lambda tmp: save_file(tensors, tmp, metadata=metadata))
