"""The search space: the units the policy learns one keep-probability for.

A search unit is a KV-head group, a block of ``channel_block`` MLP channels of one layer, or
(opt-in) a whole layer, in that order in the flat probability vector. The blocks follow a per-layer order of
the channels, most important first by the init metric: block b of a layer holds the channels ranked
``[b * cb, (b + 1) * cb)``, and when ``cb`` does not divide the intermediate size the last block is
the smaller one. With ``cb = 1`` and no order this is the model's own unit layout.

Why blocks: the K losses of a step are shared by every uncertain unit, so one unit's REINFORCE
gradient has a signal-to-noise ratio of about ``effect / sqrt(n * effect^2)`` for ``n`` units of
similar effect. On SmolLM2-135M one MLP channel moves the loss by ~1e-4 nats among 46,170 units and
the search never beat its init; blocks of metric-ranked channels divide ``n`` by ``cb`` and keep the
metric's order inside each layer, so the search decides how wide each layer stays and which heads
go, and the metric decides which channels.

The budget only needs the structure (costs, types, layers); the channel order matters only to
:meth:`SearchSpace.expand`, which maps search units back to the model's units.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from .units import UnitLayout, UnitMasks


@dataclass(frozen=True, eq=False)
class SearchSpace:
    layout: UnitLayout
    channel_block: int = 1
    channel_order: Optional[torch.Tensor] = None  # [L, F] long, channel of each rank; None: identity

    def __post_init__(self):
        lay = self.layout
        if not 1 <= self.channel_block <= lay.intermediate:
            raise ValueError(f"channel block must be between 1 and the intermediate size "
                             f"{lay.intermediate}, got {self.channel_block}")
        order = self.channel_order
        if order is not None:
            if tuple(order.shape) != (lay.n_layers, lay.intermediate):
                raise ValueError(f"channel order has shape {tuple(order.shape)}; the model needs "
                                 f"({lay.n_layers}, {lay.intermediate})")
            expected = torch.arange(lay.intermediate).expand(lay.n_layers, -1)
            if not torch.equal(order.sort(-1).values.cpu(), expected):
                raise ValueError("channel order must be a permutation of each layer's channels")

    @classmethod
    def of(cls, space_or_layout) -> "SearchSpace":
        return space_or_layout if isinstance(space_or_layout, SearchSpace) else cls(space_or_layout)

    def with_order(self, order: Optional[torch.Tensor]) -> "SearchSpace":
        return dataclasses.replace(self, channel_order=order)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def include_layers(self) -> bool:
        return self.layout.include_layers

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def blocks_per_layer(self) -> int:
        return -(-self.layout.intermediate // self.channel_block)

    @property
    def n_heads(self) -> int:
        return self.layout.n_heads

    @property
    def n_blocks(self) -> int:
        return self.n_layers * self.blocks_per_layer

    @property
    def n_units(self) -> int:
        return self.n_heads + self.n_blocks + (self.n_layers if self.include_layers else 0)

    def block_sizes(self) -> torch.Tensor:
        """Channels in each block of a layer [blocks_per_layer] (the last one may be smaller)."""
        cb, F = self.channel_block, self.layout.intermediate
        sizes = torch.full((self.blocks_per_layer,), cb, dtype=torch.long)
        sizes[-1] = F - (self.blocks_per_layer - 1) * cb
        return sizes

    # -- costs and accounting -----------------------------------------------------------------
    def costs(self) -> torch.Tensor:
        """Standalone parameter cost of each search unit [n_units] (float64)."""
        lay = self.layout
        blocks = (self.block_sizes().double() * lay.channel_cost).repeat(self.n_layers)
        parts = [torch.full((self.n_heads,), float(lay.head_cost), dtype=torch.float64), blocks]
        if self.include_layers:
            parts.append(torch.full((self.n_layers,), float(lay.layer_fixed_cost),
                                    dtype=torch.float64))
        return torch.cat(parts)

    def type_slices(self) -> dict:
        out = {"heads": slice(0, self.n_heads),
               "channels": slice(self.n_heads, self.n_heads + self.n_blocks)}
        if self.include_layers:
            out["layers"] = slice(self.n_heads + self.n_blocks, self.n_units)
        return out

    def unit_layer(self) -> torch.Tensor:
        """Layer index of every search unit [n_units]."""
        L = self.n_layers
        parts = [torch.arange(L).repeat_interleave(self.layout.n_kv_heads),
                 torch.arange(L).repeat_interleave(self.blocks_per_layer)]
        if self.include_layers:
            parts.append(torch.arange(L))
        return torch.cat(parts)

    def split(self, flat: torch.Tensor) -> UnitMasks:
        """[..., n_units] -> heads [..., L, Hkv], channel blocks [..., L, blocks], layers [..., L]
        (all ones when layers are not searched)."""
        lead, L = flat.shape[:-1], self.n_layers
        sl = self.type_slices()
        heads = flat[..., sl["heads"]].reshape(*lead, L, self.layout.n_kv_heads)
        blocks = flat[..., sl["channels"]].reshape(*lead, L, self.blocks_per_layer)
        layers = (flat[..., sl["layers"]] if self.include_layers
                  else torch.ones(*lead, L, dtype=flat.dtype, device=flat.device))
        return UnitMasks(heads, blocks, layers)

    def kept_params(self, values: torch.Tensor) -> torch.Tensor:
        """Prunable parameters kept by a hard mask [n_units], or expected under independent
        keep-probabilities: a 0-dim tensor. Independent of the channel order."""
        lay = self.layout
        m = self.split(values.to(torch.float64))
        sizes = self.block_sizes().double().to(values.device)
        per_layer = (m.heads.sum(-1) * lay.head_cost
                     + (m.channels * sizes).sum(-1) * lay.channel_cost)
        if self.include_layers:
            per_layer = (per_layer + lay.layer_fixed_cost) * m.layers
        return per_layer.sum()

    # -- search units <-> model units ----------------------------------------------------------
    @cached_property
    def of_unit(self) -> torch.Tensor:
        """The search unit of every model unit [layout.n_units] (long)."""
        lay = self.layout
        L, F = lay.n_layers, lay.intermediate
        rank_block = torch.arange(F) // self.channel_block       # block of each rank
        if self.channel_order is None:
            block_of_channel = rank_block.expand(L, -1)
        else:  # channel order[l, r] has rank r
            block_of_channel = torch.empty(L, F, dtype=torch.long)
            block_of_channel.scatter_(1, self.channel_order.cpu().long(), rank_block.expand(L, -1))
        blocks = self.n_heads + torch.arange(L)[:, None] * self.blocks_per_layer + block_of_channel
        parts = [torch.arange(self.n_heads), blocks.flatten()]
        if self.include_layers:
            parts.append(self.n_heads + self.n_blocks + torch.arange(L))
        return torch.cat(parts)

    @cached_property
    def _index_by_device(self) -> dict:
        return {}

    def _of_unit_on(self, device) -> torch.Tensor:
        """``of_unit`` on ``device``, copied there once: expand runs on every step."""
        device = torch.device(device)
        cache = self._index_by_device
        if device not in cache:
            cache[device] = self.of_unit.to(device)
        return cache[device]

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Search-unit values [..., n_units] -> model-unit values [..., layout.n_units]."""
        if values.shape[-1] != self.n_units:
            raise ValueError(f"expected {self.n_units} search-unit values, got {values.shape[-1]}")
        return values[..., self._of_unit_on(values.device)]

    def reduce(self, unit_values: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Model-unit values [layout.n_units] -> the mean (or sum) over each search unit
        [n_units] (float64)."""
        if unit_values.shape[-1] != self.layout.n_units:
            raise ValueError(f"expected {self.layout.n_units} model-unit values, "
                             f"got {unit_values.shape[-1]}")
        idx = self._of_unit_on(unit_values.device)
        v = unit_values.double()
        total = torch.zeros(self.n_units, dtype=torch.float64, device=v.device)
        total.index_add_(0, idx, v)
        if not mean:
            return total
        return total / torch.zeros_like(total).index_add_(0, idx, torch.ones_like(v))


def rank_channels(layout: UnitLayout, unit_values: torch.Tensor) -> torch.Tensor:
    """Per layer, the channels from the highest value to the lowest [L, F] (stable on ties)."""
    channels = layout.split(unit_values).channels
    return torch.argsort(channels, dim=-1, descending=True, stable=True)
