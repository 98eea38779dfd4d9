"""The K-mask batched forward of a Hugging Face causal LM of a supported family
(:mod:`probprune.families`).

Built from the drop-in layers of :mod:`probprune_kernels.layers` (one
:class:`~probprune_kernels.layers.MaskedDecoderLayer` per decoder layer, sharing the model's
weights): hidden states [K, B, T, d] run through them, so each of the K masks pays only for the
heads and channels it keeps. The masks of all layers are compacted in one launch per unit type; a
dropped layer is folded into the counts (zero heads and channels for that mask), so its kernels
exit at once and the residual passes through.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

import probprune_kernels as pk
from probprune_kernels.refit import LeastSquaresRefit

from .families import family_of, units_of
from .placement import layer_devices

# Logit chunks of at most 2**24 fp32 values (64 MiB) over all K masks: the vocabulary is the
# largest activation of a small model and would otherwise grow with K.
LOGIT_CHUNK_VALUES = 1 << 24


def _on(device, *xs):
    """Index tensors (and tuples of them, named ones keep their type) on ``device``: no copy on
    the device they are on."""
    def move(x):
        if isinstance(x, pk.HeadLists):
            return x._make(t.to(device) for t in x)
        return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
    return tuple(move(x) for x in xs)


class MaskedCausalLM:
    """``losses(input_ids, masks)`` -> one mean next-token loss per mask.

    ``masks``: bool [K, units.n_units] over model units (the flat order of :class:`~probprune.units.UnitSpace`).
    """

    def __init__(self, model, include_layers: bool = False, backend: Optional[str] = None,
                 attn_units: str = "kv-group"):
        config = model.config
        self.family = family_of(config)
        self.model = model
        self.units = units_of(config, include_layers, attn_units)
        self.backend = backend
        self.layers = [self.family.masked_layer(layer, config, backend, attn_units)
                       for layer in self.family.layers(model)]
        # Layer sharding (probprune.placement): the hidden states move at device boundaries.
        self.layer_devices = layer_devices(model)
        self.sliding_window = getattr(config, "sliding_window", None) if getattr(
            config, "use_sliding_window", True) else None

    @property
    def device(self) -> torch.device:
        """Where the logits are computed (``lm_head``'s device)."""
        return self.family.head(self.model).weight.device

    def embed(self, ids: torch.Tensor):
        """(hidden states [B, T, d], each layer's (cos, sin)) of the token ids, on the
        embedding's device."""
        h = self.family.embed(self.model, ids)
        return h, self.family.rotary(self.model, h, len(self.layers))

    def key(self, l: int, role: str) -> str:
        """The state-dict name of layer ``l``'s module of ``role`` (``"o"``, ``"down"``, ...)."""
        return self.family.key(l, role)

    def check_seqlen(self, seqlen: int) -> None:
        """Raises for windows longer than the model's sliding window: the kernels attend to every
        earlier token, which within the window is what the model does, and beyond it is not."""
        if self.sliding_window is not None and seqlen > self.sliding_window:
            raise ValueError(f"--seqlen {seqlen} exceeds the model's sliding window of "
                             f"{self.sliding_window} tokens, which the masked attention kernels "
                             f"do not apply: use --seqlen {self.sliding_window} or less")

    def use_refits(self, grams: Optional[Dict[str, torch.Tensor]], damping: float = 0.01) -> None:
        """With ``grams`` (:func:`probprune.compensate.input_grams`), every mask's loss is the
        one it has after a least-squares refit of o_proj and down_proj to its own kept heads and
        channels (:mod:`probprune_kernels.refit`); with None, the bare slice's."""
        for l, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for module, linear, name, group in ((attn, attn.o_proj, self.key(l, "o"), attn.head_dim),
                                                (mlp, mlp.down_proj, self.key(l, "down"), 1)):
                module.refit = None if grams is None else LeastSquaresRefit(
                    linear.weight, grams[name], damping, group)

    def _compact(self, masks: torch.Tensor):
        """Index lists of all layers in one launch per unit type ([L, K, ...] each), with the
        layer keep of each mask folded into the counts."""
        m = self.units.split(masks)
        K, L = masks.shape[0], self.units.n_layers
        G = self.units.shape.q_per_kv

        def flat(unit_masks):  # [K, L, n] -> [L * K, n]
            return unit_masks.transpose(0, 1).reshape(L * K, -1).contiguous()

        def per_layer(t):  # [L * K, ...] -> [L, K, ...]
            return t.view(L, K, *t.shape[1:])

        layer_keep = m.layers.transpose(0, 1).to(torch.int32)  # [L, K]
        if self.units.query_heads:
            lists = pk.head_lists(flat(m.heads), G, backend=self.backend, validate=False)
        else:
            idx, counts = pk.compact_masks(flat(m.heads), backend=self.backend, validate=False)
            lists = pk.head_lists_from_groups(idx, counts, G)
        lists = pk.HeadLists(*map(per_layer, lists))
        heads = lists._replace(q_counts=lists.q_counts * layer_keep,
                               kv_counts=lists.kv_counts * layer_keep)
        c_idx, c_cnt = pk.compact_masks(flat(m.mlp), backend=self.backend, validate=False)
        channels = (per_layer(c_idx), per_layer(c_cnt) * layer_keep)
        return heads, channels, layer_keep

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        n_units = self.units.n_units
        if masks.dim() != 2 or masks.shape[1] != n_units or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [K, {n_units}], got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        B, T = input_ids.shape
        self.check_seqlen(T)
        K = masks.shape[0]
        ids = input_ids.to(self.device)
        heads, (c_idx, c_cnt), layer_keep = self._compact(masks.to(self.device))

        h, rotary = self.embed(ids)
        h = h[None].expand(K, B, T, -1).contiguous()
        for l, layer in enumerate(self.layers):
            dev = self.layer_devices[l]
            h = h.to(dev)
            cos, sin = (t.to(dev) for t in rotary[l])  # [1, T, hd]: a copy on other devices only
            lists = pk.HeadLists(*(t[l] for t in heads))
            h = layer.forward_compact(h, cos, sin, *(_on(dev, lists, (c_idx[l], c_cnt[l]),
                                                        layer_keep[l])))
        h = self.family.final_norm(self.model)(h[:, :, :-1].to(self.device))
        h = h.reshape(K, B * (T - 1), -1)
        labels = ids[:, 1:].reshape(-1)
        w = self.family.head(self.model).weight
        chunk = max(1, LOGIT_CHUNK_VALUES // (K * w.shape[0]))
        # validate=False: no host sync; the embedding lookup has already range-checked the ids.
        return pk.lm_head_ce(h, w, labels, chunk_size=chunk, backend=self.backend,
                             validate=False)

    def all_ones(self, K: int = 1) -> torch.Tensor:
        return torch.ones(K, self.units.n_units, dtype=torch.bool, device=self.device)

