"""The search loop: sample K masks, take their K losses in one forward, update the policy, and
keep the best hard mask by held-out loss.

Everything here is in search units (:mod:`probprune.units`); :class:`SearchForward` is the one
place that turns them into model units for the forward. The loop state (:class:`SearchState`)
is what a checkpoint holds, so a killed run resumes and ends exactly as the uninterrupted one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from tqdm.auto import tqdm

import probprune_kernels as pk

from .budget import Budget
from .distributed import SINGLE, World
from .evaluate import masked_nll
from .forward import MaskedCausalLM
from .policy import Policy
from .selection import Candidate
from .units import UnitSpace


def draw_uniforms(k: int, n: int, generator: torch.Generator, antithetic: bool,
                  device=None) -> torch.Tensor:
    """[k, n] uniforms for k masks, drawn from ``generator`` and put on ``device`` (default: the
    generator's); antithetic: rows k/2.. are 1 - rows ..k/2, so masks k and k + k/2 are an
    antithetic pair (the layout :func:`probprune.policy.antithetic_gradient` reads)."""
    if k % 2 and antithetic:
        raise ValueError(f"antithetic pairs need an even number of masks, got {k}")
    u = torch.rand(k // 2 if antithetic else k, n, generator=generator, device=generator.device)
    u = u.to(device or generator.device)
    return torch.cat([u, 1 - u]) if antithetic else u


class SearchForward:
    """The K-mask forward over search units: ``losses(input_ids, masks [K, space.n_units])``."""

    def __init__(self, engine: MaskedCausalLM, space: UnitSpace, world: World = SINGLE):
        if space.model_units.n_units != engine.units.n_units:
            raise ValueError(f"the search space expands to {space.model_units.n_units} model "
                             f"units, the model has {engine.units.n_units}")
        self.engine, self.space, self.world = engine, space, world

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def losses(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.engine.losses(input_ids, self.space.expand(masks))

    def step_losses(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The K losses of a step: this rank evaluates its share of the masks, the rest come
        from the other ranks (all of them here in one process)."""
        return self.world.gather_losses(self.losses(input_ids, masks[self.world.shard(len(masks))]))

    def held_out_loss(self, mask: torch.Tensor, windows: torch.Tensor, batch_size: int) -> float:
        """Mean loss of one hard search-unit mask on ``windows`` [N, T]: each rank scores its
        share of the windows, and the token-weighted sums are added up."""
        mine = windows[self.world.rows(len(windows))]
        local = (masked_nll(self, mask, mine, batch_size) * mine[:, 1:].numel() if len(mine)
                 else 0.0)
        total = self.world.sum(torch.tensor([local], dtype=torch.float64, device=self.device))
        return float(total[0]) / windows[:, 1:].numel()


@dataclass
class SearchState:
    """The search's progress in search units; :meth:`to_dict` / :meth:`from_dict` are the
    checkpoint format (with the policy state and RNG states added by :class:`Search`)."""
    init_probs: torch.Tensor
    init_mask: torch.Tensor
    init_val_loss: float
    best_mask: torch.Tensor
    best_val_loss: float
    best_step: int = 0
    history: List[dict] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)
    # The distinct hard masks with the lowest held-out losses, lowest first; the final choice
    # may re-rank them after compensation.
    candidates: List[Candidate] = field(default_factory=list)

    @classmethod
    def start(cls, init_probs, init_mask, init_val_loss) -> "SearchState":
        return cls(init_probs.clone(), init_mask, init_val_loss, init_mask, init_val_loss,
                   candidates=[Candidate(0, init_val_loss, init_mask)])

    def offer(self, step: int, val_loss: float, mask: torch.Tensor, keep: int) -> None:
        """A scored hard mask: the best one if it beats it, a candidate if among the ``keep``
        lowest (a mask already held is not held twice)."""
        if val_loss < self.best_val_loss:
            self.best_mask, self.best_val_loss, self.best_step = mask, val_loss, step
        if any(torch.equal(c.mask, mask) for c in self.candidates):
            return
        self.candidates.append(Candidate(step, val_loss, mask))
        self.candidates.sort(key=lambda c: c.val_loss)
        del self.candidates[keep:]

    def to_dict(self) -> dict:
        return {"init_probs": self.init_probs, "init_mask": self.init_mask,
                "init_val_loss": self.init_val_loss,
                "best": {"mask": self.best_mask, "val_loss": self.best_val_loss,
                         "step": self.best_step},
                "history": self.history, "step_times": self.step_times,
                "candidates": [{"step": c.step, "val_loss": c.val_loss, "mask": c.mask}
                               for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchState":
        b = d["best"]
        return cls(d["init_probs"], d["init_mask"], d["init_val_loss"], b["mask"], b["val_loss"],
                   b["step"], d["history"], d["step_times"],
                   [Candidate(**c) for c in d.get("candidates", [])])


class Search:
    """One search: the policy over ``forward.space``, the calibration pool it draws batches from
    and the held-out windows that pick the best hard mask."""

    def __init__(self, forward: SearchForward, budget: Budget, policy: Policy, state: SearchState,
                 pool: torch.Tensor, val: torch.Tensor, *, steps: int, k: int, batch_size: int,
                 eval_every: int, seed: int, backend: Optional[str] = None,
                 candidates: int = 1):
        self.forward, self.budget, self.policy, self.state = forward, budget, policy, state
        self.pool, self.val = pool, val
        self.steps, self.k, self.batch_size, self.eval_every = steps, k, batch_size, eval_every
        self.backend, self.candidates = backend, candidates
        self.data_gen = torch.Generator().manual_seed(seed)
        # On the host whatever the model's device: a run samples the same masks on a GPU as on
        # the CPU, and a step moves K x units uniforms (kilobytes) to the device.
        self.mask_gen = torch.Generator().manual_seed(seed + 7)

    @property
    def step(self) -> int:
        return self.policy.state.step

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def val_loss(self, mask: torch.Tensor) -> float:
        """Mean loss of a hard search-unit mask on the held-out windows."""
        return self.forward.held_out_loss(mask, self.val, self.batch_size)

    # -- checkpoint -----------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {**self.state.to_dict(), "policy": self.policy.state.state_dict(),
                "data_rng": self.data_gen.get_state(), "mask_rng": self.mask_gen.get_state()}

    def restore_rng(self, ckpt: dict) -> None:
        """The batch and mask random streams of a checkpoint (the policy state is the caller's)."""
        self.data_gen.set_state(ckpt["data_rng"])
        self.mask_gen.set_state(ckpt["mask_rng"])

    # -- one step ---------------------------------------------------------------------------------
    def run_step(self) -> dict:
        """Sample K masks, take their losses, update the policy; every ``eval_every`` steps score
        the hard mask on the held-out windows. One host sync (the step's record), plus the
        held-out scoring on the steps that do it."""
        t0 = time.perf_counter()
        st = self.policy.state
        space = self.forward.space
        rows = torch.randint(0, len(self.pool), (self.batch_size,), generator=self.data_gen)
        u = draw_uniforms(self.k, space.n_units, self.mask_gen, self.policy.config.antithetic,
                          st.probs.device)
        # The projection keeps probs in [0, 1]: the value check (a host sync) is not needed.
        masks = pk.sample_masks(st.probs, u, backend=self.backend, validate=False)
        losses = self.forward.step_losses(self.pool[rows], masks)
        stats = self.policy.update(losses, masks, self.budget.project)
        kept = space.kept_params(self.policy.probs) / space.prunable_params
        values = torch.cat([losses.double().flatten(),
                            torch.stack([stats["mean_loss"], stats["baseline"], kept,
                                         stats["valid"].double(),
                                         stats["cv_explained"].double()]).to(losses.device)])
        *step_losses, mean_loss, baseline, kept, valid, explained = values.tolist()  # one sync
        self.state.step_times.append(time.perf_counter() - t0)
        record = {"step": self.step, "losses": step_losses, "kept": kept, "lr": stats["lr"],
                  "baseline": None if baseline != baseline else baseline, "valid": int(valid)}
        if mean_loss == mean_loss:  # NaN on a skipped step
            record["mean_loss"] = mean_loss
        if explained == explained:
            record["cv_explained"] = explained
        if self.step % self.eval_every == 0 or self.step == self.steps:
            hard = self.budget.hard_mask(self.policy.probs)
            record["val_loss"] = self.val_loss(hard)
            self.state.offer(self.step, record["val_loss"], hard, self.candidates)
        self.state.history.append(record)
        return record

    def run(self, on_step=None, progress: bool = True) -> None:
        """Steps until done; ``on_step(record)`` after each (checkpoints, a test's interrupt)."""
        bar = tqdm(total=self.steps, initial=self.step, desc="search", unit="step",
                   disable=not progress or not self.forward.world.is_main)
        try:
            while not self.done:
                record = self.run_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record.get('mean_loss', float('nan')):.3f}",
                                baseline=f"{record['baseline'] or float('nan'):.3f}",
                                kept=f"{record['kept']:.3f}",
                                best=f"{self.state.best_val_loss:.3f}")
                if on_step is not None:
                    on_step(record)
        finally:
            bar.close()
