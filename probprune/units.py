"""Prunable units, their parameter costs, and the two unit spaces the engine works in.

Vocabulary (used for every tensor name in the engine):

* **model units**: one KV-head group (a KV head with its ``q_per_kv`` query heads) or, with
  ``attn_units="query-head"``, one query head; one MLP channel; and (opt-in) one whole layer. Masks that reach the forward, the export and every file
  written to disk are over model units.
* **search units**: what the policy learns one keep-probability for: a KV group, a *block* of
  ``channel_block`` MLP channels of one layer, or a layer. Each layer's channels are ranked by the
  init metric first (``channel_order``): block b holds the channels ranked ``[b*cb, (b+1)*cb)``;
  when ``cb`` does not divide the intermediate size the last block is the smaller one.

Both are a :class:`UnitSpace`: the model units are the space with ``channel_block=1`` and no order
(:attr:`UnitSpace.model_units`), and :meth:`UnitSpace.expand` maps values of any space to model
units. A flat vector holds heads ``[L * Hkv]``, then MLP units ``[L * blocks_per_layer]``, then
(opt-in) layers ``[L]``.

Why blocks: the K losses of a step are shared by every uncertain unit, so one unit's REINFORCE
gradient has a signal-to-noise ratio of about ``effect / sqrt(n * effect^2)`` for ``n`` units of
similar effect. On SmolLM2-135M one MLP channel moves the loss by ~1e-4 nats among 46,170 units and
the search never beat its init; blocks of metric-ranked channels divide ``n`` by ``cb`` and keep the
metric's order inside each layer, so the search decides how wide each layer stays and which heads
go, and the metric decides which channels.

Cost of a unit: the parameters removing it removes. A dropped layer removes all of its parameters,
including the heads and channels it still had, so the expected kept count is
``sum_l s_layer_l * (norms_l + sum_{u in l} c_u s_u)``: linear in the head/channel probabilities
for fixed layer probabilities and vice versa.

Query-head units: a KV group's key and value heads are kept while any of its query heads is, so
they cost ``kv_cost`` once per open group: ``E[kept] = sum_groups kv_cost (1 - prod_j (1 - s_j)) +
sum_j query_head_cost s_j``. Not linear, but non-increasing in the budget projection's shift, so
the bisection still applies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Optional

import torch


class UnitValues(NamedTuple):
    """A flat unit vector split by type: heads [..., L, Hkv], mlp [..., L, n] (channels in the
    model space, channel blocks in a search space), layers [..., L] (ones when not searched)."""
    heads: torch.Tensor
    mlp: torch.Tensor
    layers: torch.Tensor


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder stack and the parameter cost of each kind of model unit."""
    n_layers: int
    n_kv_heads: int
    q_per_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    attn_bias: bool  # q/k/v bias (Qwen2)
    o_bias: bool
    qk_norm: bool = False  # per-head q/k norms (Qwen3): one head_dim weight each, shared by the heads
    norms: int = 2  # norms over the residual width per layer (Gemma's sandwich norms: 4)

    @property
    def n_query_heads(self) -> int:
        return self.n_kv_heads * self.q_per_kv

    def head_columns(self, groups: torch.Tensor) -> torch.Tensor:
        """The q_proj rows (= o_proj columns) of KV groups ``groups`` [n] (long), in their order:
        group j owns ``q_per_kv * head_dim`` consecutive ones."""
        width = self.q_per_kv * self.head_dim
        return (groups.long()[:, None] * width
                + torch.arange(width, device=groups.device)).flatten()

    def query_columns(self, heads: torch.Tensor) -> torch.Tensor:
        """The q_proj rows (= o_proj columns) of query heads ``heads`` [n] (long), in their
        order: head h owns rows ``h * head_dim ... + head_dim - 1``."""
        return (heads.long()[:, None] * self.head_dim
                + torch.arange(self.head_dim, device=heads.device)).flatten()

    @property
    def query_head_cost(self) -> int:
        """Parameters of one query head alone: its q_proj rows (and bias) and o_proj columns."""
        return 2 * self.head_dim * self.hidden + (self.head_dim if self.attn_bias else 0)

    @property
    def kv_cost(self) -> int:
        """Parameters a KV group's key and value heads hold (paid once while any of its query
        heads is kept)."""
        return 2 * self.head_dim * self.hidden + (2 * self.head_dim if self.attn_bias else 0)

    @property
    def head_cost(self) -> int:
        """Parameters of one KV group: G query heads + 1 key + 1 value head in, G heads out."""
        return self.q_per_kv * self.query_head_cost + self.kv_cost

    @property
    def channel_cost(self) -> int:
        return 3 * self.hidden  # gate row, up row, down column

    @property
    def layer_fixed_cost(self) -> int:
        """Parameters that go only with the whole layer: its norms, an o_proj bias, and q/k norms
        (no head owns them; a kept layer without heads keeps them too, so the count stays linear
        in the mask)."""
        return (self.norms * self.hidden + (self.hidden if self.o_bias else 0)
                + (2 * self.head_dim if self.qk_norm else 0))

    @property
    def layer_cost(self) -> int:
        return (self.layer_fixed_cost + self.n_kv_heads * self.head_cost
                + self.intermediate * self.channel_cost)


ATTN_UNITS = ("kv-group", "query-head")


@dataclass(frozen=True, eq=False)
class UnitSpace:
    shape: ModelShape
    include_layers: bool = False
    channel_block: int = 1
    channel_order: Optional[torch.Tensor] = None  # [L, F] long, channel of each rank; None: identity
    attn_units: str = "kv-group"  # or "query-head": a KV group is kept while any query head is

    def __post_init__(self):
        shape = self.shape
        if self.attn_units not in ATTN_UNITS:
            raise ValueError(f"attention units must be one of {', '.join(ATTN_UNITS)}, got "
                             f"{self.attn_units!r}")
        if not 1 <= self.channel_block <= shape.intermediate:
            raise ValueError(f"channel block must be between 1 and the intermediate size "
                             f"{shape.intermediate}, got {self.channel_block}")
        order = self.channel_order
        if order is not None:
            if tuple(order.shape) != (shape.n_layers, shape.intermediate):
                raise ValueError(f"channel order has shape {tuple(order.shape)}; the model needs "
                                 f"({shape.n_layers}, {shape.intermediate})")
            expected = torch.arange(shape.intermediate).expand(shape.n_layers, -1)
            if not torch.equal(order.sort(-1).values.cpu(), expected):
                raise ValueError("channel order must be a permutation of each layer's channels")

    @cached_property
    def model_units(self) -> "UnitSpace":
        """The space whose values the forward, the export and the files on disk take."""
        if self.channel_block == 1 and self.channel_order is None:
            return self
        return UnitSpace(self.shape, self.include_layers, attn_units=self.attn_units)

    @property
    def query_heads(self) -> bool:
        """Attention units are single query heads (else whole KV groups)."""
        return self.attn_units == "query-head"

    def with_order(self, order: Optional[torch.Tensor]) -> "UnitSpace":
        return dataclasses.replace(self, channel_order=order)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.shape.n_layers

    @property
    def heads_per_layer(self) -> int:
        """Attention units of one layer: its query heads or its KV groups."""
        return self.shape.n_query_heads if self.query_heads else self.shape.n_kv_heads

    @property
    def n_heads(self) -> int:
        return self.shape.n_layers * self.heads_per_layer

    @property
    def blocks_per_layer(self) -> int:
        return -(-self.shape.intermediate // self.channel_block)

    @property
    def n_mlp(self) -> int:
        """MLP units of this space: channels, or channel blocks."""
        return self.n_layers * self.blocks_per_layer

    @property
    def n_units(self) -> int:
        return self.n_heads + self.n_mlp + (self.n_layers if self.include_layers else 0)

    @property
    def prunable_params(self) -> int:
        shape = self.shape
        per_layer = shape.layer_cost - (0 if self.include_layers else shape.layer_fixed_cost)
        return shape.n_layers * per_layer

    def block_sizes(self) -> torch.Tensor:
        """Channels in each MLP unit of a layer [blocks_per_layer] (the last may be smaller)."""
        cb, F = self.channel_block, self.shape.intermediate
        sizes = torch.full((self.blocks_per_layer,), cb, dtype=torch.long)
        sizes[-1] = F - (self.blocks_per_layer - 1) * cb
        return sizes

    # -- costs and accounting -----------------------------------------------------------------
    def costs(self) -> torch.Tensor:
        """Standalone parameter cost of each unit [n_units] (float64). With query-head units this
        is the linear part only: the key/value heads a KV group shares are :meth:`kv_kept`."""
        shape = self.shape
        blocks = (self.block_sizes().double() * shape.channel_cost).repeat(self.n_layers)
        head = shape.query_head_cost if self.query_heads else shape.head_cost
        parts = [torch.full((self.n_heads,), float(head), dtype=torch.float64), blocks]
        if self.include_layers:
            parts.append(torch.full((self.n_layers,), float(shape.layer_fixed_cost),
                                    dtype=torch.float64))
        return torch.cat(parts)

    def type_slices(self) -> dict:
        out = {"heads": slice(0, self.n_heads),
               "mlp": slice(self.n_heads, self.n_heads + self.n_mlp)}
        if self.include_layers:
            out["layers"] = slice(self.n_heads + self.n_mlp, self.n_units)
        return out

    def unit_layer(self) -> torch.Tensor:
        """Layer index of every unit [n_units]."""
        L = self.n_layers
        parts = [torch.arange(L).repeat_interleave(self.heads_per_layer),
                 torch.arange(L).repeat_interleave(self.blocks_per_layer)]
        if self.include_layers:
            parts.append(torch.arange(L))
        return torch.cat(parts)

    def split(self, flat: torch.Tensor) -> UnitValues:
        """[..., n_units] -> :class:`UnitValues` (layers all ones when not searched)."""
        lead, L = flat.shape[:-1], self.n_layers
        sl = self.type_slices()
        heads = flat[..., sl["heads"]].reshape(*lead, L, self.heads_per_layer)
        mlp = flat[..., sl["mlp"]].reshape(*lead, L, self.blocks_per_layer)
        layers = (flat[..., sl["layers"]] if self.include_layers
                  else torch.ones(*lead, L, dtype=flat.dtype, device=flat.device))
        return UnitValues(heads, mlp, layers)

    def kept_params(self, values: torch.Tensor) -> torch.Tensor:
        """Prunable parameters kept by a hard mask [n_units], or expected under independent
        keep-probabilities (the formula is linear in each factor): a 0-dim float64 tensor on the
        values' device. Independent of the channel order."""
        shape = self.shape
        v = self.split(values.to(torch.float64))
        sizes = self.block_sizes().double().to(values.device)
        head = shape.query_head_cost if self.query_heads else shape.head_cost
        per_layer = (v.heads.sum(-1) * head + (v.mlp * sizes).sum(-1) * shape.channel_cost
                     + self.kv_kept(v.heads).sum(-1) * (shape.kv_cost if self.query_heads else 0))
        if self.include_layers:
            per_layer = (per_layer + shape.layer_fixed_cost) * v.layers
        return per_layer.sum()

    # -- attention: KV groups and query heads of either kind of unit ----------------------------
    def kv_kept(self, heads: torch.Tensor) -> torch.Tensor:
        """Attention values [..., L, heads_per_layer] -> KV groups [..., L, Hkv]: kept while any
        query head is (for probabilities, the chance that one is: ``1 - prod(1 - s)``, which is
        ``any`` on a hard mask). KV-group units are returned as they are."""
        if not self.query_heads:
            return heads
        G = self.shape.q_per_kv
        grouped = heads.reshape(*heads.shape[:-1], self.shape.n_kv_heads, G)
        if heads.dtype == torch.bool:
            return grouped.any(-1)
        return 1 - (1 - grouped).prod(-1)

    def query_kept(self, heads: torch.Tensor) -> torch.Tensor:
        """Attention values [..., L, heads_per_layer] -> query heads [..., L, Hq]."""
        if self.query_heads:
            return heads
        return heads.repeat_interleave(self.shape.q_per_kv, dim=-1)

    # -- this space <-> model units ------------------------------------------------------------
    @cached_property
    def of_model_unit(self) -> torch.Tensor:
        """The unit of this space that holds each model unit [model_units.n_units] (long)."""
        L, F = self.shape.n_layers, self.shape.intermediate
        rank_block = torch.arange(F) // self.channel_block       # block of each rank
        if self.channel_order is None:
            block_of_channel = rank_block.expand(L, -1)
        else:  # channel_order[l, r] has rank r
            block_of_channel = torch.empty(L, F, dtype=torch.long)
            block_of_channel.scatter_(1, self.channel_order.cpu().long(), rank_block.expand(L, -1))
        blocks = self.n_heads + torch.arange(L)[:, None] * self.blocks_per_layer + block_of_channel
        parts = [torch.arange(self.n_heads), blocks.flatten()]
        if self.include_layers:
            parts.append(self.n_heads + self.n_mlp + torch.arange(L))
        return torch.cat(parts)

    @cached_property
    def _index_by_device(self) -> dict:
        return {}

    def _of_model_unit_on(self, device) -> torch.Tensor:
        """``of_model_unit`` on ``device``, copied there once: expand runs on every step."""
        device = torch.device(device)
        cache = self._index_by_device
        if device not in cache:
            cache[device] = self.of_model_unit.to(device)
        return cache[device]

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Values of this space [..., n_units] -> model-unit values [..., model_units.n_units]."""
        if values.shape[-1] != self.n_units:
            raise ValueError(f"expected {self.n_units} unit values, got {values.shape[-1]}")
        if self.model_units is self:
            return values
        return values[..., self._of_model_unit_on(values.device)]

    def reduce(self, model_values: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Model-unit values [model_units.n_units] -> the mean (or sum) over each unit of this
        space [n_units] (float64)."""
        n_model = self.model_units.n_units
        if model_values.shape[-1] != n_model:
            raise ValueError(f"expected {n_model} model-unit values, got {model_values.shape[-1]}")
        idx = self._of_model_unit_on(model_values.device)
        v = model_values.double()
        total = torch.zeros(self.n_units, dtype=torch.float64, device=v.device)
        total.index_add_(0, idx, v)
        if not mean:
            return total
        return total / torch.zeros_like(total).index_add_(0, idx, torch.ones_like(v))

    def rank_channels(self, model_values: torch.Tensor) -> torch.Tensor:
        """Per layer, the channels from the highest model-unit value to the lowest [L, F]
        (stable on ties): the ``channel_order`` of a search space built from those values."""
        channels = self.model_units.split(model_values).mlp
        return torch.argsort(channels, dim=-1, descending=True, stable=True)
