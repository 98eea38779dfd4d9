"""Micro-benchmarks: every op x backend x baseline, keep ratios and K from the plan, shapes from
the registry (LLaMA-7B/13B layers on a GPU, SmolLM2 layers on the CPU).

Rounds and iterations follow the plan (``micro_repeats`` rounds, iterations so that a round lasts
at least ``micro_min_time``), as in ``python -m bench``: pytest-benchmark's own calibration
took minutes per microsecond-scale case on a loaded CPU."""
import math
import time

from bench.harness import micro
from bench.harness.registry import torch_dtype
from bench.harness.timing import synchronize


def test_op(benchmark, micro_case, device, dtype, plan):
    case, provider = micro_case
    tdtype = torch_dtype(dtype)
    fn = micro.setup(case, [provider], device, tdtype)[provider]

    def run():
        fn()
        synchronize(device)

    run()  # first call outside the timing (Triton compilation / autotuning)
    t0 = time.perf_counter()
    run()
    once = time.perf_counter() - t0
    iterations = max(1, min(1000, math.ceil(plan.micro_min_time / max(once, 1e-7))))
    benchmark.group = case.group
    benchmark.extra_info.update(micro.extra_info(case, provider, device, tdtype))
    benchmark.pedantic(run, rounds=max(plan.micro_repeats, 1), iterations=iterations,
                       warmup_rounds=plan.micro_warmup)
