"""Prune a model you hold in Python, look at it, save it: ``probprune.prune`` is the command
line's run, with the flags as keywords (``--batch-size`` is ``batch_size=``).

    python examples/prune_in_python.py                       # SmolLM2-135M, 30%, ~10 min on 2 CPU cores
    python examples/prune_in_python.py --model DIR --sparsity 0.5 --out runs/mine --set steps=50
"""
from __future__ import annotations

import argparse
import ast

import torch

import probprune
from probprune.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--out", default="runs/python-example")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other prune setting, e.g. steps=50 or calib=my.txt")
    args = ap.parse_args(argv)
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value  # a plain string: a path, a name

    model, tokenizer = load_model(args.model)
    result = probprune.prune(model, tokenizer, sparsity=args.sparsity, **settings)

    ppl = result.report["perplexity"]
    print(f"perplexity: dense {ppl['dense']['ppl']:.2f} -> pruned {ppl['pruned']['ppl']:.2f}; "
          f"parameters {sum(p.numel() for p in model.parameters()):,} -> "
          f"{sum(p.numel() for p in result.model.parameters()):,}")
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = result.model.generate(prompt.to(result.model.device), max_new_tokens=8,
                                    do_sample=False)
    print("pruned model says:", tokenizer.decode(out[0]))
    print("saved to", result.save(args.out))
    return result


if __name__ == "__main__":
    main()
