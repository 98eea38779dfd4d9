"""A pruning criterion of your own, on probprune's masked layers: score one MLP's channels, draw
K candidate masks around the score, and take the K masks' outputs in one batched call that reads
only the kept channels' weights.

    python examples/custom_criterion.py                      # SmolLM2-135M, layer 10
    python examples/custom_criterion.py --model DIR --layer 0 --keep 0.5 --k 8

The criterion here is the output energy each channel carries into down_proj (the mean square of
``silu(gate x) * up x`` times the squared norm of its down_proj column, a second-moment Wanda);
the candidates keep the top fraction and swap a few channels at the border. Swap in your own
``channel_scores``: the rest stays.
"""
from __future__ import annotations

import argparse

import torch

from probprune_kernels import MaskedSwiGLUMLP


@torch.no_grad()
def channel_scores(mlp, x: torch.Tensor) -> torch.Tensor:
    """[F] importance of each intermediate channel of an HF LLaMA-style ``mlp`` on inputs
    ``x`` [N, d]."""
    act = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)       # [N, F]
    return act.float().pow(2).mean(0) * mlp.down_proj.weight.float().pow(2).sum(0)


def candidate_masks(scores: torch.Tensor, keep: float, k: int, swaps: int = 4,
                    seed: int = 0) -> torch.Tensor:
    """[k, F] bool: the top ``keep`` fraction of channels by score (row 0), and k - 1 variants
    that trade ``swaps`` of the weakest kept channels for the strongest pruned ones, at random."""
    n = scores.numel()
    n_keep = max(1, round(keep * n))
    order = scores.argsort(descending=True)
    masks = torch.zeros(k, n, dtype=torch.bool)
    masks[:, order[:n_keep]] = True
    g = torch.Generator().manual_seed(seed)
    border_in, border_out = order[n_keep - 2 * swaps:n_keep], order[n_keep:n_keep + 2 * swaps]
    for row in range(1, k):
        drop = border_in[torch.randperm(len(border_in), generator=g)[:swaps]]
        add = border_out[torch.randperm(len(border_out), generator=g)[:swaps]]
        masks[row, drop], masks[row, add] = False, True
    return masks


@torch.no_grad()
def reconstruction_errors(mlp, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[K] relative squared error of the MLP's output under each mask against the dense output;
    the K masks run in one batched call of :class:`probprune_kernels.MaskedSwiGLUMLP`."""
    dense = mlp(x)
    masked = MaskedSwiGLUMLP.from_mlp(mlp)(x.expand(len(masks), *x.shape).contiguous(),
                                           masks.to(x.device))
    return ((masked - dense).float().pow(2).flatten(1).sum(1) / dense.float().pow(2).sum()).cpu()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept")
    ap.add_argument("--k", type=int, default=8, help="candidate masks, evaluated in one call")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)

    from probprune.data import calibration_texts, tokenize_joined
    from probprune.models import load_model

    model, tokenizer = load_model(args.model)
    ids = tokenize_joined(tokenizer, calibration_texts("wiki-summaries"))[: args.tokens]
    hidden = {}
    layer = model.model.layers[args.layer]
    hook = layer.post_attention_layernorm.register_forward_hook(
        lambda mod, inp, out: hidden.__setitem__("x", out[0]))
    with torch.no_grad():
        model(ids[None].to(model.device))
    hook.remove()
    x = hidden["x"]                                                          # [T, d]: the MLP's input
    scores = channel_scores(layer.mlp, x)
    masks = candidate_masks(scores, args.keep, args.k)
    errors = reconstruction_errors(layer.mlp, x[None], masks)
    best = int(errors.argmin())
    print(f"layer {args.layer}: {int(masks[0].sum())} of {masks.shape[1]} channels kept; "
          f"relative output error of the {args.k} candidates: "
          + ", ".join(f"{e:.4f}" for e in errors.tolist()) + f"; best: candidate {best}")
    return {"masks": masks, "errors": errors, "best": best}


if __name__ == "__main__":
    main()
