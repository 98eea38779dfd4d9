"""Initial keep-probabilities: a metric per unit mapped to probabilities around the budget.

* ``wanda-sp``: |W| * ||x||_2 on the input side of ``o_proj`` (per KV group) and ``down_proj``
  (per channel), averaged over output rows and summed over the unit's columns (Wanda-sp of FLAP);
* ``magnitude``: the same without the activation norms;
* ``constant``: every unit at the kept ratio;
* a path: probabilities saved by an earlier run (``scores.safetensors`` or a ``.pt`` tensor).

Metrics are compared only inside one layer and unit type (their scales differ by orders of
magnitude between layers: a global ranking guts the first layers, measured below), as z-scores of
the log-metric. Each (layer, type) then gets the same init ratio, and ``sigmoid((z - tau) / T)``
puts the probabilities around the threshold tau of that ratio (the paper's sigmoid around the
budget threshold). The attention share of the init is ``init_attn_sparsity`` (default 0: a KV
group of a GQA model is the coarsest, riskiest cut, so the init prunes MLP channels and the search
moves budget to attention where the losses say so); the MLP takes the rest of the budget. On
SmolLM2-135M at 30% (wikitext2, 32 windows of 128): global ranking 74,843; the same ratio for
heads and channels in every layer 3,169; heads kept, channels per layer 194.

With channel blocks (``UnitSpace.channel_block`` > 1) the channels of each layer are ranked by
the metric first and a block's metric is the sum over its channels, so the init's hard mask keeps a
prefix of each layer's ranking, as the per-channel init does up to one block.

Layer units (opt-in) use the block influence 1 - cos(h_in, h_out) of each layer and start mostly
kept. The result is projected onto the budget.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .budget import Budget
from .families import family_of
from .settings.search import INIT_METHODS
from .units import UnitSpace

EDGE_PROB = 0.01  # keep-probability of the least important unit of a type the init does not prune


@torch.no_grad()
def activation_stats(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True):
    """Squared input norms of every o_proj / down_proj column and the block influence of every
    layer, from a dense forward over calibration windows [N, T]."""
    family = family_of(model.config)
    layers = family.layers(model)
    sq = {}
    influence = torch.zeros(len(layers), dtype=torch.float64)
    hooks = []

    def col_hook(key):
        def hook(_module, args):
            x = args[0].detach().double()
            sq[key] = sq.get(key, 0) + x.pow(2).flatten(0, -2).sum(0)
        return hook

    def layer_hook(i):
        def hook(_module, args, output):
            h_in = args[0] if args else None
            h_out = output[0] if isinstance(output, tuple) else output
            if h_in is not None:
                cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
                influence[i] += (1 - cos).sum().cpu()
        return hook

    for i, layer in enumerate(layers):
        for role in ("o", "down"):
            hooks.append(family.part(layer, role).register_forward_pre_hook(col_hook((role, i))))
        hooks.append(layer.register_forward_hook(layer_hook(i)))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="init statistics",
                          disable=not progress, leave=False):
            # the decoder only: the hooks need no logits ([B, T, vocab] would be the largest
            # tensor of the whole init)
            family.decoder(model)(windows[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    n_tokens = windows.numel()
    norms = {k: (v / n_tokens).sqrt().cpu() for k, v in sq.items()}
    return norms, influence / n_tokens


def unit_metric(model, units: UnitSpace, method: str, norms=None) -> torch.Tensor:
    """Importance of every model unit but layers: attention units (KV groups or query heads),
    then channels (float64). A unit's metric is the sum over its o_proj / down_proj columns."""
    family = family_of(model.config)
    heads, chans = [], []
    for i, layer in enumerate(family.layers(model)):
        w_o = family.part(layer, "o").weight.detach().double().abs().cpu()
        w_d = family.part(layer, "down").weight.detach().double().abs().cpu()
        if method == "wanda-sp":
            w_o = w_o * norms[("o", i)]
            w_d = w_d * norms[("down", i)]
        heads.append(w_o.mean(0).view(units.heads_per_layer, -1).sum(1))
        chans.append(w_d.mean(0))
    return torch.cat([torch.cat(heads), torch.cat(chans)])


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """z-scores of the log along the last dimension."""
    z = torch.log(x.clamp_min(1e-30))
    std = z.std(-1, keepdim=True) if z.shape[-1] > 1 else torch.ones_like(z[..., :1])
    return (z - z.mean(-1, keepdim=True)) / std.clamp_min(1e-12)


def sigmoid_around_ratio(z: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    """Per row of z [L, n]: sigmoid((z - tau) / T), tau between the ``ratio * n`` lowest values
    and the rest (below every value when ratio is 0)."""
    n = z.shape[-1]
    k = int(round(ratio * n))
    srt = z.sort(-1).values
    # Nothing (everything) to prune: every unit at least 0.99 (at most 0.01). A KV group kept at
    # 0.88 is dropped from one sampled mask in eight, and on SmolLM2-135M those drops (~0.1 nats
    # each) drowned the loss differences the search learns from.
    margin = temperature * math.log(1 / EDGE_PROB - 1)
    if k == 0:
        tau = srt[..., :1] - margin
    elif k >= n:
        tau = srt[..., -1:] + margin
    else:
        tau = 0.5 * (srt[..., k - 1:k] + srt[..., k:k + 1])
    return torch.sigmoid((z - tau) / temperature)


def init_ratios(budget: Budget, attn_sparsity: float):
    """(attention, MLP) ratios of the init that together remove the budget's parameters.

    The one place that decides the attention share of the init: a per-type or uniform budget's
    own attention ratio, else ``attn_sparsity`` (the MLP then gives the rest, up to 90% of it)."""
    space, shape = budget.space, budget.shape
    att = space.n_layers * shape.n_kv_heads * shape.head_cost  # all attention parameters
    mlp = space.n_layers * shape.intermediate * shape.channel_cost
    removed = space.prunable_params - budget.total_target
    if space.include_layers:
        removed = max(0.0, removed - space.n_layers * shape.layer_fixed_cost)
    a = budget.ratios["heads"] if budget.mode in ("per-type", "uniform") else attn_sparsity
    m = (removed - a * att) / mlp
    if m > 0.9:  # the MLP alone cannot give that much: attention gives the rest
        m = 0.9
        a = min(0.9, (removed - m * mlp) / att)
    return a, max(0.0, m)


def initial_probs(model, budget: Budget, method: str, windows: Optional[torch.Tensor] = None,
                  temperature: float = 0.1, batch_size: int = 8, progress: bool = True,
                  attn_sparsity: float = 0.0) -> Tuple[UnitSpace, torch.Tensor]:
    """The search units with each layer's channels ranked by the init metric, and their initial
    keep-probabilities [n_units] (float32, on the budget)."""
    space = budget.space
    units = space.model_units
    if method not in INIT_METHODS:
        unit_probs = load_probs(method, units.n_units)
        space = space.with_order(space.rank_channels(unit_probs))
        probs = space.reduce(unit_probs)
    elif method == "constant":
        space = space.with_order(None)
        probs = torch.full((space.n_units,), budget.total_target / space.prunable_params,
                           dtype=torch.float64)
    else:
        norms, influence = None, None
        if method == "wanda-sp" or space.include_layers:
            if windows is None:
                raise ValueError(f"init {method!r} needs calibration windows")
            norms, influence = activation_stats(model, windows, batch_size, progress)
        metric = unit_metric(model, units, method, norms)
        space = space.with_order(space.rank_channels(metric))
        # A block's metric is the sum over its channels, like a head group's over its columns.
        # layer units, if any, take their init from the block influence below, not from this pad
        layer_pad = torch.ones(units.n_units - metric.numel(), dtype=metric.dtype)
        m = space.split(space.reduce(torch.cat([metric, layer_pad]), mean=False))
        a, r = init_ratios(budget, attn_sparsity)
        parts = [sigmoid_around_ratio(_standardize(m.heads), a, temperature).flatten(),
                 sigmoid_around_ratio(_standardize(m.mlp), r, temperature).flatten()]
        if space.include_layers:  # layers start mostly kept; the least influential less so
            parts.append(torch.sigmoid(_standardize(influence[None])[0] + 3.0))
        probs = torch.cat(parts)
    return space, budget.project(probs.double()).float()


def load_probs(path: str, n_units: int) -> torch.Tensor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init must be one of {', '.join(INIT_METHODS)} or a scores "
                                f"file; {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            tensors = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tensors = obj if isinstance(obj, dict) else {"probs": obj}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"--init {path!r} is not a readable scores file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    probs = tensors.get("probs")
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"--init {path!r} holds no 'probs' tensor (a scores.safetensors of an "
                         f"earlier run has one); it has: {sorted(tensors)}")
    if probs.dim() != 1 or probs.numel() != n_units:
        raise ValueError(f"scores file {path!r} has shape {tuple(probs.shape)}; this model and "
                         f"unit setting need ({n_units},)")
    if not torch.all((probs >= 0) & (probs <= 1)):
        raise ValueError(f"scores file {path!r} holds values outside [0, 1]")
    return probs.double()
