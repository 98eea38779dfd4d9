"""The ``probprune-fast bench`` pipeline: micro-benchmarks and end-to-end step benchmark, timed side
by side, written to ``DIR/bench.json``, ``DIR/bench.md`` and PNG plots."""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from typing import List, Optional

import torch

from ..models import resolve_dtype
from . import e2e, micro
from .registry import Plan, StepSetting
from .report import machine_info, write_markdown, write_plots
from .timing import median, ratio, time_interleaved

log = logging.getLogger(__name__)
SCHEMA = 1


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


# ---------------------------------------------------------------------------------------------
# micro

def run_micro(plan: Plan, device: str, dtype: str, progress: bool = True) -> List[dict]:
    """One row per (case, provider): median seconds, samples, extra_info and the group's ratios."""
    tdtype = resolve_dtype(dtype)
    rows = []
    cases = micro.micro_cases(plan)
    for i, case in enumerate(cases):
        providers = micro.providers_for(case.op, device)
        fns = micro.setup(case, providers, device, tdtype)
        times = time_interleaved(fns, warmup=plan.micro_warmup, repeats=plan.micro_repeats,
                                 device=device, min_time=plan.micro_min_time)
        del fns
        medians = {p: median(t) for p, t in times.items()}
        ratios = micro.group_ratios(medians)
        for p in providers:
            info = micro.extra_info(case, p, device, tdtype)
            row = {**info, "median_s": medians[p], "samples_s": times[p]}
            b = info["backend"]
            if p.startswith("probprune-") and b in ratios:
                row.update(ratios[b])
            rows.append(row)
        if progress and (i % 8 == 7 or i == len(cases) - 1):
            _say(progress, f"  micro {i + 1}/{len(cases)}: {case.group}")
    return rows


# ---------------------------------------------------------------------------------------------
# end to end

def _by_model(settings) -> "OrderedDict[str, List[StepSetting]]":
    groups: "OrderedDict[str, List[StepSetting]]" = OrderedDict()
    for s in settings:
        groups.setdefault(s.model, []).append(s)
    return groups


def run_end_to_end(plan: Plan, device: str, dtype: str, workdir: str, threads: Optional[int],
                   progress: bool = True, skipped: Optional[list] = None,
                   phases: Optional[dict] = None) -> List[dict]:
    """One row per (setting, engine backend), with (a), (b), (c) times, ratios and memory.

    Per model: build, export the pruned models, time every setting. Then, on the CPU, one fresh
    process measures the memory of every case (one process start instead of one per model)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every reload
    backends = e2e.engine_backends(device)
    phases = {} if phases is None else phases
    pending = []  # (setting, times, losses, facts, memory) until the CPU memory child has run
    exported = OrderedDict()
    for model_name, settings in _by_model(plan.settings).items():
        t = time.perf_counter()
        try:
            model = e2e.build_model(model_name, dtype, device)
        except (FileNotFoundError, OSError) as exc:  # embedded model not installed
            msg = f"{model_name}: skipped ({exc})"
            log.warning(msg)
            if skipped is not None:
                skipped.append(msg)
            continue
        pruned_dirs = {s.sparsity: e2e.export_limit(model, s, workdir) for s in settings}
        exported[model_name] = (settings, pruned_dirs)
        for s in settings:
            _say(progress, f"  step {s.label}")
            pruned = e2e.load_pruned(pruned_dirs[s.sparsity], dtype=dtype, device=device)
            cases, facts = e2e.step_cases(model, s, backends, pruned)
            # The first call of each case gives its losses (a and b must agree) and counts as
            # the first warm-up round.
            losses = {name: fn() for name, fn in cases.items()}
            times = time_interleaved(cases, warmup=max(0, plan.warmup - 1), repeats=plan.repeats,
                                     device=device)
            mem = {}
            if plan.memory and not device.startswith("cpu"):
                mem = {name: e2e.work_memory_mib(fn, device) for name, fn in cases.items()}
            pending.append((s, times, losses, facts, mem))
            del cases, pruned
            gc.collect()
        phases[f"time {model_name}"] = time.perf_counter() - t
        del model
        gc.collect()
    if plan.memory and device.startswith("cpu") and exported:
        _say(progress, "  memory of every case (one fresh process)")
        t = time.perf_counter()
        try:
            memory = e2e.memory_in_child(list(exported.items()), backends, dtype, threads)
        except Exception as exc:  # memory is reported as missing, the timings still count
            log.warning("memory measurement failed: %s", exc)
            memory = {}
        for s, _, _, _, mem in pending:
            mem.update(memory.get(s, {}))
        phases["memory"] = time.perf_counter() - t
    rows = []
    for s, times, losses, facts, mem in pending:
        rows += _step_rows(s, backends, device, dtype, times, losses, facts, mem)
    return rows


def _fastest(samples: List[float]) -> float:
    return min(samples) if samples else float("nan")


def _memory_entry(weights_mib: float, work: Optional[float]) -> dict:
    return {"weights_mib": weights_mib, "work_mib": work,
            "peak_mib": None if work is None else weights_mib + work}


def _step_rows(s: StepSetting, backends, device, dtype, times, losses, facts, mem) -> List[dict]:
    med = {name: median(t) for name, t in times.items()}
    a, c = med[e2e.DENSE_MASK], med[e2e.LIMIT]
    rows = []
    for b in backends:
        name = e2e.engine_case(b)
        t_b = med[name]
        memory = {case: _memory_entry(facts["weights_mib"][case], mem.get(case))
                  for case in (e2e.DENSE_MASK, name, e2e.LIMIT)}
        peak_a, peak_b = memory[e2e.DENSE_MASK]["peak_mib"], memory[name]["peak_mib"]
        rows.append({
            "model": s.model, "batch": s.batch, "seqlen": s.seqlen, "K": s.K,
            "sparsity": s.sparsity, "backend": b, "device": device, "dtype": dtype,
            "params": facts["params"], "prunable_params": facts["prunable_params"],
            "pruned_params": facts["pruned_params"], "hard_mask_kept": facts["hard_mask_kept"],
            "sampled_masks_kept": facts["sampled_masks_kept"],
            "time_s": {"dense_mask": a, "engine": t_b, "limit": c},
            "samples_s": {"dense_mask": times[e2e.DENSE_MASK], "engine": times[name],
                          "limit": times[e2e.LIMIT]},
            "vs_dense_mask": ratio(t_b, a),
            "vs_limit": ratio(t_b, c),
            # the same ratios from the fastest sample of each case: load from other processes
            # only adds time, so these bound what a quiet machine would show
            "vs_dense_mask_min": ratio(_fastest(times[name]), _fastest(times[e2e.DENSE_MASK])),
            "vs_limit_min": ratio(_fastest(times[name]), _fastest(times[e2e.LIMIT])),
            "limit_vs_dense_mask": ratio(c, a),
            "memory": {"dense_mask": memory[e2e.DENSE_MASK], "engine": memory[name],
                       "limit": memory[e2e.LIMIT]},
            "mem_vs_dense_mask": None if peak_a is None or peak_b is None else peak_b / peak_a,
            "loss_gap": float((losses[name] - losses[e2e.DENSE_MASK]).abs().max()),
        })
    return rows


# ---------------------------------------------------------------------------------------------

def run_bench(out: str, plan: Plan, device: str = "cpu", dtype: Optional[str] = None,
              threads: Optional[int] = None, micro_bench: bool = True, end_to_end: bool = True,
              plots: bool = True, progress: bool = True, argv: Optional[List[str]] = None) -> dict:
    """Runs the plan and writes ``out/bench.json``, ``out/bench.md`` and plots; returns the json."""
    os.makedirs(out, exist_ok=True)
    dtype = dtype or plan.dtype or default_dtype(device)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = {"schema": SCHEMA, "plan": plan.name, "command": argv,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": {"device": device, "dtype": dtype, "warmup": plan.warmup,
                           "repeats": plan.repeats, "micro_warmup": plan.micro_warmup,
                           "micro_repeats": plan.micro_repeats,
                           "micro_tokens": list(plan.micro_tokens)},
              "machine": machine_info(device), "micro": [], "end_to_end": [], "skipped": []}
    phases = result["phase_s"] = {}
    if micro_bench:
        _say(progress, f"micro-benchmarks ({plan.name} plan, {device}, {dtype})")
        t = time.perf_counter()
        result["micro"] = run_micro(plan, device, dtype, progress)
        phases["micro"] = time.perf_counter() - t
    if end_to_end:
        _say(progress, f"end-to-end step ({len(plan.settings)} settings)")
        workdir = tempfile.mkdtemp(prefix=".bench-work-", dir=out)
        try:
            result["end_to_end"] = run_end_to_end(plan, device, dtype, workdir, threads, progress,
                                                  result["skipped"], phases)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = _loadavg()
    result["wall_s"] = time.perf_counter() - t0
    result["plots"] = write_plots(out, result) if plots else []
    _write_json(os.path.join(out, "bench.json"), result)
    write_markdown(os.path.join(out, "bench.md"), result)
    return result


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _clean(obj):
    """NaN/inf (a missing baseline) become null: bench.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1, default=str, allow_nan=False)
    os.replace(tmp, path)
