"""End-to-end step benchmark: the K loss evaluations of one policy-gradient step, three ways
(the step providers of :mod:`.registry`), on the same model, batch, K masks and sparsity:

(a) ``dense-mask``: :class:`probprune.baseline.DenseMaskedLM`, K dense forwards with the masks
    multiplied into the activations (the paper code's way);
(b) ``engine-<backend>``: :class:`probprune.forward.MaskedCausalLM`, one K-mask forward;
(c) ``pruned-limit``: K forwards (with labels) of the physically pruned model that
    ``export_pruned`` writes for the hard mask at that sparsity and ``load_pruned`` reads back.

The masks: keep-probabilities drawn at random (seeded) and projected onto the budget; (a) and (b)
get the same K Bernoulli masks from them, (c) the hard mask. ``vs_dense_mask`` = b / a and
``vs_limit`` = b / c, from medians timed side by side.

Memory: on a GPU ``torch.cuda.max_memory_allocated`` around one call; on the CPU a child process
(``bench.harness.memchild``) with glibc's mmap threshold pinned low, so freed blocks go back to
the OS and the peak RSS rise during one call after a warm-up call (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``) is that call's working memory. Reported per case: the weights it reads
(``weights_mib``), that working memory (``work_mib``) and their sum (``peak_mib``).

What this module uses of the engine (and nothing else of it): ``load_model`` and ``load_pruned``
(:mod:`probprune.models`), ``MaskedCausalLM(model, backend=)`` with ``.losses`` and ``.units``
(the model units: ``n_units``, ``prunable_params``, ``kept_params``), ``DenseMaskedLM(model)
.losses``, ``Budget.build(units, sparsity)`` with ``project`` and ``hard_mask``, and
``export_pruned(model, tokenizer, units, mask, out_dir, metadata=)``.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from probprune.baseline import DenseMaskedLM
from probprune.budget import Budget
from probprune.compensate import input_grams
from probprune.export import export_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned

from .registry import DENSE_MASK, LIMIT, StepSetting, engine_case, llama_config, model_shape, \
    refit_case, torch_dtype

log = logging.getLogger(__name__)
REFIT_DAMPING = 0.01  # --compensate-damping's default

# the checkout holding the (not installed) bench package, for the memory child's imports
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# models

def build_model(name: str, dtype: str = "float32", device="cpu", seed: int = 0):
    """A registry model: the embedded checkpoint, or random weights built in memory (no hub)."""
    shape = model_shape(name)
    if shape["source"] == "embedded":
        model, _ = load_model(name, dtype=dtype, device=device)
        cfg = model.config
        for key, value in shape.items():
            if key != "source" and getattr(cfg, key, value) != value:
                log.warning("registry entry %s.%s=%s differs from the checkpoint's %s", name, key,
                            value, getattr(cfg, key))
        return model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(name), dtype=torch_dtype(dtype))
    return model.eval()


def model_units(model):
    """The engine's model units of a model (masks, budget and export all index units by them)."""
    return MaskedCausalLM(model).units


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# masks and inputs of a setting (a deterministic function of the setting)

def setting_inputs(units, setting: StepSetting, vocab: int, seed: int = 0):
    """(input_ids [B, T], K sampled masks, hard mask) for a setting; masks over model units."""
    g = torch.Generator().manual_seed(seed)
    budget = Budget.build(units, setting.sparsity)
    z = torch.randn(units.n_units, generator=g, dtype=torch.float64)
    probs = budget.project(torch.sigmoid(z))
    masks = torch.rand(setting.K, units.n_units, generator=g, dtype=torch.float64) < probs
    hard = budget.hard_mask(probs)
    ids = torch.randint(0, vocab, (setting.batch, setting.seqlen), generator=g)
    return ids, masks, hard


def export_limit(model, setting: StepSetting, workdir: str, seed: int = 0) -> str:
    """Exports the physically pruned model of the setting's hard mask; returns its directory."""
    units = model_units(model)
    _, _, hard = setting_inputs(units, setting, model.config.vocab_size, seed)
    out = os.path.join(workdir, f"{setting.model}-s{setting.sparsity:g}")
    if not os.path.isfile(os.path.join(out, "probprune.json")):
        export_pruned(model, None, units, hard, out,
                      metadata={"bench": True, "sparsity": setting.sparsity})
    return out


def providers(model, ids: torch.Tensor, masks: torch.Tensor, pruned,
              backends: List[str]) -> Dict[str, Callable[[], torch.Tensor]]:
    """The step providers on one batch: callables returning the K losses.

    ``pruned`` computes the losses of the one mask it was exported for, K times over."""
    dense = DenseMaskedLM(model)
    cases: Dict[str, Callable[[], torch.Tensor]] = {DENSE_MASK: lambda: dense.losses(ids, masks)}
    for b in backends:
        engine = MaskedCausalLM(model, backend=b)
        cases[engine_case(b)] = (lambda e: lambda: e.losses(ids, masks))(engine)
    for b in backends:
        # Input statistics of the step's own windows: the solves cost the same on any Gram.
        engine = MaskedCausalLM(model, backend=b)
        engine.use_refits(input_grams(engine, ids, batch_size=ids.shape[0], progress=False),
                          REFIT_DAMPING)
        cases[refit_case(b)] = (lambda e: lambda: e.losses(ids, masks))(engine)
    K = masks.shape[0]

    @torch.no_grad()
    def limit():
        return torch.stack([pruned(ids, labels=ids, use_cache=False).loss.float()
                            for _ in range(K)])

    cases[LIMIT] = limit
    return cases


def step_cases(model, setting: StepSetting, backends: List[str], pruned,
               seed: int = 0) -> Tuple[Dict[str, Callable[[], torch.Tensor]], dict]:
    """The providers of one setting on its inputs, and facts about it."""
    device = model.lm_head.weight.device
    units = model_units(model)
    ids, masks, hard = setting_inputs(units, setting, model.config.vocab_size, seed)
    cases = providers(model, ids.to(device), masks.to(device), pruned, backends)
    prunable = units.prunable_params
    facts = {"params": param_count(model), "prunable_params": prunable,
             "pruned_params": param_count(pruned),
             "hard_mask_kept": float(units.kept_params(hard)) / prunable,
             "sampled_masks_kept": [float(units.kept_params(m)) / prunable for m in masks],
             "weights_mib": {**{name: weight_bytes(model) / 2**20 for name in cases},
                             LIMIT: weight_bytes(pruned) / 2**20}}
    return cases, facts


def setting_cases(model, setting: StepSetting, backends: List[str], pruned_dir: str, dtype: str,
                  seed: int = 0):
    """:func:`step_cases` with the pruned model read back from its export."""
    pruned = load_pruned(pruned_dir, dtype=dtype, device=model.lm_head.weight.device)
    return step_cases(model, setting, backends, pruned, seed)


# ---------------------------------------------------------------------------------------------
# memory

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def work_memory_mib(fn: Callable, device) -> Optional[float]:
    """Peak memory added by one call of ``fn`` over what was allocated before it, in MiB.

    CUDA: ``max_memory_allocated``. CPU: the peak-RSS rise (meaningful in the memory child, where
    freed memory returns to the OS); None where Linux's peak-RSS reset is unavailable."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _status_kib("VmRSS")
    fn()
    # The kernel raises the high-water mark lazily, and pages freed between the reset and the
    # read of the base can leave it a few KiB under the base: a call that adds nothing is 0.
    return max(0.0, (_status_kib("VmHWM") - base) / 1024)


def memory_in_child(models, backends: List[str], dtype: str, threads: Optional[int],
                    seed: int = 0, timeout: float = 3600) -> Dict[StepSetting, Dict[str, float]]:
    """Runs every case once in a fresh process; {setting: {case: work MiB}}.

    ``models``: [(model name, (settings, {sparsity: pruned dir}))]."""
    spec = {"dtype": dtype, "threads": threads, "seed": seed, "backends": backends,
            "models": [{"model": name,
                        "settings": [dict(vars(s), pruned_dir=dirs[s.sparsity]) for s in settings]}
                       for name, (settings, dirs) in models]}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.harness.memchild"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    settings = [s for _, (ss, _) in models for s in ss]
    return dict(zip(settings, rows))


def child_main(spec: dict) -> List[Dict[str, Optional[float]]]:
    """The memory child: builds each model and its settings' cases, measures one call of each."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rows = []
    for entry in spec["models"]:
        model = build_model(entry["model"], spec["dtype"], "cpu", spec["seed"])
        for s in entry["settings"]:
            s = dict(s)
            pruned_dir = s.pop("pruned_dir")
            cases, _ = setting_cases(model, StepSetting(**s), spec["backends"], pruned_dir,
                                     spec["dtype"], spec["seed"])
            row = {}
            for name, fn in cases.items():
                fn()  # warm-up: faults in mmap-loaded weights, one-time library buffers
                row[name] = work_memory_mib(fn, "cpu")
            rows.append(row)
            del cases
            gc.collect()
        del model
        gc.collect()
    return rows
