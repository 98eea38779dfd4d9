"""The prunable units of a model and what each costs.

Units, in the order of the flat score vector:

* ``heads``: one per KV-head group and layer (a KV head with its ``G`` query heads), [L * Hkv];
* ``channels``: one per MLP channel and layer, [L * F];
* ``layers`` (opt-in): one per decoder layer, [L].

A unit's cost is the number of parameters removing it removes. A dropped layer removes all of its
parameters, including the heads and channels it still had, so the expected kept count is
``sum_l s_layer_l * (norms_l + sum_{u in l} c_u s_u)``: linear in the head/channel probabilities
for fixed layer probabilities and vice versa.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class UnitMasks(NamedTuple):
    """Masks split by unit type: heads [..., L, Hkv], channels [..., L, F], layers [..., L]."""
    heads: torch.Tensor
    channels: torch.Tensor
    layers: torch.Tensor


@dataclass(frozen=True)
class UnitLayout:
    n_layers: int
    n_kv_heads: int
    q_per_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    attn_bias: bool  # q/k/v bias (Qwen2)
    o_bias: bool
    include_layers: bool

    @classmethod
    def from_config(cls, config, include_layers: bool = False) -> "UnitLayout":
        hq, hkv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        o_bias = bool(getattr(config, "attention_bias", False)) and config.model_type != "qwen2"
        return cls(config.num_hidden_layers, hkv, hq // hkv, head_dim, config.hidden_size,
                   config.intermediate_size, qkv_bias, o_bias, include_layers)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return self.n_layers * self.n_kv_heads

    @property
    def n_channels(self) -> int:
        return self.n_layers * self.intermediate

    @property
    def n_units(self) -> int:
        return self.n_heads + self.n_channels + (self.n_layers if self.include_layers else 0)

    # -- costs ---------------------------------------------------------------------------------
    @property
    def head_cost(self) -> int:
        """Parameters of one KV group: G query heads + 1 key + 1 value head in, G heads out."""
        g, hd, d = self.q_per_kv, self.head_dim, self.hidden
        cost = (2 * g + 2) * hd * d
        return cost + ((g + 2) * hd if self.attn_bias else 0)

    @property
    def channel_cost(self) -> int:
        return 3 * self.hidden  # gate row, up row, down column

    @property
    def layer_fixed_cost(self) -> int:
        """Parameters of a layer that go only with the whole layer: two norms and an o bias."""
        return 2 * self.hidden + (self.hidden if self.o_bias else 0)

    @property
    def layer_cost(self) -> int:
        return (self.layer_fixed_cost + self.n_kv_heads * self.head_cost
                + self.intermediate * self.channel_cost)

    @property
    def prunable_params(self) -> int:
        return self.n_layers * (self.layer_cost if self.include_layers
                                else self.layer_cost - self.layer_fixed_cost)

    def costs(self) -> torch.Tensor:
        """Standalone cost of each unit [n_units] (float64)."""
        parts = [torch.full((self.n_heads,), float(self.head_cost), dtype=torch.float64),
                 torch.full((self.n_channels,), float(self.channel_cost), dtype=torch.float64)]
        if self.include_layers:
            parts.append(torch.full((self.n_layers,), float(self.layer_fixed_cost), dtype=torch.float64))
        return torch.cat(parts)

    # -- flat vector <-> typed views ----------------------------------------------------------
    def split(self, flat: torch.Tensor) -> UnitMasks:
        """[..., n_units] -> UnitMasks (layers are all ones/True when not included)."""
        lead = flat.shape[:-1]
        heads = flat[..., : self.n_heads].reshape(*lead, self.n_layers, self.n_kv_heads)
        end = self.n_heads + self.n_channels
        channels = flat[..., self.n_heads:end].reshape(*lead, self.n_layers, self.intermediate)
        if self.include_layers:
            layers = flat[..., end:]
        else:
            layers = torch.ones(*lead, self.n_layers, dtype=flat.dtype, device=flat.device)
        return UnitMasks(heads, channels, layers)

    def join(self, masks: UnitMasks) -> torch.Tensor:
        lead = masks.heads.shape[:-2]
        parts = [masks.heads.reshape(*lead, -1), masks.channels.reshape(*lead, -1)]
        if self.include_layers:
            parts.append(masks.layers)
        return torch.cat(parts, dim=-1)

    def type_slices(self) -> dict:
        out = {"heads": slice(0, self.n_heads),
               "channels": slice(self.n_heads, self.n_heads + self.n_channels)}
        if self.include_layers:
            out["layers"] = slice(self.n_heads + self.n_channels, self.n_units)
        return out

    def unit_layer(self) -> torch.Tensor:
        """Layer index of every unit [n_units]."""
        L = self.n_layers
        parts = [torch.arange(L).repeat_interleave(self.n_kv_heads),
                 torch.arange(L).repeat_interleave(self.intermediate)]
        if self.include_layers:
            parts.append(torch.arange(L))
        return torch.cat(parts)

    def kept_params(self, mask: torch.Tensor) -> torch.Tensor:
        """Prunable parameters kept by a hard mask [n_units], or expected to be kept under
        independent keep-probabilities (the formula is linear in each factor): a 0-dim tensor."""
        m = self.split(mask.to(torch.float64))
        per_layer = (m.heads.sum(-1) * self.head_cost + m.channels.sum(-1) * self.channel_cost)
        if self.include_layers:
            per_layer = (per_layer + self.layer_fixed_cost) * m.layers
        return per_layer.sum()
