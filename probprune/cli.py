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
