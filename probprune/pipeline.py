"""A pruning run, as the data flows: load -> init -> search -> best mask -> export -> evaluate ->
report.

``prune(config)`` validates every setting before anything is loaded, checkpoints the search
atomically every ``checkpoint_every`` steps, and with ``resume=True`` continues a killed run so
that it ends exactly as the uninterrupted run would.

What passes between the stages is typed: the :class:`Start` of the search (its
:class:`probprune.checkpoint.RunCheckpoint`), the :class:`probprune.selection.Selection` of the
mask to export, the :class:`probprune.report.Measurements` of the export, and the
:class:`probprune.report.Report` they make.
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
from .checkpoint import CHECKPOINT, RunCheckpoint, read_checkpoint
from .config import PruneConfig
from .preflight import check
from .data import DataError, calibration_texts, eval_text, random_windows, tokenize_joined
from .evaluate import masked_perplexity, masked_nll, perplexity
from .compensate import input_grams
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
from .report import Measurements, Report, build_report, peak_memory_mib, write_plots, write_report
from .search import Search, SearchForward, SearchState
from .selection import Selection, choose_mask, compensated_init
from .speed import check_speedup, measure_in_turn
from .units import UnitSpace

log = logging.getLogger(__name__)

class StopRequested(KeyboardInterrupt):
    """Raised after ``config.stop_after`` steps (the resume tests' stand-in for a killed run)."""


@dataclass
class Calibration:
    pool: torch.Tensor    # [nsamples, seqlen] windows the steps draw their batches from
    val: torch.Tensor     # [val_windows, seqlen] held-out windows that pick the best bare mask
    select: torch.Tensor  # [select_windows, seqlen] held-out windows the compensated masks
    #                       compete on, apart from val: the best bare mask won its place on val,
    #                       so its loss there is biased low against the init's


def calibration(tokenizer, cfg: PruneConfig, bos: Optional[int] = None) -> Calibration:
    """Random windows of the calibration text; the tail of the stream is held out, so the
    best-mask choice never sees windows the search trained on. The tail's first half gives the
    search's held-out windows, its second half the selection's. ``bos``: the token each window
    starts with (:meth:`probprune.families.base.Family.window_bos`)."""
    ids = tokenize_joined(tokenizer, calibration_texts(cfg.calib))
    n_val_tokens = cfg.val_windows * cfg.seqlen
    need = (cfg.nsamples + cfg.val_windows) * cfg.seqlen
    if ids.numel() < need:
        raise DataError(f"calibration source {cfg.calib!r} has {ids.numel():,} tokens; "
                        f"{cfg.nsamples} + {cfg.val_windows} windows of {cfg.seqlen} need {need:,}")
    cut = max(ids.numel() - 4 * n_val_tokens, ids.numel() * 9 // 10)
    half = cut + (ids.numel() - cut) // 2
    return Calibration(
        random_windows(ids[:cut], cfg.nsamples, cfg.seqlen, cfg.seed, bos),
        random_windows(ids[cut:half], cfg.val_windows, cfg.seqlen, cfg.seed + 1, bos),
        random_windows(ids[half:], cfg.select_windows, cfg.seqlen, cfg.seed + 2, bos))


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
    bos: Optional[int] = None  # the token every window starts with (the family's protocol)


@dataclass
class Start:
    """Where the search starts: fresh from the init, or from a checkpoint."""
    space: UnitSpace           # search units, channels ranked by the init metric
    policy: PolicyState        # on the engine's device
    checkpoint: RunCheckpoint  # the start in checkpoint form; its search state is the search's

    @property
    def state(self) -> SearchState:
        return self.checkpoint.search


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
        ckpt = shared(world, read_checkpoint(cfg) if world.is_main else None)
        run = load(cfg, model, tokenizer)
        start = (resume(cfg, run, ckpt, announce=world.is_main) if ckpt is not None
                 else start_fresh(cfg, run, world))
        search = search_masks(cfg, run, start, world)
        if not world.is_main:
            return None
        return finish(cfg, run, start, search, memory)
    finally:
        close_world(world)


def shared(world: World, ckpt: Optional[RunCheckpoint]) -> Optional[RunCheckpoint]:
    """Rank 0's checkpoint on every rank (sent as its tree, whose tensors travel on the host)."""
    if world.size == 1:
        return ckpt
    tree = world.broadcast(ckpt.to_tree() if world.is_main and ckpt is not None else None)
    return None if tree is None else RunCheckpoint.from_tree(tree)


def start_fresh(cfg: PruneConfig, run: Loaded, world: World = SINGLE) -> Start:
    """Rank 0 alone runs the init (its perplexities included); the other ranks start from its
    result in checkpoint form, so every rank starts from the same state bit for bit."""
    start = initialize(cfg, run) if world.is_main else None
    ckpt = shared(world, start.checkpoint if world.is_main else None)
    return start if world.is_main else resume(cfg, run, ckpt, announce=False)


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
    engine.check_seqlen(cfg.seqlen)  # before the init and the search, not at their first step
    shape = engine.units.shape
    block = min(cfg.channel_block, shape.intermediate)
    if block < cfg.channel_block:
        log.warning("channel block %d exceeds the %d MLP channels of a layer; using %d",
                    cfg.channel_block, shape.intermediate, block)
    # The budget needs the search units' structure only, not the init's channel order: built
    # now, bad budgets fail before any long work.
    budget = Budget.build(UnitSpace(shape, cfg.prune_layers, block, attn_units=cfg.attn_units),
                          cfg.sparsity, cfg.budget,
                          cfg.scope, cfg.attn_sparsity, cfg.mlp_sparsity, cfg.protect_layers,
                          cfg.shape)
    if (budget.mode == "uniform" and budget.ratios["heads"] == 0 and cfg.compensate != "none"
            and cfg.compensate_select == "obs"):
        # OBS picks each layer's channels at the layer's count, and the shape fixes the counts
        log.warning("--shape uniform keeps every KV group and --compensate-select obs chooses "
                    "each layer's MLP channels at the count the shape fixes: the export will not "
                    "depend on the search (--attn-sparsity makes it choose KV groups, "
                    "--compensate-select mask exports its channels; else fewer --steps lose "
                    "nothing)")
    bos = engine.family.window_bos(tokenizer)
    data = calibration(tokenizer, cfg, bos)
    eval_src = eval_text(cfg.eval, cfg.eval_file)
    return Loaded(model, tokenizer, engine, budget, data, eval_src.name,
                  tokenize_joined(tokenizer, [eval_src.text]), load_s, bos)


def _ppl_kw(cfg: PruneConfig, bos: Optional[int] = None) -> dict:
    return dict(seqlen=cfg.seqlen, batch_size=cfg.eval_batch_size,
                max_windows=cfg.max_eval_windows, stride=cfg.window_stride, progress=cfg.progress,
                bos=bos)


def initialize(cfg: PruneConfig, run: Loaded) -> Start:
    """Dense perplexity, the init's probabilities and hard mask, and their scores."""
    dense = perplexity(run.model, run.eval_ids, desc="dense perplexity", **_ppl_kw(cfg, run.bos))
    space, probs = initial_probs(run.model, run.budget, cfg.init, run.data.pool[: cfg.init_windows],
                                 cfg.init_temperature, cfg.eval_batch_size, cfg.progress,
                                 cfg.init_attn_sparsity)
    forward = SearchForward(run.engine, space)
    init_mask = run.budget.hard_mask(probs)
    init_ppl = masked_perplexity(forward, init_mask, run.eval_ids, desc="init perplexity",
                                 **_ppl_kw(cfg, run.bos))
    use_search_loss(cfg, run)  # the held-out losses the search compares are scored its way
    init_val = masked_nll(forward, init_mask, run.data.val, cfg.batch_size)
    policy = PolicyState(probs.to(run.engine.device))
    ckpt = RunCheckpoint(cfg.as_dict(), dense.as_dict(), init_ppl.as_dict(), space.channel_order,
                         policy.state_dict(), SearchState.start(probs, init_mask, init_val))
    return Start(space, policy, ckpt)


def resume(cfg: PruneConfig, run: Loaded, ckpt: RunCheckpoint, announce: bool = True) -> Start:
    policy = PolicyState.from_state_dict(ckpt.policy, run.engine.device)
    if announce:
        log.warning("resuming %s at step %d of %d", cfg.out, policy.step, cfg.steps)
    use_search_loss(cfg, run)
    return Start(run.budget.space.with_order(ckpt.channel_order), policy, ckpt)


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


def search_masks(cfg: PruneConfig, run: Loaded, start: Start, world: World = SINGLE) -> Search:
    """The search loop, checkpointed (by rank 0) every ``checkpoint_every`` steps and at the
    end."""
    policy = Policy(PolicyConfig.taken_from(cfg), start.policy)
    search = Search(SearchForward(run.engine, start.space, world), run.budget, policy, start.state,
                    run.data.pool, run.data.val, steps=cfg.steps, k=cfg.k,
                    batch_size=cfg.batch_size, eval_every=cfg.eval_every, seed=cfg.seed,
                    backend=cfg.backend, candidates=cfg.select_candidates)
    if start.checkpoint.rng is not None:  # a fresh start's streams are the seed's
        search.restore_rng(start.checkpoint.rng)

    def on_step(record):
        if world.is_main and (search.step % cfg.checkpoint_every == 0 or search.done):
            start.checkpoint.at_step_of(search).save(os.path.join(cfg.out, CHECKPOINT))
        if cfg.stop_after is not None and search.step >= cfg.stop_after:
            raise StopRequested(f"stopped after step {search.step} (stop_after)")

    search.run(on_step, cfg.progress)
    return search


@dataclass
class SearchOutcome:
    """The search's masks and probabilities in model units (what the run writes out: usable
    without knowing the search space)."""
    init_mask: torch.Tensor   # bool
    probs: torch.Tensor       # final keep-probabilities
    init_probs: torch.Tensor


def search_outcome(space: UnitSpace, search: Search) -> SearchOutcome:
    st = search.state
    init_mask, probs, init_probs = space.expand(torch.stack([
        st.init_mask.float().cpu(), search.policy.probs.detach().float().cpu(),
        st.init_probs.float().cpu()]))
    return SearchOutcome(init_mask.bool(), probs, init_probs)


def finish(cfg: PruneConfig, run: Loaded, start: Start, search: Search,
           memory: Optional[MemoryPlan] = None) -> dict:
    """Best mask -> export -> evaluate -> report; report.json's content is returned."""
    units, found = run.engine.units, search_outcome(start.space, search)
    run.engine.use_refits(None)  # from here on, bare slices are bare
    selection = choose_mask(cfg, run, start.space, search.state)
    export(cfg, run, selection, found)
    measured = measure_beside_dense_model(cfg, run, selection, found.init_mask)
    mask, scores = selection.mask, selection.scores
    del selection  # its refits: the reloaded export is measured without them beside it
    release_dense_model(run, search)
    measure_export(cfg, run, measured)
    report = build_report(cfg, measured=measured, units=units, space=start.space,
                          budget=run.budget, mask=mask, ckpt=start.checkpoint,
                          policy_state=search.policy.state, selection=scores, memory=memory,
                          eval_data=run.eval_name, load_s=run.load_s)
    write_outputs(cfg, report, units, mask, found.probs, search.state.history)
    return report.as_dict()


def export(cfg: PruneConfig, run: Loaded, selection: Selection, found: SearchOutcome) -> None:
    """The pruned model (without its card: that waits for the figures), its scores and masks."""
    meta = {"settings": cfg.as_dict(), "probprune_version": __version__,
            "best_step": selection.step}
    comp = selection.compensation
    export_pruned(run.model, run.tokenizer, run.engine.units, selection.mask, cfg.out, meta,
                  weights=comp.weights if comp else None, model_card=False)
    save_tensors(cfg.out, "scores.safetensors", metadata=scores_metadata(cfg, run.engine.units),
                 probs=found.probs, init_probs=found.init_probs)
    save_tensors(cfg.out, "masks.safetensors", mask=selection.mask.to(torch.uint8),
                 init_mask=found.init_mask.to(torch.uint8),
                 searched_mask=selection.searched.to(torch.uint8))


def measure_beside_dense_model(cfg: PruneConfig, run: Loaded, selection: Selection,
                               init_mask: torch.Tensor) -> Measurements:
    """What needs the dense model: the exported mask's bare slice, the compensated init, the
    search's best mask bare and compensated when another mask was exported, the dense model's
    size."""
    measured = Measurements(
        dense_params=sum(p.numel() for p in run.model.parameters()),
        perplexity={"pruned_bare": masked_perplexity(
            run.engine, selection.searched, run.eval_ids, desc="pruned perplexity (bare slice)",
            **_ppl_kw(cfg, run.bos)).as_dict()})
    init_comp = compensated_init(cfg, run, selection, init_mask)
    if init_comp is not None:
        measured.compensation = selection.compensation.summary()
        init_model = pruned_model(run.model, run.engine.units, init_comp.mask, init_comp.weights)
        measured.perplexity["init_compensated"] = perplexity(
            init_model, run.eval_ids, desc="init perplexity (compensated)",
            **_ppl_kw(cfg, run.bos)).as_dict()
        measured.compensation_init = {k: v for k, v in init_comp.summary().items()
                                      if k != "layers"}
    if selection.lost_search is not None:
        searched, comp = selection.lost_search
        measured.perplexity["search_bare"] = masked_perplexity(
            run.engine, searched, run.eval_ids, desc="search's mask (bare slice, not exported)",
            **_ppl_kw(cfg, run.bos)).as_dict()
        model = pruned_model(run.model, run.engine.units, comp.mask, comp.weights)
        measured.perplexity["search_compensated"] = perplexity(
            model, run.eval_ids, desc="search's mask (compensated, not exported)",
            **_ppl_kw(cfg, run.bos)).as_dict()
    return measured


def measure_export(cfg: PruneConfig, run: Loaded, measured: Measurements) -> None:
    """Adds the reloaded export's figures to ``measured``: the model the run wrote, as a user
    loads it."""
    reloaded = load_pruned(cfg.out, dtype=cfg.dtype, device=cfg.device, devices=cfg.devices)
    measured.pruned_params = sum(p.numel() for p in reloaded.parameters())
    measured.perplexity["pruned"] = perplexity(reloaded, run.eval_ids,
                                               desc="pruned perplexity (export, reloaded)",
                                               **_ppl_kw(cfg, run.bos)).as_dict()
    if cfg.eval_tasks:
        measured.zero_shot = zero_shot_of_export(cfg, reloaded, run.tokenizer)
    # the peak of the run's work, before the speed measurement adds its own
    measured.peak_memory_mib = peak_memory_mib(cfg.device)
    del reloaded  # the speed measurement loads each model in a process of its own
    if cfg.speed_tokens:
        measured.speed = model_speeds(cfg)


def write_outputs(cfg: PruneConfig, report: Report, units: UnitSpace, mask: torch.Tensor,
                  probs: torch.Tensor, history: list) -> None:
    """report.json, the export's model card (now that its figures are known) and the plots."""
    write_report(cfg.out, report)
    write_model_card(cfg.out, perplexities=report.perplexity, eval_data=report.eval_data,
                     speed=report.speed)
    write_plots(cfg.out, units, mask, probs, history)


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


def model_speeds(cfg: PruneConfig) -> dict:
    """The dense model and the export timed as ``probprune-fast speed`` times them: each in a
    fresh process, the two in turn, ``--speed-rounds`` times; with what speaks against the
    speed-ups (:func:`probprune.speed.check_speedup`)."""
    gc.collect()
    trim_host_memory()
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the children load the models onto the same device
    dense, pruned = measure_in_turn(
        [cfg.model, cfg.out], cfg.speed_rounds, dtype=cfg.dtype, device=cfg.device,
        devices=cfg.devices or None, batch=1, seqlen=cfg.seqlen, new_tokens=cfg.speed_tokens)
    return {"dense": dense.as_dict(), "pruned": pruned.as_dict(),
            "check": check_speedup(dense, pruned).as_dict()}


def scores_metadata(cfg: PruneConfig, units: UnitSpace) -> dict:
    """What a scores file records of where it came from (safetensors metadata: strings), so a
    re-export can tell scores of another model from this one's."""
    return {"model": cfg.model, "n_units": str(units.n_units),
            "prune_layers": str(units.include_layers)}


def save_tensors(out: str, name: str, metadata: Optional[dict] = None, **tensors) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(os.path.join(out, name), lambda tmp: save_file(tensors, tmp, metadata=metadata))
