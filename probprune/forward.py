"""The K-mask batched forward of a Llama / Mistral / Qwen2 / Qwen3 Hugging Face model.

Built from the drop-in layers of :mod:`probprune_kernels.layers` (one
:class:`~probprune_kernels.layers.MaskedDecoderLayer` per decoder layer, sharing the model's
weights): hidden states [K, B, T, d] run through them, so each of the K masks pays only for the
heads and channels it keeps. The masks of all layers are compacted in one launch per unit type; a
dropped layer is folded into the counts (zero heads and channels for that mask), so its kernels
exit at once and the residual passes through.
"""
from __future__ import annotations

from typing import Optional

import torch

import probprune_kernels as pk
from probprune_kernels.layers import MaskedDecoderLayer

from .models import check_supported
from .placement import layer_devices
from .units import UnitSpace

# Logit chunks of at most 2**24 fp32 values (64 MiB) over all K masks: the vocabulary is the
# largest activation of a small model and would otherwise grow with K.
LOGIT_CHUNK_VALUES = 1 << 24


def _on(device, *xs):
    """Index tensors (and tuples of them) on ``device``: no copy on the device they are on."""
    return tuple(tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
                 for x in xs)


class MaskedCausalLM:
    """``losses(input_ids, masks)`` -> one mean next-token loss per mask.

    ``masks``: bool [K, units.n_units] over model units (the flat order of :class:`UnitSpace`).
    """

    def __init__(self, model, include_layers: bool = False, backend: Optional[str] = None):
        config = model.config
        check_supported(config)
        if getattr(config, "mlp_bias", False):
            raise ValueError("MLP biases (mlp_bias=True) are not supported by the masked forward")
        self.model = model
        self.units = UnitSpace.of_model(config, include_layers)
        self.backend = backend
        self.layers = [MaskedDecoderLayer.from_hf(layer, config, backend)
                       for layer in model.model.layers]
        # Layer sharding (probprune.placement): the hidden states move at device boundaries.
        self.layer_devices = layer_devices(model)
        self.sliding_window = getattr(config, "sliding_window", None) if getattr(
            config, "use_sliding_window", True) else None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _compact(self, masks: torch.Tensor):
        """Index lists of all layers in one launch per unit type, [L, K, cap] each, with the
        layer keep of each mask folded into the counts."""
        m = self.units.split(masks)
        K, L = masks.shape[0], self.units.n_layers

        def per_layer(unit_masks):  # [K, L, n] -> idx [L, K, n], counts [L, K]
            flat = unit_masks.transpose(0, 1).reshape(L * K, -1).contiguous()
            idx, counts = pk.compact_masks(flat, backend=self.backend, validate=False)
            return idx.view(L, K, -1), counts.view(L, K)

        layer_keep = m.layers.transpose(0, 1).to(torch.int32)  # [L, K]
        h_idx, h_cnt = per_layer(m.heads)
        c_idx, c_cnt = per_layer(m.mlp)
        return (h_idx, h_cnt * layer_keep), (c_idx, c_cnt * layer_keep), layer_keep

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        n_units = self.units.n_units
        if masks.dim() != 2 or masks.shape[1] != n_units or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [K, {n_units}], got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        B, T = input_ids.shape
        if self.sliding_window is not None and T > self.sliding_window:
            raise ValueError(f"seqlen {T} exceeds the model's sliding window {self.sliding_window}")
        K = masks.shape[0]
        inner = self.model.model
        ids = input_ids.to(self.device)
        (h_idx, h_cnt), (c_idx, c_cnt), layer_keep = self._compact(masks.to(self.device))

        h = inner.embed_tokens(ids.to(inner.embed_tokens.weight.device))
        cos, sin = inner.rotary_emb(h, torch.arange(T, device=h.device)[None])  # [1, T, hd]
        h = h[None].expand(K, B, T, -1).contiguous()
        for l, layer in enumerate(self.layers):
            dev = self.layer_devices[l]
            if h.device != dev:
                h, cos, sin = h.to(dev), cos.to(dev), sin.to(dev)
            h = layer.forward_compact(h, cos, sin, *(_on(dev, (h_idx[l], h_cnt[l]),
                                                        (c_idx[l], c_cnt[l]), layer_keep[l])))
        h = inner.norm(h[:, :, :-1].to(self.device)).reshape(K, B * (T - 1), -1)
        labels = ids[:, 1:].reshape(-1)
        w = self.model.lm_head.weight
        chunk = max(1, LOGIT_CHUNK_VALUES // (K * w.shape[0]))
        # validate=False: no host sync; the embedding lookup has already range-checked the ids.
        return pk.lm_head_ce(h, w, labels, chunk_size=chunk, backend=self.backend,
                             validate=False)

    def all_ones(self, K: int = 1) -> torch.Tensor:
        return torch.ones(K, self.units.n_units, dtype=torch.bool, device=self.device)

