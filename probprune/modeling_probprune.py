"""Llama / Mistral / Qwen2 / Qwen3 with per-layer sizes: the model class of a probprune export.

This file is copied next to every exported model, so it imports only torch and transformers:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it from there, and
``probprune.load_pruned(path)`` uses the packaged copy. ``config.probprune_layout`` lists, for each
saved layer, the KV-head groups and MLP channels it kept, and (``o_bias`` / ``down_bias``) whether
o_proj / down_proj carry a bias the original model lacks (compensation's mean shift); the saved ``num_hidden_layers`` already
counts only the kept layers. The query heads per KV head stay those of the original model, so the
stock attention code runs unchanged on the narrower projections.
"""
import torch
from torch import nn
from transformers import (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)


class NoAttention(nn.Module):
    """A layer whose every head was pruned: contributes nothing (or o_proj's bias), but keeps the
    KV cache's sequence length in step for generation. ``qk_norms``: Qwen3's q_norm / k_norm,
    unused here but kept with the layer, whose parameter count includes them."""

    def __init__(self, hidden_size, head_dim, o_bias, layer_idx, qk_norms=None):
        super().__init__()
        self.head_dim, self.layer_idx = head_dim, layer_idx
        self.o_bias = nn.Parameter(torch.zeros(hidden_size)) if o_bias else None
        if qk_norms is not None:
            self.q_norm, self.k_norm = qk_norms

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


def _linear(n_in, n_out, like, bias=False):
    return nn.Linear(n_in, n_out, bias=bias or like.bias is not None, device=like.weight.device,
                     dtype=like.weight.dtype)


def shrink_to_layout(model):
    """Replaces each layer's projections by ones of the saved sizes (before weights are loaded)."""
    config = model.config
    layout = getattr(config, "probprune_layout", None)
    if layout is None:
        raise ValueError("config has no probprune_layout: not a probprune export")
    if len(layout) != len(model.model.layers):
        raise ValueError(f"probprune_layout has {len(layout)} layers, the config "
                         f"{len(model.model.layers)}")
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    d = config.hidden_size
    for i, (layer, sizes) in enumerate(zip(model.model.layers, layout)):
        attn, mlp = layer.self_attn, layer.mlp
        n, f = sizes["kv_heads"], sizes["intermediate"]
        o_bias, down_bias = sizes.get("o_bias", False), sizes.get("down_bias", False)
        if n == 0:
            norms = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None
            layer.self_attn = NoAttention(d, hd, o_bias or attn.o_proj.bias is not None, i, norms)
        else:
            attn.q_proj = _linear(d, n * group * hd, attn.q_proj)
            attn.k_proj = _linear(d, n * hd, attn.k_proj)
            attn.v_proj = _linear(d, n * hd, attn.v_proj)
            attn.o_proj = _linear(n * group * hd, d, attn.o_proj, o_bias)
        mlp.gate_proj = _linear(d, f, mlp.gate_proj)
        mlp.up_proj = _linear(d, f, mlp.up_proj)
        mlp.down_proj = _linear(f, d, mlp.down_proj, down_bias)


class ProbPruneLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_layout(self)


class ProbPruneMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_layout(self)


class ProbPruneQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_layout(self)


class ProbPruneQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_layout(self)


CLASSES = {"llama": ProbPruneLlamaForCausalLM, "mistral": ProbPruneMistralForCausalLM,
           "qwen2": ProbPruneQwen2ForCausalLM, "qwen3": ProbPruneQwen3ForCausalLM}
