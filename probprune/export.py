"""Export of a physically smaller model and its reload in one call.

A pruned model is a directory: ``model.safetensors`` (sliced weights; dropped layers removed and
the rest renumbered), ``config.json``, the tokenizer, ``probprune.json`` (kept KV groups, channels
and layers by original index, and the settings) and ``README.md``, the model card
(:mod:`probprune.model_card`). Its ``config.json`` is one of two kinds:

* **plain** (:func:`plain_config`): where every kept layer has the same shape and no weight the
  architecture lacks, the original architecture with smaller sizes. Anything that loads the
  original family loads it: ``AutoModelForCausalLM`` without remote code, vLLM, TGI, llama.cpp's
  converter.
* **per-layer**: otherwise the original config with the per-layer sizes in ``probprune_layout``
  and an ``auto_map`` to ``modeling_probprune.py``, copied beside it.

Reading either back is :func:`probprune.models.load_pruned`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from . import modeling_probprune
from .families import Family, family_of
from .files import atomic_write, atomic_write_text
from .model_card import write_model_card
from .placement import move_inputs, move_to
from .models import MANIFEST
from .units import UnitSpace

FORMAT_VERSION = 1
log = logging.getLogger(__name__)
# the base model's sizes, which a plain export's config.json no longer holds (the model card's)
BASE_SIZES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def kept_indices(units: UnitSpace, mask: torch.Tensor) -> dict:
    """Kept layers, and per kept layer its KV groups, query heads and channels, by original
    index."""
    m = units.split(mask.bool().cpu())
    layers = [l for l in range(units.n_layers) if bool(m.layers[l])]

    def ids(t):
        return t.nonzero().flatten().tolist()
    return {"layers": layers,
            "kv_heads": {str(l): ids(units.kv_kept(m.heads[l])) for l in layers},
            "q_heads": {str(l): ids(units.query_kept(m.heads[l])) for l in layers},
            "channels": {str(l): ids(m.mlp[l]) for l in layers}}


def _layer_sizes(family: Family, kept: dict, l: int, shape, weights: Dict[str, torch.Tensor],
                 sd_keys) -> dict:
    """The saved sizes of original layer ``l`` (``probprune_layout``'s entry)."""
    heads = torch.tensor(kept["kv_heads"][str(l)], dtype=torch.long)
    q_heads = torch.tensor(kept["q_heads"][str(l)], dtype=torch.long)
    size = {"kv_heads": int(heads.numel()), "intermediate": len(kept["channels"][str(l)])}
    per_group = torch.bincount(q_heads // shape.q_per_kv, minlength=shape.n_kv_heads)[heads]
    if bool((per_group != shape.q_per_kv).any()):  # single query heads pruned in a group
        size["q_per_kv"] = per_group.tolist()
    # Biases the original layers lack (compensation's mean shift): the modeling file adds them.
    for flag, role in (("o_bias", "o"), ("down_bias", "down")):
        key = family.key(l, role) + ".bias"
        if key in weights and key not in sd_keys:
            size[flag] = True
    return size


def _layer_slices(family: Family, sd: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor],
                  kept: dict, l: int, shape, device=None, index_on: Optional[dict] = None
                  ) -> Dict[str, torch.Tensor]:
    """Original layer ``l``'s tensors sliced to its kept units, keyed by name inside the layer;
    ``weights`` replace the slices of their keys. Each slice moves to ``device`` (default: where
    its weight is) as soon as it is made, so slicing onto the host never holds a second copy of
    the layer set on the model's device. ``index_on``: a cache of the index tensors, for a caller
    that slices the same layer again."""
    src = family.layer_prefix(l)
    layer_keys = [k for k in sd if k.startswith(src)]
    layer_keys += [k for k in weights if k.startswith(src) and k not in sd]
    lists = {"heads": kept["kv_heads"][str(l)], "q_heads": kept["q_heads"][str(l)],
             "channels": kept["channels"][str(l)]}
    # the index lists on the device of the weight they index, made once each
    index_on = {} if index_on is None else index_on

    def index(what: str, dev: torch.device) -> torch.Tensor:
        if (what, dev) not in index_on:
            if what == "q_rows":
                t = shape.query_columns(index("q_heads", dev))
            elif what == "kv_rows":
                t = shape.query_columns(index("heads", dev))  # KV head h owns the same rows
            else:
                t = torch.tensor(lists[what], dtype=torch.long, device=dev)
            index_on[what, dev] = t
        return index_on[what, dev]

    out = {}
    no_heads = not lists["heads"]
    o_bias = family.PARTS["o"] + ".bias"
    for key in layer_keys:
        name = key[len(src):]
        t = weights[key] if key in weights else sd[key]
        if no_heads and family.is_attention(name):
            # the modeling file's NoAttention in place of the attention block
            if name == o_bias:
                out[family.PARTS["attn"] + ".o_bias"] = t.to(device or t.device)
            elif family.is_qk_norm(name):  # part of the layer's fixed cost: kept with the layer
                out[name] = t.to(device or t.device)
            continue
        rule = None if key in weights else family.slice_rule(name)
        if rule is not None:  # the original weight: keep the rows / columns of kept units
            dim, rows = rule
            t = t.index_select(dim, index(rows, t.device))
        out[name] = t.to(device or t.device)
    return out


def pruned_state_dict(model, units: UnitSpace, mask: torch.Tensor,
                      weights: Optional[Dict[str, torch.Tensor]] = None, device=None):
    """(state dict of the physically pruned model, per-saved-layer sizes, kept indices) for a
    hard model-unit mask. ``weights``: tensors that replace the slices of the same keys (already
    of the kept width, e.g. :class:`probprune.compensate.Compensation` refits; a bias key the model
    lacks is added). ``device``: where every tensor of the result goes, slice by slice (default:
    where its weight is)."""
    weights = weights or {}
    family = family_of(model.config)
    kept = kept_indices(units, mask)
    sd = model.state_dict()
    out = {k: t.to(device or t.device) for k, t in sd.items()
           if not k.startswith(family.LAYERS + ".")}
    sizes = []
    for new, l in enumerate(kept["layers"]):
        dst = family.layer_prefix(new)
        for name, t in _layer_slices(family, sd, weights, kept, l, units.shape, device).items():
            out[dst + name] = t
        sizes.append(_layer_sizes(family, kept, l, units.shape, weights, sd))
    return out, sizes, kept


def pruned_config(config, sizes, kept_layers):
    family = family_of(config)
    cls = family.pruned_class(config)
    cfg = copy.deepcopy(config)
    cfg.probprune_modules = family.modeling_layout()
    cfg.num_hidden_layers = len(sizes)
    cfg.probprune_layout = sizes
    cfg.architectures = [cls.__name__]
    cfg.auto_map = {"AutoModelForCausalLM": f"modeling_probprune.{cls.__name__}"}
    _kept_layer_types(cfg, kept_layers)
    return cfg


def not_plain(sizes) -> Optional[str]:
    """Why saved layers of these sizes (:func:`_layer_sizes` of each) need the per-layer export,
    in words; None: the original architecture holds them."""
    if not sizes:
        return "no layer kept"
    if any(s.get("o_bias") or s.get("down_bias") for s in sizes):
        return "the refit's biases"
    if any(s["kv_heads"] == 0 for s in sizes):
        return "a layer without attention"
    if any(s["intermediate"] == 0 for s in sizes):
        return "a layer without MLP channels"
    if any(s != sizes[0] for s in sizes):
        return "layers of different sizes"
    if len(set(sizes[0].get("q_per_kv", [0]))) != 1:  # the stock attention repeats KV evenly
        return "KV groups of different sizes"
    return None


def _kept_layer_types(cfg, kept_layers) -> None:
    """Per-layer attention kinds (sliding or full) follow the kept layers."""
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[l] for l in kept_layers]


def plain_config(config, sizes, kept_layers):
    """The original architecture's config at the pruned sizes, or None where :func:`not_plain`
    says why not."""
    if not_plain(sizes) is not None:
        return None
    first = sizes[0]
    shape = family_of(config).shape(config)
    q_per_kv = first.get("q_per_kv", [shape.q_per_kv])[0]
    cfg = copy.deepcopy(config)
    # serving engines pick the model class by this name (a config converted from GGUF has none)
    cfg.architectures = [family_of(config).causal_lm_class(config).__name__]
    cfg.head_dim = shape.head_dim  # explicit: the narrower attention no longer implies it
    cfg.num_key_value_heads = first["kv_heads"]
    cfg.num_attention_heads = first["kv_heads"] * q_per_kv
    cfg.intermediate_size = first["intermediate"]
    cfg.num_hidden_layers = len(sizes)
    _kept_layer_types(cfg, kept_layers)
    for name in ("auto_map", "probprune_layout", "probprune_modules"):
        if hasattr(cfg, name):
            delattr(cfg, name)
    return cfg


def pruned_model(model, units: UnitSpace, mask: torch.Tensor,
                 weights: Optional[Dict[str, torch.Tensor]] = None):
    """The physically pruned model in memory, for evaluation: the model :func:`export_pruned`
    writes and :func:`probprune.models.load_pruned` reads back, built without a second copy of
    the weights. Its embedding, final norm and lm_head are the dense model's tensors (shared);
    each decoder layer is sliced from the dense layer's weights, on that layer's device, when its
    forward starts, and released when it ends. So a device holds at most one pruned layer beside
    the dense model (LLaMA-2-13B in float32 and its 30% pruned copy do not fit 80 GB together),
    at the cost of one slice of the kept weights per forward."""
    weights = weights or {}
    family = family_of(model.config)
    layers = family.LAYERS + "."
    kept = kept_indices(units, mask)
    sd = model.state_dict()
    sizes = [_layer_sizes(family, kept, l, units.shape, weights, sd) for l in kept["layers"]]
    cfg = pruned_config(model.config, sizes, kept["layers"])
    with torch.device("meta"):
        pruned = family.pruned_class(cfg)(cfg)
    pruned.load_state_dict({k: t for k, t in sd.items() if not k.startswith(layers)},
                           strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        pruned.tie_weights()
    # Non-persistent buffers (the rotary frequencies) are not in a state dict: the original
    # model's are the same.
    originals = dict(model.named_buffers())
    for name, buf in list(pruned.named_buffers()):
        if buf.is_meta and not name.startswith(layers):
            owner, _, attr = name.rpartition(".")
            setattr(pruned.get_submodule(owner), attr, originals[name].clone())
    missing = [n for n, p in pruned.named_parameters()
               if p.is_meta and not n.startswith(layers)]
    if missing:
        raise RuntimeError(f"pruned model has no weights for {missing[:4]}")
    dense_layers, head = family.layers(model), family.head(model)
    for layer, l in zip(family.layers(pruned), kept["layers"]):
        dev = next(dense_layers[l].parameters()).device
        src = family.layer_prefix(l)  # this layer's entries, found once, not on every forward
        own = ({k: t for k, t in sd.items() if k.startswith(src)},
               {k: t for k, t in weights.items() if k.startswith(src)})
        _slice_when_called(layer, lambda l=l, dev=dev, own=own, cache={}: _layer_slices(
            family, *own, kept, l, units.shape, dev, cache), dev, head.weight.dtype)
    # With the layers spread over devices (or a last kept layer away from the final norm's
    # device), the hidden states follow each module as in the dense model.
    move_inputs(family.final_norm(pruned), family.final_norm(model).weight.device)
    move_inputs(family.head(pruned), head.weight.device)
    return pruned.eval()


def _slice_when_called(layer: torch.nn.Module, slices, device: torch.device,
                       dtype: torch.dtype) -> None:
    """Gives ``layer`` the tensors ``slices()`` returns (floating ones in ``dtype``) for the
    length of each forward, with its inputs moved to ``device``; between calls its parameters
    are on the meta device."""
    def fill(module, args, kwargs):
        module.load_state_dict({k: v.to(dtype=dtype) if v.is_floating_point() else v
                                for k, v in slices().items()}, strict=True, assign=True)
        return move_to(args, device), {k: move_to(v, device) for k, v in kwargs.items()}

    def release(module, args, output):
        # New meta parameters in place of the slices. Not ``to_empty``: it swaps ``.data`` in
        # place, and an unsliced tensor (a norm) is the dense model's own storage.
        for name, p in list(module.named_parameters()):
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr,
                    torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    layer.register_forward_pre_hook(fill, with_kwargs=True)
    layer.register_forward_hook(release)


def export_pruned(model, tokenizer, units: UnitSpace, mask: torch.Tensor, out_dir: str,
                  metadata: Optional[Dict] = None,
                  weights: Optional[Dict[str, torch.Tensor]] = None,
                  model_card: bool = True) -> str:
    """Writes the model physically pruned to a hard model-unit mask to ``out_dir``; ``weights``
    replace slices (see :func:`pruned_state_dict`). ``model_card``: False for a caller that
    writes the card itself, once it has measured the figures the card shows."""
    os.makedirs(out_dir, exist_ok=True)
    # Sliced straight to the host: the device never holds the pruned copy beside the dense model.
    sd, sizes, kept = pruned_state_dict(model, units, mask, weights, device="cpu")
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop(family_of(model.config).HEAD + ".weight", None)  # tied: the embedding is the one copy on disk
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    config = plain_config(model.config, sizes, kept["layers"])
    modeling = os.path.join(out_dir, "modeling_probprune.py")
    if config is None:
        pruned_config(model.config, sizes, kept["layers"]).save_pretrained(out_dir)
        shutil.copyfile(modeling_probprune.__file__, modeling)
        log.info("export: per-layer sizes (%s); loads with trust_remote_code=True or "
                 "probprune.load_pruned", not_plain(sizes))
    else:
        config.save_pretrained(out_dir)
        if os.path.exists(modeling):  # an earlier per-layer export into the same directory
            os.remove(modeling)
        log.info("export: plain %s, every layer alike (%d KV groups, %d MLP channels); loads "
                 "without remote code", config.architectures[0], config.num_key_value_heads,
                 config.intermediate_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    manifest = {"format": FORMAT_VERSION, "model_type": model.config.model_type,
                "architecture": "per-layer" if config is None else "plain",
                "base": {k: getattr(model.config, k) for k in BASE_SIZES},
                "original_num_layers": units.n_layers, "kept": kept,
                "kept_params": float(units.kept_params(mask)),
                "prunable_params": units.prunable_params,
                "params": {"base_total": sum(p.numel() for p in model.parameters()),
                           "total": sum(v.numel() for v in sd.values())},
                **(metadata or {})}
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    if model_card:
        write_model_card(out_dir)
    return out_dir
