"""Arguments and entry of ``probprune-fast bench`` (kept light: heavy imports happen on run)."""
from __future__ import annotations

import argparse
import sys


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder: bench.json, bench.md, *.png")
    p.add_argument("--quick", action="store_true",
                   help="a reduced set (under 3 min on a 2-core CPU); same as --plan quick")
    p.add_argument("--plan", default="full", choices=["full", "quick", "tiny"],
                   help="full: the README table; quick: reduced; tiny: seconds (the pipeline test)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
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
    p.add_argument("--skip-micro", action="store_true", help="no micro-benchmarks")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end step benchmark")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")


def cmd_bench(args) -> int:
    import torch

    from .registry import make_plan
    from .report import conditions, e2e_table
    from .run import run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = make_plan("quick" if args.quick else args.plan, device)
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
                       plots=not args.no_plots, argv=sys.argv[1:])
    print(conditions(result))
    if result["end_to_end"]:
        print(e2e_table(result["end_to_end"]))
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["phase_s"].items()))
    for msg in result["skipped"]:
        print(f"skipped: {msg}")
    print(f"wrote {args.out}/bench.json, {args.out}/bench.md"
          + "".join(f", {p}" for p in result["plots"]) + f" in {result['wall_s']:.0f} s")
    return 0
