"""The mask a run exports, chosen among the search's candidates after compensation.

The search ranks bare slices on its held-out windows; compensation can re-rank them, and can
make the init mask the better one. So with compensation on, the candidates (the best bare mask,
or the ``select_candidates`` best) and the init mask are each compensated as the export would be
and scored on the selection windows (apart from the search's: the best bare mask won its place
on those, so its loss there is biased low against the init's), and the lowest wins. The export
is then never worse than the compensated init on those windows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .compensate import Compensation, compensate
from .evaluate import model_nll
from .export import pruned_model
from .config import PruneConfig
from .units import UnitSpace

# ``run`` below: the run's :class:`probprune.pipeline.Loaded`, and ``state`` the search's
# :class:`probprune.search.SearchState` (both modules import this one: not imported here).

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A hard search-unit mask the search scored on its held-out windows (step 0: the init's)."""
    step: int
    val_loss: float
    mask: torch.Tensor


@dataclass
class CandidateScore:
    """A candidate's entry in report.json's ``selection``."""
    step: int
    val_loss: float
    select_loss_compensated: float
    chosen: bool = False


@dataclass
class Selection:
    """The chosen mask and how it was chosen, in model units."""
    searched: torch.Tensor                # hard mask as the search found it
    compensation: Optional[Compensation]  # its refit; None without compensation
    step: int                             # the search step that found it (0: the init)
    # one per candidate that competed after compensation; empty when none had to
    scores: List[CandidateScore] = field(default_factory=list)
    # the init mask's refit when the init competed (the report's init-compensated perplexity)
    init_compensation: Optional[Compensation] = None
    # the search's best bare mask (model units) and its refit, when another candidate won: the
    # report shows what the search found even when it is not what was exported
    lost_search: Optional[Tuple[torch.Tensor, Compensation]] = None

    @property
    def mask(self) -> torch.Tensor:
        """The export's mask: the searched one, or its channels as the compensation chose them."""
        return self.compensation.mask if self.compensation is not None else self.searched


def model_mask(space: UnitSpace, mask: torch.Tensor) -> torch.Tensor:
    """A hard search-unit mask in model units, on the host."""
    return space.expand(mask.float().cpu()[None])[0].bool()


def competitors(cfg: PruneConfig, state) -> List[Candidate]:
    """The best bare mask (or the ``select_candidates`` best), then the init mask unless it is
    among them."""
    best_bare = Candidate(state.best_step, state.best_val_loss, state.best_mask)
    pool = (list(state.candidates) if cfg.select_candidates > 1 and state.candidates
            else [best_bare])
    if not any(torch.equal(c.mask, state.init_mask) for c in pool):
        pool.append(Candidate(0, state.init_val_loss, state.init_mask))
    return pool


def choose_mask(cfg: PruneConfig, run, space: UnitSpace, state) -> Selection:
    """The hard model-unit mask to export, with its compensation: the best bare mask when there
    is no compensation or nothing to compete with it, else the competitor with the lowest
    compensated loss on the selection windows."""
    pool = competitors(cfg, state)
    if cfg.compensate == "none" or len(pool) == 1:
        mask = model_mask(space, state.best_mask)
        return Selection(mask, compensate_mask(cfg, run, mask, "pruned"), state.best_step)
    scores, best, init_comp = [], None, None  # best: (candidate, mask, compensation, score)
    best_bare = None  # (mask, compensation) of the search's best bare mask
    for c in pool:
        mask = model_mask(space, c.mask)
        comp = compensate_mask(cfg, run, mask, f"step {c.step}")
        model = pruned_model(run.model, run.engine.units, comp.mask, comp.weights)
        loss = model_nll(model, run.data.select, cfg.eval_batch_size)
        del model
        if torch.equal(c.mask, state.init_mask):
            init_comp = comp  # the report's init-compensated perplexity needs it again
        if torch.equal(c.mask, state.best_mask):
            best_bare = (mask, comp)
        scores.append(CandidateScore(c.step, c.val_loss, loss))
        if best is None or loss < best[3].select_loss_compensated:
            best = (c, mask, comp, scores[-1])
    winner, mask, comp, score = best
    score.chosen = True
    log.info("selection: step %d (compensated held-out loss %.4f)", winner.step,
             score.select_loss_compensated)
    lost = best_bare if best_bare is not None and best_bare[1] is not comp else None
    return Selection(mask, comp, winner.step, scores, init_comp, lost)


def compensated_init(cfg: PruneConfig, run, selection: Selection,
                     init_mask: torch.Tensor) -> Optional[Compensation]:
    """The model-unit init mask under the export's compensation (None without one): what the
    search must beat, not the bare init. Computed only when the selection has not already."""
    if selection.compensation is None:
        return None
    if torch.equal(init_mask, selection.searched):
        return selection.compensation
    if selection.init_compensation is not None:
        return selection.init_compensation
    return compensate_mask(cfg, run, init_mask, "init")


def compensate_mask(cfg: PruneConfig, run, mask: torch.Tensor, what: str):
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
