"""Layer sharding: a model larger than one device, as contiguous runs of decoder layers on each of
several devices (``--devices cuda:0,cuda:1``), balanced by parameters.

The embedding and the rotary table sit on the first device, the final norm and ``lm_head`` on the
last (with tied embeddings both sit on the last: one tensor cannot live on two devices, and moving
a [B, T, d] lookup to the first layer costs less than a second copy of the vocabulary matrix).
Each placed module gets a forward pre-hook that moves its tensor arguments to its own device, so
the Hugging Face forward (evaluation, the init's statistics, ``generate``) runs across devices
unchanged; the K-mask forward and compensation move their hidden states at layer boundaries
themselves (:func:`layer_devices`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .families import family_of


class PlacementError(ValueError):
    pass


def balance(costs: Sequence[int], n_devices: int, first: int = 0, last: int = 0) -> List[int]:
    """The device index of every layer: contiguous runs in layer order that minimise the largest
    device's load, ``first`` added to device 0 and ``last`` to the last device (exact, by dynamic
    programming over split points; a device may be left without layers)."""
    if n_devices < 1:
        raise PlacementError("need at least one device")
    L = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(j: int, a: int, b: int) -> int:  # device j holding layers a..b-1
        return (prefix[b] - prefix[a] + (first if j == 0 else 0)
                + (last if j == n_devices - 1 else 0))

    inf = float("inf")
    # best[j][i]: the smallest largest load with layers 0..i-1 on devices 0..j; cut[j][i]: where
    # device j's run starts.
    best = [[inf] * (L + 1) for _ in range(n_devices)]
    cut = [[0] * (L + 1) for _ in range(n_devices)]
    for i in range(L + 1):
        best[0][i] = load(0, 0, i)
    for j in range(1, n_devices):
        for i in range(L + 1):
            for a in range(i + 1):
                v = max(best[j - 1][a], load(j, a, i))
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, a
    owner, i = [0] * L, L
    for j in range(n_devices - 1, 0, -1):
        a = cut[j][i]
        owner[a:i] = [j] * (i - a)
        i = a
    return owner


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def move_to(x, device):
    """Tensors in ``x`` (and in its tuples and lists) on ``device``; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, tuple):
        return tuple(move_to(v, device) for v in x)
    if isinstance(x, list):
        return [move_to(v, device) for v in x]
    return x


def move_inputs(module: nn.Module, device: torch.device) -> None:
    """Moves ``module``'s tensor arguments to ``device`` on every call."""
    def hook(_module, args, kwargs):
        return move_to(args, device), {k: move_to(v, device) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _on_device(module: nn.Module, device: torch.device) -> None:
    """Moves ``module`` to ``device`` (unless it is there: loading streams weights to their
    devices), and its inputs there on every call."""
    if any(t.device != device for t in list(module.parameters()) + list(module.buffers())):
        module.to(device)
    move_inputs(module, device)


@dataclass(frozen=True)
class Placement:
    devices: Tuple[torch.device, ...]
    layers: Tuple[int, ...]  # device index of each decoder layer
    tied: bool  # lm_head shares the embedding matrix: both sit on the last device
    names: Dict[str, str]  # role -> module name (the family's, probprune.families)

    def lines(self) -> List[str]:
        runs = []
        for j, dev in enumerate(self.devices):
            mine = [l for l, d in enumerate(self.layers) if d == j]
            runs.append(f"{dev}: layers {mine[0]}-{mine[-1]}" if mine else f"{dev}: no layers")
        return runs

    def module_devices(self) -> Dict[str, torch.device]:
        """Module name -> device, for every placed module of the model (a ``device_map``)."""
        first = self.devices[-1] if self.tied else self.devices[0]
        where = {"embed": first, "rotary": first, "final_norm": self.devices[-1],
                 "head": self.devices[-1]}
        where.update((f"layer.{l}", self.devices[j]) for l, j in enumerate(self.layers))
        return {self.names[role]: dev for role, dev in where.items()}

    @property
    def rotary(self) -> str:
        return self.names["rotary"]


def plan(model: nn.Module, devices: Sequence[str]) -> Placement:
    """Where each module of a causal LM (decoder layers, embedding, final norm, ``lm_head``)
    goes over ``devices``; works on a meta-device model (sizes only)."""
    devs = tuple(torch.device(d) for d in devices)
    family = family_of(model.config)
    layers, head = family.layers(model), family.head(model)
    embedding = model.get_input_embeddings()
    tied = head.weight is embedding.weight
    head_size = _params(head) + _params(family.final_norm(model))
    embed = 0 if tied else _params(embedding)
    owner = balance([_params(layer) for layer in layers], len(devs), embed, head_size)
    return Placement(devs, tuple(owner), tied, family.module_names(len(layers)))


def place(model: nn.Module, devices: Sequence[str]) -> Placement:
    """Spreads an HF causal LM over ``devices`` in place (modules already there stay put) and
    hooks each placed module to move its inputs; returns where each layer went."""
    placement = plan(model, devices)
    for name, dev in placement.module_devices().items():
        module = model.get_submodule(name)
        if name == placement.rotary:
            module.to(dev)  # called by the model, not on hidden states: no hook
        else:
            _on_device(module, dev)
    return placement


def layer_devices(model: nn.Module) -> List[torch.device]:
    """The device of every decoder layer (its first parameter's)."""
    return [next(layer.parameters()).device for layer in family_of(model.config).layers(model)]
