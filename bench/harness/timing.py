"""Timing of a group of cases that are compared with each other.

CPU: warm-up, then repeats that visit every case in turn (rotating the order), wall clock around
the calls. On a shared machine a load spike then hits all cases of a comparison alike, which is
what keeps the ratios meaningful. GPU: ``triton.testing.do_bench`` per case (it flushes the L2
cache between runs) for the kernels; the same interleaved scheme with CUDA events as the clock for
whole steps (and without Triton).

A timer is ``timer(fns, rounds, device) -> (samples, errors)``: seconds per call of each case, and
the exception of each case that raised (its samples are left out). The runner takes the timer as
an argument, so a test can hand it a fake one.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from .registry import Rounds

Samples = Dict[str, List[float]]
Errors = Dict[str, BaseException]


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, n: int, device) -> float:
    """Seconds per call, over ``n`` calls."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def time_interleaved(fns: Dict[str, Callable], rounds: Rounds, device="cpu") -> Tuple[Samples, Errors]:
    """``rounds.repeats`` samples of each case.

    ``rounds.warmup`` untimed rounds first (compilation, autotuning, lazy allocation). A sample
    calls the case ``n`` times, ``n`` chosen once so a sample lasts at least ``rounds.min_time``
    (short kernels); the end-to-end cases use ``min_time=0`` (one call per sample).
    """
    errors: Errors = {}
    last = {name: 0.0 for name in fns}

    def sample(name: str, n: int) -> None:
        try:
            last[name] = _timed(fns[name], n, device)
        except Exception as exc:  # reported as the case's error; the other cases go on
            errors[name] = exc

    def live(names):
        return [name for name in names if name not in errors]

    for _ in range(rounds.warmup):
        for name in live(fns):
            sample(name, 1)
    inner = {name: 1 for name in fns}
    if rounds.min_time > 0:
        for name in live(fns):
            if not rounds.warmup:
                sample(name, 1)
            inner[name] = max(1, min(1000, math.ceil(rounds.min_time / max(last[name], 1e-7))))
    names = list(fns)
    times: Samples = {name: [] for name in names}
    for r in range(rounds.repeats):
        shift = r % len(names) if names else 0
        for name in live(names[shift:] + names[:shift]):
            sample(name, inner[name])
            if name not in errors:
                times[name].append(last[name])
    return {name: t for name, t in times.items() if name not in errors}, errors


def time_do_bench(fns: Dict[str, Callable], rounds: Rounds, device) -> Tuple[Samples, Errors]:
    """Each case through ``triton.testing.do_bench``: its per-run times are the samples."""
    from triton.testing import do_bench

    times: Samples = {}
    errors: Errors = {}
    for name, fn in fns.items():
        try:
            ms = do_bench(fn, warmup=rounds.warmup_ms, rep=rounds.rep_ms, return_mode="all")
            times[name] = [t / 1e3 for t in ms]
        except Exception as exc:
            errors[name] = exc
    return times, errors


def _has_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
        return True
    except ImportError:
        return False


def time_cases(fns: Dict[str, Callable], rounds: Rounds, device="cpu") -> Tuple[Samples, Errors]:
    """The default timer: ``do_bench`` on a GPU when the rounds ask for it and Triton is there,
    else interleaved rounds."""
    if torch.device(device).type == "cuda" and rounds.do_bench and _has_triton():
        return time_do_bench(fns, rounds, device)
    return time_interleaved(fns, rounds, device)


def median(samples: List[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def fastest(samples: List[float]) -> float:
    return min(samples) if samples else float("nan")


def ratio(num, den) -> float:
    if den is None or num is None or not den or math.isnan(den) or math.isnan(num):
        return float("nan")
    return num / den


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
