"""Command line of ``python -m bench`` (kept light: heavy imports happen on run)."""
from __future__ import annotations

import argparse
import os
import sys

from .registry import DTYPES, MODEL_REGISTRY, PLANS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the masked ops and one search step against the dense-masked "
                    "baseline and the pruned model; writes bench.json, bench.md and plots.")
    p.add_argument("--out", required=True, help="output folder: bench.json, bench.md, *.png")
    p.add_argument("--quick", action="store_true",
                   help="a reduced set (under 3 min on a 2-core CPU); same as --plan quick")
    p.add_argument("--plan", default="full", choices=PLANS,
                   help="full: the tables of docs/benchmarks.md; quick: reduced; tiny: seconds (the pipeline "
                        "test); gpu-check: kernel micro-benchmarks at LLaMA-7B shapes (a GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU, OpenMP threads waiting for "
                        "each other made timings slower and noisier; 0 = torch's default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per end-to-end case (default: the plan's)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up rounds per end-to-end case (default: the plan's)")
    p.add_argument("--models", default=None,
                   help="comma-separated registry models: keep only their end-to-end settings")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no micro-benchmark case after this many seconds")
    p.add_argument("--skip-micro", action="store_true", help="no micro-benchmarks")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end step benchmark")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--dry-run", action="store_true",
                   help="time nothing: record the cases the plan would time (a GPU plan on a "
                        "machine without one)")
    return p


def _check(args, parser, cuda: bool) -> str:
    """The device; a one-line usage error for settings that cannot run."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a file; it must name a folder")
    device = args.device or ("cuda" if cuda else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not cuda and not args.dry_run:
        parser.error(f"--device {device}: no CUDA device is available here")
    for name, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--threads", args.threads, 0)):
        if value is not None and value < least:
            parser.error(f"{name} must be at least {least}, got {value}")
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.models:
        unknown = sorted(set(args.models.split(",")) - set(MODEL_REGISTRY))
        if unknown:
            parser.error(f"--models: {', '.join(unknown)} not in the registry "
                         f"({', '.join(sorted(MODEL_REGISTRY))})")
    return device


def main(argv=None) -> int:
    """0 when every provider ran; 1 when one raised (its error is in bench.json); 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    device = _check(args, parser, torch.cuda.is_available())

    from .registry import make_plan
    from .report import conditions, e2e_table
    from .run import run_bench

    plan = make_plan("quick" if args.quick else args.plan, device)
    if plan.needs_gpu and not device.startswith("cuda") and not args.dry_run:
        parser.error(f"the {plan.name} plan needs a CUDA device (--dry-run to only list its cases)")
    overrides = {}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    if args.no_memory:
        overrides["memory"] = False
    if args.models:
        keep = set(args.models.split(","))
        overrides["settings"] = tuple(s for s in plan.settings if s.model in keep)
    plan = plan.with_(**overrides)
    threads = None if device.startswith("cuda") or args.threads == 0 else args.threads
    result = run_bench(args.out, plan, device=device, dtype=args.dtype, threads=threads,
                       micro_bench=not args.skip_micro, end_to_end=not args.skip_e2e,
                       plots=not args.no_plots, argv=sys.argv[1:] if argv is None else argv,
                       budget_s=args.budget_s, dry_run=args.dry_run)
    print(conditions(result))
    if result["dry_run"]:
        planned = result["planned"]
        print(f"dry run: nothing timed; the plan has {len(planned['micro'])} micro and "
              f"{len(planned['end_to_end'])} end-to-end cases")
    if result["end_to_end"]:
        print(e2e_table(result["end_to_end"]))
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["phase_s"].items()))
    for msg in result["skipped"]:
        print(f"skipped: {msg}")
    for e in result["errors"]:
        print(f"error: {e['part']} {e['case']} {e['provider']}: {e['error']}")
    print(f"wrote {args.out}/bench.json, {args.out}/bench.md"
          + "".join(f", {p}" for p in result["plots"]) + f" in {result['wall_s']:.0f} s")
    return 1 if result["errors"] else 0
