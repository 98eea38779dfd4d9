"""Initial keep-probabilities: a metric per unit mapped to probabilities around the budget.

* ``wanda-sp``: |W| * ||x||_2 on the input side of ``o_proj`` (per KV group) and ``down_proj``
  (per channel), averaged over output rows and summed over the unit's columns (Wanda-sp of FLAP);
* ``magnitude``: the same without the activation norms;
* ``constant``: every unit at the kept ratio;
* a path: probabilities saved by an earlier run (``scores.safetensors`` or a ``.pt`` tensor).

A metric becomes probabilities by ``sigmoid((z - tau_g) / temperature)``: ``z`` the log-metric
standardised per unit type, ``tau_g`` the threshold at which keeping the best units exactly fills
budget group g (the paper's sigmoid around the budget threshold). Layer units (opt-in) use the
block influence 1 - cos(h_in, h_out) of each layer. The result is then projected onto the budget.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .budget import Budget
from .units import UnitLayout

INIT_METHODS = ("wanda-sp", "magnitude", "constant")


@torch.no_grad()
def activation_stats(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True):
    """Squared input norms of every o_proj / down_proj column and the block influence of every
    layer, from a dense forward over calibration windows [N, T]."""
    layers = model.model.layers
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
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(col_hook(("o", i))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(col_hook(("down", i))))
        hooks.append(layer.register_forward_hook(layer_hook(i)))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="init statistics",
                          disable=not progress, leave=False):
            model(windows[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    n_tokens = windows.numel()
    norms = {k: (v / n_tokens).sqrt().cpu() for k, v in sq.items()}
    return norms, influence / n_tokens


def unit_metric(model, layout: UnitLayout, method: str, norms=None) -> torch.Tensor:
    """Importance of every head group and channel [n_heads + n_channels] (float64)."""
    G, hd = layout.q_per_kv, layout.head_dim
    heads, chans = [], []
    for i, layer in enumerate(model.model.layers):
        w_o = layer.self_attn.o_proj.weight.detach().double().abs().cpu()
        w_d = layer.mlp.down_proj.weight.detach().double().abs().cpu()
        if method == "wanda-sp":
            w_o = w_o * norms[("o", i)]
            w_d = w_d * norms[("down", i)]
        heads.append(w_o.mean(0).view(layout.n_kv_heads, G * hd).sum(1))
        chans.append(w_d.mean(0))
    return torch.cat([torch.cat(heads), torch.cat(chans)])


def _standardize(x: torch.Tensor) -> torch.Tensor:
    z = torch.log(x.clamp_min(1e-30))
    return (z - z.mean()) / z.std().clamp_min(1e-12) if z.numel() > 1 else z - z.mean()


def metric_to_probs(z: torch.Tensor, budget: Budget, temperature: float) -> torch.Tensor:
    """sigmoid((z - tau_g) / temperature), tau_g the hard threshold of each budget group."""
    keep = budget.hard_mask(torch.sigmoid(z))  # best units by z that fit each group
    gid = budget.group_of
    tau = torch.zeros(len(budget.targets), dtype=torch.float64)
    for g in range(len(tau)):
        in_g = gid == g
        kept_z, dropped_z = z[in_g & keep], z[in_g & ~keep]
        lo = float(dropped_z.max()) if dropped_z.numel() else float(z[in_g].min()) - 1
        hi = float(kept_z.min()) if kept_z.numel() else float(z[in_g].max()) + 1
        tau[g] = 0.5 * (lo + hi)
    return torch.sigmoid((z - tau[gid]) / temperature)


def initial_probs(model, layout: UnitLayout, budget: Budget, method: str,
                  windows: Optional[torch.Tensor] = None, temperature: float = 0.5,
                  batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Initial keep-probabilities [n_units] (float32, on the budget)."""
    if method not in INIT_METHODS:
        probs = load_probs(method, layout.n_units)
    elif method == "constant":
        probs = torch.full((layout.n_units,), budget.total_target / layout.prunable_params,
                           dtype=torch.float64)
    else:
        norms, influence = None, None
        if method == "wanda-sp" or layout.include_layers:
            if windows is None:
                raise ValueError(f"init {method!r} needs calibration windows")
            norms, influence = activation_stats(model, windows, batch_size, progress)
        metric = unit_metric(model, layout, method, norms)
        types = layout.type_slices()
        z = torch.cat([_standardize(metric[types["heads"]]), _standardize(metric[types["channels"]])])
        if layout.include_layers:
            # Layers start mostly kept; the least influential ones less so.
            z = torch.cat([z, _standardize(influence) + 3.0])
        probs = metric_to_probs(z, budget, temperature)
    return budget.project(probs.double()).float()


def load_probs(path: str, n_units: int) -> torch.Tensor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init must be one of {', '.join(INIT_METHODS)} or a scores "
                                f"file; {path!r} does not exist")
    if path.endswith(".safetensors"):
        probs = load_file(path)["probs"]
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        probs = obj["probs"] if isinstance(obj, dict) else obj
    if probs.dim() != 1 or probs.numel() != n_units:
        raise ValueError(f"scores file {path!r} has shape {tuple(probs.shape)}; this model and "
                         f"unit setting need ({n_units},)")
    if not torch.all((probs >= 0) & (probs <= 1)):
        raise ValueError(f"scores file {path!r} holds values outside [0, 1]")
    return probs.double()
