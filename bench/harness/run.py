"""The benchmark pipeline of ``python -m bench``: micro-benchmarks and the end-to-end step, each
group of cases timed side by side, written to ``DIR/bench.json``, ``DIR/bench.md`` and PNG plots.

A provider that raises becomes an error record (``result["errors"]``) and leaves its rows out;
the other providers still run. The timer is an argument (see :mod:`.timing`)."""
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
from typing import Callable, List, Optional

import torch

from . import micro
from .registry import (DENSE_MASK, LIMIT, OURS, Plan, StepSetting, engine_case, refit_case,
                       step_case_names, torch_dtype)
from .report import machine_info, write_markdown, write_plots
from .timing import error_text, fastest, median, ratio, time_cases

log = logging.getLogger(__name__)
SCHEMA = 1


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def _error(part: str, case: str, provider: str, exc: BaseException) -> dict:
    log.warning("%s %s %s: %s", part, case, provider, error_text(exc))
    return {"part": part, "case": case, "provider": provider, "error": error_text(exc)}


def _first_calls(fns: dict, part: str, case: str, errors: list) -> dict:
    """Calls each case once; returns the outputs of those that did not raise (and drops the
    others from ``fns``)."""
    outputs = {}
    for name in list(fns):
        try:
            outputs[name] = fns[name]()
        except Exception as exc:
            errors.append(_error(part, case, name, exc))
            del fns[name]
    return outputs


# ---------------------------------------------------------------------------------------------
# micro

def run_micro(plan: Plan, device: str, dtype: str, timer: Callable = time_cases,
              errors: Optional[list] = None, skipped: Optional[list] = None,
              deadline: float = math.inf, progress: bool = True) -> List[dict]:
    """One row per (case, provider): median seconds, samples, extra_info and the group's ratios."""
    errors = [] if errors is None else errors
    tdtype = torch_dtype(dtype)
    rows = []
    cases = micro.micro_cases(plan)
    for i, case in enumerate(cases):
        if time.perf_counter() > deadline:
            msg = f"micro: {len(cases) - i} of {len(cases)} cases not started (time budget spent)"
            log.warning(msg)
            if skipped is not None:
                skipped.append(msg)
            break
        try:
            data = micro.CaseData(case, device, tdtype)
        except Exception as exc:
            errors.append(_error("micro", case.group, "(inputs)", exc))
            continue
        fns = {}
        for p in micro.providers_for(case.op, device):
            try:
                fns[p] = micro.make_provider(case, p, data)
            except Exception as exc:
                errors.append(_error("micro", case.group, p, exc))
        checks = _check_outputs(case, data, fns, errors) if plan.check_outputs else {}
        times, failed = timer(fns, plan.micro_rounds, device)
        errors += [_error("micro", case.group, p, exc) for p, exc in failed.items()]
        del fns, data
        medians = {p: median(t) for p, t in times.items()}
        ratios = micro.group_ratios(medians)
        for p, samples in times.items():
            info = micro.extra_info(case, p, device, tdtype)
            row = {**info, "median_s": medians[p], "samples_s": samples, **checks.get(p, {})}
            if p.startswith(OURS) and info["backend"] in ratios:
                row.update(ratios[info["backend"]])
            rows.append(row)
        if i % 8 == 7 or i == len(cases) - 1:
            _say(progress, f"  micro {i + 1}/{len(cases)}: {case.group}")
    return rows


def _check_outputs(case, data, fns: dict, errors: list) -> dict:
    """{provider: its output against the reference backend's} for the probprune providers; those
    that raise are dropped from ``fns``."""
    ours = {p: fn for p, fn in fns.items() if p.startswith(OURS)}
    outputs = _first_calls(ours, "micro", case.group, errors)
    for p in [p for p in fns if p.startswith(OURS) and p not in outputs]:
        del fns[p]
    ref = outputs.get(OURS + "reference")
    if ref is None:
        return {}
    checks = {p: micro.compare_outputs(case.op, out, ref, data) for p, out in outputs.items()}
    for p, check in checks.items():
        problem = micro.output_problem(check, data.dtype)
        if problem:  # a wrong result fails the run (exit 1), its timing is still reported
            log.warning("micro %s %s: %s", case.group, p, problem)
            errors.append({"part": "micro", "case": case.group, "provider": p, "error": problem})
    return checks


# ---------------------------------------------------------------------------------------------
# end to end

def _by_model(settings) -> "OrderedDict[str, List[StepSetting]]":
    groups: "OrderedDict[str, List[StepSetting]]" = OrderedDict()
    for s in settings:
        groups.setdefault(s.model, []).append(s)
    return groups


def run_end_to_end(plan: Plan, device: str, dtype: str, workdir: str, threads: Optional[int],
                   timer: Callable = time_cases, errors: Optional[list] = None,
                   skipped: Optional[list] = None, phases: Optional[dict] = None,
                   progress: bool = True) -> List[dict]:
    """One row per (setting, engine backend), with (a), (b), (c) times, ratios and memory.

    Per model: build, export the pruned models, time every setting. Then, on the CPU, one fresh
    process measures the memory of every case (one process start instead of one per model)."""
    import transformers

    from . import e2e  # the engine; the micro-benchmarks need only probprune_kernels

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every reload
    errors = [] if errors is None else errors
    backends = micro.bench_backends(device)
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
            cases, facts = e2e.setting_cases(model, s, backends, pruned_dirs[s.sparsity], dtype)
            # The first call of each case gives its losses (a and b must agree) and counts as
            # the first warm-up round.
            losses = _first_calls(cases, "end_to_end", s.label, errors)
            times, failed = timer(cases, plan.step_rounds, device)
            errors += [_error("end_to_end", s.label, name, exc) for name, exc in failed.items()]
            mem = {}
            if plan.memory and not device.startswith("cpu"):
                mem = {name: e2e.work_memory_mib(cases[name], device) for name in times}
            pending.append((s, times, losses, facts, mem))
            del cases
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


def _memory_entry(weights_mib: float, work: Optional[float]) -> dict:
    return {"weights_mib": weights_mib, "work_mib": work,
            "peak_mib": None if work is None else weights_mib + work}


def _loss_gap(losses: dict, a: str, b: str) -> float:
    if a not in losses or b not in losses:
        return float("nan")
    return float((losses[a] - losses[b]).abs().max())


def _step_rows(s: StepSetting, backends, device, dtype, times, losses, facts, mem) -> List[dict]:
    med = {name: median(t) for name, t in times.items()}
    low = {name: fastest(t) for name, t in times.items()}
    a, c = med.get(DENSE_MASK, math.nan), med.get(LIMIT, math.nan)  # nan: that case raised
    rows = []
    for b in backends:
        name = engine_case(b)
        if name not in times:  # it raised: an error record says why
            continue
        t_b = med[name]
        refit = refit_case(b)
        memory = {case: _memory_entry(facts["weights_mib"][case], mem.get(case))
                  for case in (DENSE_MASK, name, refit, LIMIT) if case in facts["weights_mib"]}
        peak_a, peak_b = memory[DENSE_MASK]["peak_mib"], memory[name]["peak_mib"]
        rows.append({
            "model": s.model, "batch": s.batch, "seqlen": s.seqlen, "K": s.K,
            "sparsity": s.sparsity, "backend": b, "device": device, "dtype": dtype,
            "params": facts["params"], "prunable_params": facts["prunable_params"],
            "pruned_params": facts["pruned_params"], "hard_mask_kept": facts["hard_mask_kept"],
            "sampled_masks_kept": facts["sampled_masks_kept"],
            "time_s": {"dense_mask": a, "engine": t_b, "limit": c,
                       "engine_refit": med.get(refit, math.nan)},
            "samples_s": {"dense_mask": times.get(DENSE_MASK, []), "engine": times[name],
                          "limit": times.get(LIMIT, [])},
            "vs_dense_mask": ratio(t_b, a),
            "vs_limit": ratio(t_b, c),
            # --search-loss refit's step against the bare one, side by side
            "refit_vs_engine": ratio(med.get(refit, math.nan), t_b),
            # the same ratios from the fastest sample of each case: load from other processes
            # only adds time, so these bound what a quiet machine would show
            "vs_dense_mask_min": ratio(low[name], low.get(DENSE_MASK)),
            "vs_limit_min": ratio(low[name], low.get(LIMIT)),
            "limit_vs_dense_mask": ratio(c, a),
            "memory": {"dense_mask": memory[DENSE_MASK], "engine": memory[name],
                       "engine_refit": memory.get(refit), "limit": memory[LIMIT]},
            "mem_vs_dense_mask": None if peak_a is None or peak_b is None else peak_b / peak_a,
            "loss_gap": _loss_gap(losses, name, DENSE_MASK),
        })
    return rows


# ---------------------------------------------------------------------------------------------

def planned_cases(plan: Plan, device: str) -> dict:
    """What a run of the plan would time (a dry run's record)."""
    backends = micro.bench_backends(device)
    steps = step_case_names(backends)
    return {"micro": [f"{c.group} {p}" for c, p in micro.micro_params(plan, device)],
            "end_to_end": [f"{s.label} {p}" for s in plan.settings for p in steps]}


def run_bench(out: str, plan: Plan, device: str = "cpu", dtype: Optional[str] = None,
              threads: Optional[int] = None, micro_bench: bool = True, end_to_end: bool = True,
              plots: bool = True, progress: bool = True, argv: Optional[List[str]] = None,
              timer: Callable = time_cases, budget_s: Optional[float] = None,
              dry_run: bool = False) -> dict:
    """Runs the plan and writes ``out/bench.json``, ``out/bench.md`` and plots; returns the json.

    ``budget_s``: no micro case is started after this many seconds. ``dry_run``: times nothing,
    records what would be timed."""
    os.makedirs(out, exist_ok=True)
    dtype = dtype or plan.dtype or default_dtype(device)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    deadline = math.inf if budget_s is None else t0 + budget_s
    result = {"schema": SCHEMA, "plan": plan.name, "command": argv, "dry_run": dry_run,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": {"device": device, "dtype": dtype, "warmup": plan.warmup,
                           "repeats": plan.repeats, "micro_warmup": plan.micro_warmup,
                           "micro_repeats": plan.micro_repeats,
                           "micro_tokens": list(plan.micro_tokens),
                           "gpu_warmup_ms": plan.gpu_warmup_ms, "gpu_rep_ms": plan.gpu_rep_ms,
                           "timer": _timer_name(timer, device)},
              "machine": machine_info(device), "micro": [], "end_to_end": [], "skipped": [],
              "errors": []}
    phases = result["phase_s"] = {}
    if dry_run:
        result["planned"] = planned_cases(plan, device)
        micro_bench = end_to_end = plots = False
    if micro_bench:
        _say(progress, f"micro-benchmarks ({plan.name} plan, {device}, {dtype})")
        t = time.perf_counter()
        result["micro"] = run_micro(plan, device, dtype, timer, result["errors"],
                                    result["skipped"], deadline, progress)
        phases["micro"] = time.perf_counter() - t
    if end_to_end and plan.settings:
        _say(progress, f"end-to-end step ({len(plan.settings)} settings)")
        workdir = tempfile.mkdtemp(prefix=".bench-work-", dir=out)
        try:
            result["end_to_end"] = run_end_to_end(plan, device, dtype, workdir, threads, timer,
                                                  result["errors"], result["skipped"], phases,
                                                  progress)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = _loadavg()
    result["wall_s"] = time.perf_counter() - t0
    result["plots"] = write_plots(out, result) if plots else []
    _write_json(os.path.join(out, "bench.json"), result)
    write_markdown(os.path.join(out, "bench.md"), result)
    return result


def _timer_name(timer: Callable, device: str) -> str:
    if timer is not time_cases:
        return getattr(timer, "__name__", repr(timer))
    if device.startswith("cuda"):
        return "micro: triton.testing.do_bench per case; steps: CUDA events, interleaved"
    return "wall clock, cases interleaved"


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
