"""Side-by-side timing: warm-up, then repeats that visit every case in turn (rotating the order),
median per case. On a shared machine a load spike then hits all cases of a comparison alike,
which is what keeps the ratios meaningful."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List

import torch


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, n: int, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / n


def time_interleaved(fns: Dict[str, Callable], *, warmup: int = 1, repeats: int = 3,
                     device="cpu", min_time: float = 0.0) -> Dict[str, List[float]]:
    """Seconds per call of each case, ``repeats`` samples each.

    ``warmup`` untimed rounds first (compilation, autotuning, lazy allocation). A sample calls the
    case ``n`` times, ``n`` chosen once so a sample lasts at least ``min_time`` (short GPU kernels);
    on the CPU the end-to-end cases use ``min_time=0`` (one call per sample).
    """
    names = list(fns)
    last = {name: 0.0 for name in names}
    for _ in range(warmup):
        for name in names:
            last[name] = _timed(fns[name], 1, device)
    inner = {name: 1 for name in names}
    if min_time > 0:
        for name in names:
            t = last[name] if warmup else _timed(fns[name], 1, device)
            inner[name] = max(1, min(1000, math.ceil(min_time / max(t, 1e-7))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(fns[name], inner[name], device))
    return times


def median(samples: List[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def ratio(num: float, den: float) -> float:
    if den is None or num is None or not den or math.isnan(den) or math.isnan(num):
        return float("nan")
    return num / den
