"""A pruning run: load, initialise, search, keep the best hard mask, export, evaluate, report.

Every piece of search state (probabilities, baseline history, step, best mask, RNG states,
history) is checkpointed atomically, so a killed run resumes with ``resume=True`` and ends exactly
as the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import probprune_kernels as pk

from . import __version__
from .budget import Budget
from .data import calibration_texts, eval_text, random_windows, tokenize_joined, DataError
from .evaluate import masked_perplexity, perplexity
from .export import export_pruned, load_pruned
from .init import initial_probs
from .masked_model import MaskedCausalLM, sizes_of
from .models import load_model
from .policy import Policy, PolicyConfig, PolicyState
from .space import SearchSpace

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Settings that must match for a resumed run to continue the same search.
RESUME_KEYS = ("model", "sparsity", "steps", "k", "batch_size", "seqlen", "calib", "nsamples",
               "lr", "init", "init_temperature", "init_attn_sparsity", "init_windows", "budget",
               "scope", "attn_sparsity", "mlp_sparsity", "prune_layers", "protect_layers",
               "baseline", "seed", "dtype", "val_windows", "channel_block")


@dataclass
class PruneSettings:
    model: str
    sparsity: float
    out: str
    steps: int = 400
    k: int = 2
    batch_size: int = 4
    seqlen: int = 128
    calib: str = "wiki-summaries"
    nsamples: int = 256           # calibration windows the steps draw their batches from
    val_windows: int = 64         # held-out calibration windows that pick the best hard mask
    eval: str = "wikitext2"
    eval_file: Optional[str] = None
    max_eval_windows: Optional[int] = None
    eval_batch_size: int = 8
    lr: float = 0.01
    min_lr_ratio: float = 0.0
    init: str = "wanda-sp"
    init_temperature: float = 0.1
    init_attn_sparsity: float = 0.0  # attention share of the init (per-type budgets use theirs)
    init_windows: int = 64        # calibration windows of the init's activation statistics
    channel_block: int = 64       # MLP channels per search unit, ranked by the init metric
    budget: str = "global"
    scope: str = "global"
    attn_sparsity: Optional[float] = None
    mlp_sparsity: Optional[float] = None
    prune_layers: bool = False
    protect_layers: List[int] = field(default_factory=list)
    baseline: str = "leave-one-out"
    ma_window: int = 5
    eval_every: int = 25
    checkpoint_every: int = 25
    device: str = "cpu"
    dtype: str = "float32"
    backend: Optional[str] = None
    seed: int = 0
    resume: bool = False
    progress: bool = True
    stop_after: Optional[int] = None  # end the process after this step (tests of resume)

    def validate(self):
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"--sparsity must lie strictly between 0 and 1, got {self.sparsity}")
        for name in ("steps", "k", "batch_size", "nsamples", "val_windows", "eval_every",
                     "checkpoint_every", "channel_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ValueError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.baseline == "leave-one-out" and self.k < 2:
            raise ValueError("the leave-one-out baseline needs --k 2 or more "
                             "(or use --baseline moving-average)")


def peak_memory_mib(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    def __init__(self, s: PruneSettings):
        s.validate()
        self.s = s
        self.device = torch.device(s.device)
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_model(s.model, s.dtype, s.device)
        self.load_s = time.perf_counter() - t0
        self.mm = MaskedCausalLM(self.model, include_layers=s.prune_layers, backend=s.backend)
        self.layout = self.mm.layout
        block = min(s.channel_block, self.layout.intermediate)
        if block < s.channel_block:
            log.warning("channel block %d exceeds the %d MLP channels of a layer; using %d",
                        s.channel_block, self.layout.intermediate, block)
        # Built before the init so that bad settings fail before any long work; the init then
        # ranks the channels and sets the space's order (the budget does not depend on it).
        self.budget = Budget.build(SearchSpace(self.layout, block), s.sparsity, s.budget, s.scope,
                                   s.attn_sparsity, s.mlp_sparsity, s.protect_layers)
        self._load_calibration()

    # -- data -----------------------------------------------------------------------------------
    def _load_calibration(self):
        s = self.s
        ids = tokenize_joined(self.tokenizer, calibration_texts(s.calib))
        # The tail of the stream is for validation only: best-mask selection never sees
        # windows the search trained on.
        n_val_tokens = s.val_windows * s.seqlen
        need = (s.nsamples + s.val_windows) * s.seqlen
        if ids.numel() < need:
            raise DataError(f"calibration source {s.calib!r} has {ids.numel():,} tokens; "
                            f"{s.nsamples} + {s.val_windows} windows of {s.seqlen} need {need:,}")
        cut = max(ids.numel() - 4 * n_val_tokens, ids.numel() * 9 // 10)
        self.pool = random_windows(ids[:cut], s.nsamples, s.seqlen, s.seed)
        self.val = random_windows(ids[cut:], s.val_windows, s.seqlen, s.seed + 1)

    def _eval_ids(self):
        text = eval_text(self.s.eval, self.s.eval_file)
        return text, tokenize_joined(self.tokenizer, [text.text])

    @property
    def space(self) -> SearchSpace:
        return self.budget.space

    def _set_space(self, space: SearchSpace) -> None:
        self.budget = dataclasses.replace(self.budget, space=space)

    def val_loss(self, mask: torch.Tensor) -> float:
        """Mean loss of a hard search-unit mask on the held-out calibration windows."""
        total = 0.0
        bs = self.s.batch_size
        unit_mask = self.space.expand(mask.to(self.device))[None]
        for start in range(0, len(self.val), bs):
            batch = self.val[start:start + bs]
            total += float(self.mm.losses(batch, unit_mask)[0]) * len(batch)
        return total / len(self.val)

    # -- checkpoint -----------------------------------------------------------------------------
    def _settings_dict(self):
        return dataclasses.asdict(self.s)

    def save_checkpoint(self, st):
        st["policy"] = self.policy.state.state_dict()
        st["data_rng"] = self.data_gen.get_state()
        st["mask_rng"] = self.mask_gen.get_state()
        _atomic_torch_save(st, os.path.join(self.s.out, CHECKPOINT))

    def load_checkpoint(self):
        path = os.path.join(self.s.out, CHECKPOINT)
        if not os.path.exists(path):
            return None
        st = torch.load(path, map_location="cpu", weights_only=False)
        saved = st["settings"]
        diff = [k for k in RESUME_KEYS if saved.get(k) != getattr(self.s, k)]
        if diff:
            raise ValueError(f"cannot resume {path}: settings differ from the checkpoint's in "
                             + ", ".join(f"{k} ({saved.get(k)!r} there, {getattr(self.s, k)!r} "
                                         f"now)" for k in diff))
        return st

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        os.makedirs(s.out, exist_ok=True)
        st = self.load_checkpoint() if s.resume else None
        if st is None and os.path.exists(os.path.join(s.out, CHECKPOINT)) and not s.resume:
            log.warning("%s holds a checkpoint; starting over (pass --resume to continue it)", s.out)
        eval_src, eval_ids = self._eval_ids()
        ppl_kw = dict(seqlen=s.seqlen, batch_size=s.eval_batch_size,
                      max_windows=s.max_eval_windows, progress=s.progress)

        self.data_gen = torch.Generator().manual_seed(s.seed)
        self.mask_gen = torch.Generator(device=self.device).manual_seed(s.seed + 7)
        if st is None:
            dense = perplexity(self.model, eval_ids, desc="dense perplexity", **ppl_kw)
            attn = s.init_attn_sparsity
            if s.budget == "per-type":
                attn = s.attn_sparsity if s.attn_sparsity is not None else s.sparsity
            space, probs = initial_probs(self.model, self.budget, s.init,
                                         self.pool[: s.init_windows], s.init_temperature,
                                         s.eval_batch_size, s.progress, attn)
            self._set_space(space)
            init_mask = self.budget.hard_mask(probs)
            init_ppl = masked_perplexity(self.mm, space.expand(init_mask).to(self.device),
                                         eval_ids, desc="init perplexity", **ppl_kw)
            init_val = self.val_loss(init_mask)
            st = {"settings": self._settings_dict(), "dense": dense.as_dict(),
                  "channel_order": space.channel_order,
                  "init": init_ppl.as_dict(), "init_probs": probs.clone(),
                  "init_mask": init_mask, "init_val_loss": init_val,
                  "best": {"mask": init_mask, "val_loss": init_val, "step": 0},
                  "history": [], "step_times": []}
            state = PolicyState(probs.to(self.device))
        else:
            self._set_space(self.space.with_order(st["channel_order"]))
            state = PolicyState.from_state_dict(st["policy"], self.device)
            self.data_gen.set_state(st["data_rng"])
            self.mask_gen.set_state(st["mask_rng"])
            log.warning("resuming %s at step %d of %d", s.out, state.step, s.steps)
        self.policy = Policy(PolicyConfig(s.lr, s.steps, s.baseline, s.ma_window, s.min_lr_ratio),
                             state)
        self._search(st)
        return self._finish(st, eval_src, eval_ids, ppl_kw)

    def _search(self, st):
        s, state = self.s, self.policy.state
        bar = tqdm(total=s.steps, initial=state.step, desc="search", disable=not s.progress,
                   unit="step")
        space = self.space
        prunable = self.layout.prunable_params
        while state.step < s.steps:
            t0 = time.perf_counter()
            rows = torch.randint(0, len(self.pool), (s.batch_size,), generator=self.data_gen)
            batch = self.pool[rows]
            u = torch.rand(s.k, space.n_units, generator=self.mask_gen, device=self.device)
            masks = pk.sample_masks(state.probs, u, backend=s.backend)
            losses = self.mm.losses(batch, space.expand(masks))
            stats = self.policy.update(losses, masks, self.budget.project)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            st["step_times"].append(time.perf_counter() - t0)
            kept = float(space.kept_params(state.probs)) / prunable
            record = {"step": state.step, "losses": losses.tolist(), "kept": kept, **stats}
            if state.step % s.eval_every == 0 or state.step == s.steps:
                hard = self.budget.hard_mask(state.probs)
                record["val_loss"] = self.val_loss(hard)
                if record["val_loss"] < st["best"]["val_loss"]:
                    st["best"] = {"mask": hard, "val_loss": record["val_loss"], "step": state.step}
            st["history"].append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.get('mean_loss', float('nan')):.3f}",
                            baseline=f"{stats['baseline'] or float('nan'):.3f}",
                            kept=f"{kept:.3f}", best=f"{st['best']['val_loss']:.3f}")
            if state.step % s.checkpoint_every == 0 or state.step == s.steps:
                self.save_checkpoint(st)
            if s.stop_after is not None and state.step >= s.stop_after:
                bar.close()
                raise KeyboardInterrupt(f"stopped after step {state.step} (stop_after)")
        bar.close()

    def _finish(self, st, eval_src, eval_ids, ppl_kw) -> dict:
        s = self.s
        space = self.space
        best = st["best"]
        # Everything written out is per model unit: usable without knowing the search space.
        final_probs = space.expand(self.policy.probs.detach().float().cpu())
        init_probs = space.expand(st["init_probs"].float().cpu())
        mask, init_mask = space.expand(best["mask"]), space.expand(st["init_mask"])
        search_ppl = masked_perplexity(self.mm, mask.to(self.device), eval_ids,
                                       desc="pruned perplexity (masked)", **ppl_kw)
        meta = {"settings": self._settings_dict(), "probprune_version": __version__,
                "best_step": best["step"]}
        export_pruned(self.model, self.tokenizer, self.layout, mask, s.out, meta)
        reloaded = load_pruned(s.out, dtype=s.dtype, device=s.device)
        pruned = perplexity(reloaded, eval_ids, desc="pruned perplexity (reloaded)", **ppl_kw)
        save_file({"probs": final_probs.contiguous(), "init_probs": init_probs.contiguous()},
                  os.path.join(s.out, "scores.safetensors"))
        save_file({"mask": mask.to(torch.uint8).contiguous(),
                   "init_mask": init_mask.to(torch.uint8).contiguous()},
                  os.path.join(s.out, "masks.safetensors"))
        lay = self.layout
        times = st["step_times"]
        report = {
            "settings": self._settings_dict(),
            "eval_data": eval_src.name,
            "params": {"total": sum(p.numel() for p in self.model.parameters()),
                       "prunable": lay.prunable_params,
                       "kept_prunable": float(lay.kept_params(mask)),
                       "target_prunable": self.budget.total_target,
                       "pruned_model_total": sum(p.numel() for p in reloaded.parameters())},
            "perplexity": {"dense": st["dense"], "init": st["init"], "pruned": pruned.as_dict(),
                           "pruned_masked": search_ppl.as_dict()},
            "val_loss": {"init": st["init_val_loss"], "best": best["val_loss"],
                         "best_step": best["step"]},
            "search_units": {"heads": space.n_heads, "channel_blocks": space.n_blocks,
                             "channel_block": space.channel_block,
                             "layers": space.n_layers if space.include_layers else 0},
            "layers": sizes_of(lay, mask),
            "median_step_s": statistics.median(times) if times else None,
            "steps_timed": len(times),
            "peak_memory_mib": peak_memory_mib(s.device),
            "peak_memory_kind": "cuda max allocated" if self.device.type == "cuda" else "process peak RSS",
            "nan_samples": self.policy.state.nan_samples,
            "skipped_steps": self.policy.state.skipped_steps,
            "model_load_s": self.load_s,
            "backend": s.backend or "auto",
            "backends_available": pk.backends() if callable(getattr(pk, "backends", None)) else None,
        }
        with open(os.path.join(s.out, "report.json.tmp"), "w") as f:
            json.dump(report, f, indent=1)
        os.replace(os.path.join(s.out, "report.json.tmp"), os.path.join(s.out, "report.json"))
        from .report import write_plots

        write_plots(s.out, lay, mask, final_probs, st["history"])
        return report


def prune(settings: PruneSettings) -> dict:
    return Run(settings).run()
