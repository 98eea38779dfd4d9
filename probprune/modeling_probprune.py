"""Any supported family with per-layer sizes: the model class of a probprune export.

This file is copied next to every exported model, so it imports only torch and transformers:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it from there, and
``probprune.load_pruned(path)`` uses the packaged copy. ``config.probprune_modules`` says where a
layer's projections are (the family's names, written by the export), and
``config.probprune_layout`` lists, for each
saved layer, the KV-head groups and MLP channels it kept, and (``o_bias`` / ``down_bias``) whether
o_proj / down_proj carry a bias the original model lacks (compensation's mean shift); the saved ``num_hidden_layers`` already
counts only the kept layers. Where every kept KV group keeps all its query heads, the stock
attention code runs unchanged on the narrower projections; a layer whose groups kept different
numbers of query heads (``q_per_kv``: the count of each kept group) gets each query head's key and
value by index instead of by an even repeat (:func:`query_head_attention`).
"""
import copy

import torch
from torch import nn
import transformers
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

QUERY_HEAD_ATTENTION = "probprune_query_heads"


def query_head_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention for KV groups of uneven size: key/value [B, Hkv, T, D] are gathered to one per
    query head (``module.kv_of_q``: the KV head of each query head), then the model's own
    attention implementation runs with
    one query head per KV head. Registered under its own name, so stock layers are untouched."""
    index = module.kv_index_on.get(key.device)
    if index is None:  # once per device
        index = module.kv_index_on[key.device] = torch.tensor(module.kv_of_q, device=key.device)
    key = key.index_select(1, index)
    value = value.index_select(1, index)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.probprune_model_config._attn_implementation, eager_attention_forward)
    return attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(QUERY_HEAD_ATTENTION, query_head_attention)


def _uneven_groups(attn, config, per_group):
    """Makes ``attn`` read each query head's KV head by index: ``per_group`` query heads in
    each kept KV group, in order."""
    # A plain list, not a buffer: from_pretrained builds the model on the meta device and would
    # leave a non-persistent buffer uninitialised.
    attn.kv_of_q = [j for j, c in enumerate(per_group) for _ in range(c)]
    attn.kv_index_on = {}  # device -> kv_of_q as a tensor there
    attn.num_key_value_groups = 1
    attn.probprune_model_config = config
    attn.config = copy.copy(config)  # this layer's own attention implementation name
    attn.config._attn_implementation = QUERY_HEAD_ATTENTION


class NoAttention(nn.Module):
    """A layer whose every head was pruned: contributes nothing (or o_proj's bias), but keeps the
    KV cache's sequence length in step for generation. ``qk_norms``: the per-head q/k norms by
    name (Qwen3), unused here but kept with the layer, whose parameter count includes them."""

    def __init__(self, hidden_size, head_dim, o_bias, layer_idx, qk_norms=()):
        super().__init__()
        self.head_dim, self.layer_idx = head_dim, layer_idx
        self.o_bias = nn.Parameter(torch.zeros(hidden_size)) if o_bias else None
        for name, norm in qk_norms:
            setattr(self, name, norm)

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


PREFIX = "ProbPrune"
# Exports written before config.probprune_modules existed: all of the Llama layout.
LLAMA_MODULES = {
    "layers": "model.layers", "qk_norms": [],
    "parts": {"attn": "self_attn", "mlp": "mlp", "q": "self_attn.q_proj",
              "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}}


def _linear(n_in, n_out, like, bias=False):
    return nn.Linear(n_in, n_out, bias=bias or like.bias is not None, device=like.weight.device,
                     dtype=like.weight.dtype)


def _replace(layer, path, module):
    owner, _, attr = path.rpartition(".")
    setattr(layer.get_submodule(owner) if owner else layer, attr, module)


def shrink_to_layout(model):
    """Replaces each layer's projections by ones of the saved sizes (before weights are loaded)."""
    config = model.config
    layout = getattr(config, "probprune_layout", None)
    if layout is None:
        raise ValueError("config has no probprune_layout: not a probprune export")
    modules = getattr(config, "probprune_modules", None) or LLAMA_MODULES
    parts = modules["parts"]
    layers = model.get_submodule(modules["layers"])
    if len(layout) != len(layers):
        raise ValueError(f"probprune_layout has {len(layout)} layers, the config {len(layers)}")
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    d = config.hidden_size
    for i, (layer, sizes) in enumerate(zip(layers, layout)):
        part = layer.get_submodule
        n, f = sizes["kv_heads"], sizes["intermediate"]
        per_group = sizes.get("q_per_kv", [group] * n)
        if len(per_group) != n or min(per_group, default=1) < 1 or max(per_group, default=1) > group:
            raise ValueError(f"probprune_layout layer {i}: q_per_kv {per_group} must give 1 to "
                             f"{group} query heads for each of its {n} KV groups")
        nq = sum(per_group)
        o_bias, down_bias = sizes.get("o_bias", False), sizes.get("down_bias", False)
        if n == 0:
            attn = parts["attn"] + "."
            norms = [(p[len(attn):], part(p)) for p in modules["qk_norms"]]
            _replace(layer, parts["attn"], NoAttention(
                d, hd, o_bias or part(parts["o"]).bias is not None, i, norms))
        else:
            for role, n_in, n_out, bias in (("q", d, nq * hd, False), ("k", d, n * hd, False),
                                            ("v", d, n * hd, False), ("o", nq * hd, d, o_bias)):
                _replace(layer, parts[role], _linear(n_in, n_out, part(parts[role]), bias))
            if nq != n * group:
                _uneven_groups(part(parts["attn"]), config, per_group)
        for role, n_in, n_out, bias in (("gate", d, f, False), ("up", d, f, False),
                                        ("down", f, d, down_bias)):
            _replace(layer, parts[role], _linear(n_in, n_out, part(parts[role]), bias))


_CLASSES = {}


def pruned_class(base):
    """The export's class for the Hugging Face class ``base`` (``LlamaForCausalLM`` ->
    ``ProbPruneLlamaForCausalLM``): ``base`` with its layers shrunk to the saved layout."""
    if base not in _CLASSES:
        def __init__(self, config):
            base.__init__(self, config)
            shrink_to_layout(self)

        name = PREFIX + base.__name__
        _CLASSES[base] = type(name, (base,), {"__init__": __init__, "__module__": __name__,
                                              "__qualname__": name})
    return _CLASSES[base]


def __getattr__(name):
    # config.json's auto_map names the class (ProbPruneLlamaForCausalLM): made on first use from
    # the transformers class it extends, so this file lists no family.
    if name.startswith(PREFIX) and hasattr(transformers, name[len(PREFIX):]):
        return pruned_class(getattr(transformers, name[len(PREFIX):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
