"""The K-mask batched forward of a Llama / Mistral / Qwen2 Hugging Face model.

Reads the model's own modules and weights (no copy) and runs hidden states [K, B, T, d] through
``probprune_kernels`` ops, so each of the K masks pays only for the heads and channels it keeps.
A dropped layer is folded into the counts (zero heads and channels for that mask): its kernels
exit at once and the residual passes through.
"""
from __future__ import annotations

from typing import List, Optional

import torch

import probprune_kernels as pk

from .models import check_supported
from .units import UnitLayout


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MaskedCausalLM:
    """``losses(input_ids, masks)`` -> one mean next-token loss per mask.

    ``masks``: bool [K, layout.n_units] (the flat unit order of ``UnitLayout``).
    """

    def __init__(self, model, include_layers: bool = False, backend: Optional[str] = None):
        config = model.config
        check_supported(config)
        if getattr(config, "mlp_bias", False):
            raise ValueError("MLP biases (mlp_bias=True) are not supported by the masked forward")
        self.model = model
        self.layout = UnitLayout.from_config(config, include_layers)
        self.backend = backend
        self.sliding_window = getattr(config, "sliding_window", None) if getattr(
            config, "use_sliding_window", True) else None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _compact(self, masks: torch.Tensor):
        """Index lists of all layers in one launch per unit type: [L, K, cap] each, with the
        layer keep of each mask folded into the counts."""
        m = self.layout.split(masks)
        K, L = masks.shape[0], self.layout.n_layers

        def per_layer(unit_masks):  # [K, L, n] -> idx [L, K, n], counts [L, K]
            flat = unit_masks.transpose(0, 1).reshape(L * K, -1).contiguous()
            idx, counts = pk.compact_masks(flat, backend=self.backend)
            return idx.view(L, K, -1), counts.view(L, K)

        layer_keep = m.layers.transpose(0, 1).to(torch.int32)  # [L, K]
        h_idx, h_cnt = per_layer(m.heads)
        c_idx, c_cnt = per_layer(m.channels)
        return h_idx, h_cnt * layer_keep, c_idx, c_cnt * layer_keep, layer_keep

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        lay, backend = self.layout, self.backend
        if masks.dim() != 2 or masks.shape[1] != lay.n_units or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [K, {lay.n_units}], got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        B, T = input_ids.shape
        if self.sliding_window is not None and T > self.sliding_window:
            raise ValueError(f"seqlen {T} exceeds the model's sliding window {self.sliding_window}")
        K = masks.shape[0]
        inner = self.model.model
        ids = input_ids.to(self.device)
        h_idx, h_cnt, c_idx, c_cnt, layer_keep = self._compact(masks.to(self.device))

        h = inner.embed_tokens(ids)
        pos = torch.arange(T, device=self.device)[None]
        cos, sin = inner.rotary_emb(h, pos)  # [1, T, hd]
        cos, sin = cos[:, None, :, None, :], sin[:, None, :, None, :]  # -> [1, 1, T, 1, hd]
        h = h[None].expand(K, B, T, -1).reshape(K, B * T, -1).contiguous()
        G, hd = lay.q_per_kv, lay.head_dim
        for l, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            idx, cnt = h_idx[l], h_cnt[l]
            q = pk.gather_rows_gemm(x, attn.q_proj.weight, idx, cnt, G * hd, attn.q_proj.bias,
                                    backend=backend, validate=False)
            k = pk.gather_rows_gemm(x, attn.k_proj.weight, idx, cnt, hd, attn.k_proj.bias,
                                    backend=backend, validate=False)
            v = pk.gather_rows_gemm(x, attn.v_proj.weight, idx, cnt, hd, attn.v_proj.bias,
                                    backend=backend, validate=False)
            q = q.view(K, B, T, -1, hd)
            k = k.view(K, B, T, -1, hd)
            q = (q * cos + _rotate_half(q) * sin).to(x.dtype)
            k = (k * cos + _rotate_half(k) * sin).to(x.dtype)
            o = pk.masked_attention(q, k, v.view(K, B, T, -1, hd), cnt, attn.scaling,
                                    backend=backend, validate=False)
            h = pk.gather_cols_gemm(o.view(K, B * T, -1), attn.o_proj.weight, idx, cnt, G * hd,
                                    h, backend=backend, validate=False)
            if attn.o_proj.bias is not None:
                h = h + attn.o_proj.bias * layer_keep[l].to(h.dtype)[:, None, None]
            x = layer.post_attention_layernorm(h)
            idx, cnt = c_idx[l], c_cnt[l]
            a = pk.gather_rows_swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, idx, cnt,
                                      backend=backend, validate=False)
            h = pk.gather_cols_gemm(a, mlp.down_proj.weight, idx, cnt, 1, h,
                                    backend=backend, validate=False)
        h = inner.norm(h.view(K, B, T, -1)[:, :, :-1]).reshape(K, B * (T - 1), -1)
        labels = ids[:, 1:].reshape(-1)
        # Logit chunks of at most 2**24 fp32 values (64 MiB) over all K masks: the vocabulary is
        # the largest activation of a small model and would otherwise grow with K.
        w = self.model.lm_head.weight
        chunk = max(1, (1 << 24) // (K * w.shape[0]))
        return pk.lm_head_ce(h, w, labels, chunk_size=chunk, backend=backend)

    def all_ones(self, K: int = 1) -> torch.Tensor:
        return torch.ones(K, self.layout.n_units, dtype=torch.bool, device=self.device)


def sizes_of(layout: UnitLayout, mask: torch.Tensor) -> List[dict]:
    """Per-layer kept KV groups and channels of a hard mask (for reports)."""
    m = layout.split(mask.bool().cpu())
    return [{"layer": l, "kept": bool(m.layers[l]), "kv_heads": int(m.heads[l].sum()),
             "channels": int(m.channels[l].sum())} for l in range(layout.n_layers)]
