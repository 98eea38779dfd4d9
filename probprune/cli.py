"""``probprune-fast``: the command line.

    probprune-fast eval  --model smollm2-135m --data wikitext2 --seqlen 128
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from . import __version__


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_libraries() -> None:
    """Silences the progress bars of transformers and datasets (for machine-readable output)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face directory or hub name, a probprune pruned directory, or the "
                        "embedded 'smollm2-135m'")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights and activations dtype (default: float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_eval_args(p: argparse.ArgumentParser, data_flag: str = "--data") -> None:
    p.add_argument(data_flag, dest="data", default="wikitext2",
                   help="evaluation text: wikitext2 (hub, or the local file of --data-file / "
                        "$PROBPRUNE_WIKITEXT2), wiki-summaries (held-out part), or a local "
                        ".txt/.raw/.jsonl/.json file or folder (default: wikitext2)")
    p.add_argument("--data-file", default=None,
                   help="local copy of the evaluation text, e.g. wikitext-2-raw/wiki.test.raw")
    p.add_argument("--seqlen", type=int, default=128, help="window length in tokens (default: 128)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows (a quick look)")
    p.add_argument("--eval-batch-size", type=int, default=8,
                   help="windows per forward during evaluation (default: 8)")


def cmd_eval(args) -> int:
    from .data import eval_text, tokenize_joined
    from .evaluate import perplexity
    from .models import load_model

    if args.json:
        quiet_libraries()
    device = args.device or default_device()
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    load_s = time.perf_counter() - t0
    text = eval_text(args.data, args.data_file)
    ids = tokenize_joined(tokenizer, [text.text])
    result = perplexity(model, ids, seqlen=args.seqlen, batch_size=args.eval_batch_size,
                        max_windows=args.max_windows, device=device, progress=not args.json)
    record = {"model": args.model, "data": text.name, **result.as_dict(),
              "dtype": args.dtype, "device": device, "load_s": round(load_s, 2)}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{args.model} on {text.name}: perplexity {result.ppl:.3f} "
              f"(mean NLL {result.nll:.4f} over {result.tokens:,} predicted tokens in "
              f"{result.windows:,} windows of {result.seqlen}; model loaded in {load_s:.1f} s)")
    return 0


def _int_list(text: str):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}")


def cmd_prune(args) -> int:
    from .search import PruneSettings, prune

    if args.json:
        quiet_libraries()
    settings = PruneSettings(
        model=args.model, sparsity=args.sparsity, out=args.out, steps=args.steps, k=args.k,
        batch_size=args.batch_size, seqlen=args.seqlen, calib=args.calib, nsamples=args.nsamples,
        val_windows=args.val_windows, eval=args.data, eval_file=args.data_file,
        max_eval_windows=args.max_windows, eval_batch_size=args.eval_batch_size, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, init=args.init, init_temperature=args.init_temperature,
        init_attn_sparsity=args.init_attn_sparsity, channel_block=args.channel_block,
        budget=args.budget, scope=args.scope, attn_sparsity=args.attn_sparsity,
        mlp_sparsity=args.mlp_sparsity, prune_layers=args.prune_layers,
        protect_layers=args.protect_layers, baseline=args.baseline, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, device=args.device or default_device(),
        dtype=args.dtype, backend=args.backend, seed=args.seed, resume=args.resume,
        progress=not args.json)
    report = prune(settings)
    ppl = report["perplexity"]
    params = report["params"]
    if args.json:
        print(json.dumps({"out": args.out, "dense_ppl": ppl["dense"]["ppl"],
                          "init_ppl": ppl["init"]["ppl"], "pruned_ppl": ppl["pruned"]["ppl"],
                          "kept_prunable": params["kept_prunable"],
                          "prunable": params["prunable"],
                          "median_step_s": report["median_step_s"],
                          "peak_memory_mib": report["peak_memory_mib"]}))
        return 0
    windows = ppl["dense"]["windows"]
    print(f"\n{args.model}: removed {1 - params['kept_prunable'] / params['prunable']:.1%} of "
          f"{params['prunable']:,} prunable parameters (total {params['total']:,} -> "
          f"{params['pruned_model_total']:,})")
    print(f"perplexity on {report['eval_data']} (seqlen {args.seqlen}, {windows} windows): "
          f"dense {ppl['dense']['ppl']:.2f} -> init ({args.init}) {ppl['init']['ppl']:.2f} "
          f"-> pruned {ppl['pruned']['ppl']:.2f}")
    print(f"median step {report['median_step_s']:.3f} s, peak memory "
          f"{report['peak_memory_mib']:.0f} MiB ({report['peak_memory_kind']})")
    print(f"wrote {args.out}: pruned model (probprune.load_pruned or from_pretrained with "
          f"trust_remote_code=True), masks.safetensors, scores.safetensors, report.json, *.png")
    return 0


def cmd_bench(args) -> int:
    from .bench.cli import cmd_bench as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probprune-fast",
        description="Structural pruning of LLaMA-family models by policy gradient, with masked kernels.")
    parser.add_argument("--version", action="version", version=f"probprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a model (dense, or a pruned directory)")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON line (ppl, nll, tokens, windows, seqlen, ...)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="search a pruning mask by policy gradient and export the "
                                     "smaller model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--sparsity", type=float, required=True,
                   help="fraction of the prunable parameters (attention, MLP, and layers with "
                        "--prune-layers) to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="run directory: checkpoint, pruned model, report")
    p.add_argument("--steps", type=int, default=400, help="policy-gradient steps")
    p.add_argument("--k", type=int, default=2, help="masks sampled per step (one batched forward)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per step")
    p.add_argument("--calib", default="wiki-summaries",
                   help="calibration text: wiki-summaries, wikitext2, c4, or a local "
                        ".txt/.jsonl/.json file or folder")
    p.add_argument("--nsamples", type=int, default=256,
                   help="calibration windows the steps draw their batches from")
    p.add_argument("--val-windows", type=int, default=64,
                   help="held-out calibration windows that choose the best hard mask")
    add_eval_args(p, data_flag="--eval")
    p.add_argument("--lr", type=float, default=0.01,
                   help="peak learning rate (cosine schedule); advantages are in units of their "
                        "running RMS")
    p.add_argument("--min-lr-ratio", type=float, default=0.0,
                   help="final learning rate as a fraction of --lr")
    p.add_argument("--init", default="wanda-sp",
                   help="wanda-sp, magnitude, constant, or a scores file of an earlier run")
    p.add_argument("--init-temperature", type=float, default=0.1,
                   help="temperature of the sigmoid that maps the init metric (z-scores inside "
                        "each layer) to probabilities: lower keeps the sampled masks closer to "
                        "the init's hard mask (default: 0.1)")
    p.add_argument("--init-attn-sparsity", type=float, default=0.0,
                   help="fraction of attention the init removes under a global budget (the MLP "
                        "takes the rest; the search then moves budget between them)")
    p.add_argument("--channel-block", type=int, default=64,
                   help="MLP channels per search unit: each layer's channels are ranked by the "
                        "init metric and cut into blocks of this size, so the search learns how "
                        "many channels each layer keeps, with far less noise per unit; 1 searches "
                        "every channel on its own (default: 64)")
    p.add_argument("--budget", default="global", choices=["global", "per-type"],
                   help="one parameter budget across all units, or separate attention/MLP ratios")
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="budget over the whole model, or the same ratio in every layer")
    p.add_argument("--attn-sparsity", type=float, default=None,
                   help="with --budget per-type: attention ratio (default: --sparsity)")
    p.add_argument("--mlp-sparsity", type=float, default=None,
                   help="with --budget per-type: MLP ratio (default: --sparsity)")
    p.add_argument("--prune-layers", action="store_true", help="also search over whole layers")
    p.add_argument("--protect-layers", type=_int_list, default=[],
                   help="comma-separated layers never pruned, e.g. 0,29")
    p.add_argument("--baseline", default="leave-one-out", choices=["leave-one-out", "moving-average"],
                   help="REINFORCE baseline")
    p.add_argument("--eval-every", type=int, default=25,
                   help="steps between held-out evaluations of the hard mask")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--backend", default=None, choices=["reference", "triton", "cuda"],
                   help="kernel backend (default: $PROBPRUNE_BACKEND, else the best available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="benchmark the masked ops and one search step against the "
                                     "dense-masked baseline and the pruned model; writes "
                                     "bench.json, bench.md and plots")
    from .bench.cli import add_bench_args
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Input problems (bad model, data, flags) get one clear line, not a traceback.
        if args.verbose:
            raise
        print(f"probprune-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
