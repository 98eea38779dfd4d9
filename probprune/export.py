"""Export of a physically smaller model and its reload in one call.

A pruned model is a directory: ``model.safetensors`` (sliced weights; dropped layers removed and
the rest renumbered), ``config.json`` (the original config with the kept layer count, the per-layer
sizes in ``probprune_layout`` and an ``auto_map`` to ``modeling_probprune.py``), the tokenizer, and
``probprune.json`` (kept KV groups, channels and layers by original index, and the settings)
and ``README.md``, the model card (:mod:`probprune.model_card`).
Reading it back is :func:`probprune.models.load_pruned`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from . import modeling_probprune
from .files import atomic_write, atomic_write_text
from .model_card import write_model_card
from .models import MANIFEST
from .units import UnitSpace

FORMAT_VERSION = 1
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # Qwen3: shared by all heads


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


def pruned_state_dict(model, units: UnitSpace, mask: torch.Tensor,
                      weights: Optional[Dict[str, torch.Tensor]] = None):
    """(state dict of the physically pruned model, per-saved-layer sizes, kept indices) for a
    hard model-unit mask. ``weights``: tensors that replace the slices of the same keys (already
    of the kept width, e.g. :class:`probprune.compensate.Compensation` refits; a bias key the model
    lacks is added)."""
    weights = weights or {}
    kept = kept_indices(units, mask)
    shape = units.shape
    hd = shape.head_dim
    sd = model.state_dict()
    out, sizes = {}, []
    for key, t in sd.items():
        if not key.startswith("model.layers."):
            out[key] = t
    for new, l in enumerate(kept["layers"]):
        heads = torch.tensor(kept["kv_heads"][str(l)], dtype=torch.long)
        q_heads = torch.tensor(kept["q_heads"][str(l)], dtype=torch.long)
        chans = torch.tensor(kept["channels"][str(l)], dtype=torch.long)
        q_rows = shape.query_columns(q_heads)
        kv_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        src, dst = f"model.layers.{l}.", f"model.layers.{new}."
        layer_keys = [k for k in sd if k.startswith(src)]
        layer_keys += [k for k in weights if k.startswith(src) and k not in sd]
        for key in layer_keys:
            name = key[len(src):]
            t = weights[key] if key in weights else sd[key]
            if heads.numel() == 0 and name.startswith("self_attn."):
                if name == "self_attn.o_proj.bias":
                    out[dst + "self_attn.o_bias"] = t
                elif name in QK_NORMS:  # part of the layer's fixed cost: kept with the layer
                    out[dst + name] = t
                continue
            if key not in weights:  # the original weight: keep the rows / columns of kept units
                if name.startswith("self_attn.q_proj."):
                    t = t.index_select(0, q_rows)
                elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                    t = t.index_select(0, kv_rows)
                elif name == "self_attn.o_proj.weight":
                    t = t.index_select(1, q_rows)
                elif name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                    t = t.index_select(0, chans)
                elif name == "mlp.down_proj.weight":
                    t = t.index_select(1, chans)
            out[dst + name] = t
        size = {"kv_heads": int(heads.numel()), "intermediate": int(chans.numel())}
        per_group = torch.bincount(q_heads // shape.q_per_kv, minlength=shape.n_kv_heads)[heads]
        if bool((per_group != shape.q_per_kv).any()):  # single query heads pruned in a group
            size["q_per_kv"] = per_group.tolist()
        # Biases the original layers lack (compensation's mean shift): the modeling file adds them.
        for flag, key in (("o_bias", "self_attn.o_proj.bias"), ("down_bias", "mlp.down_proj.bias")):
            if src + key in weights and src + key not in sd:
                size[flag] = True
        sizes.append(size)
    return out, sizes, kept


def pruned_config(config, sizes, kept_layers):
    cls = modeling_probprune.CLASSES[config.model_type]
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(sizes)
    cfg.probprune_layout = sizes
    cfg.architectures = [cls.__name__]
    cfg.auto_map = {"AutoModelForCausalLM": f"modeling_probprune.{cls.__name__}"}
    if getattr(cfg, "layer_types", None) is not None:  # per-layer attention kinds follow the layers
        cfg.layer_types = [cfg.layer_types[l] for l in kept_layers]
    return cfg


def pruned_model(model, units: UnitSpace, mask: torch.Tensor,
                 weights: Optional[Dict[str, torch.Tensor]] = None):
    """The physically pruned model in memory (what :func:`export_pruned` writes and
    :func:`probprune.models.load_pruned` reads back), on the model's device."""
    sd, sizes, kept = pruned_state_dict(model, units, mask, weights)
    cfg = pruned_config(model.config, sizes, kept["layers"])
    cls = modeling_probprune.CLASSES[model.config.model_type]
    with torch.device("meta"):
        pruned = cls(cfg)
    ref = model.lm_head.weight
    sd = {k: v.detach().to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
          for k, v in sd.items()}
    pruned.load_state_dict(sd, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        pruned.tie_weights()
    missing = [n for n, p in pruned.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"pruned model has no weights for {missing[:4]}")
    # Non-persistent buffers (the rotary frequencies) are not in a state dict: the original
    # model's are the same.
    originals = dict(model.named_buffers())
    for name, buf in list(pruned.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(pruned.get_submodule(owner), attr, originals[name].clone())
    return pruned.eval()


def export_pruned(model, tokenizer, units: UnitSpace, mask: torch.Tensor, out_dir: str,
                  metadata: Optional[Dict] = None,
                  weights: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Writes the model physically pruned to a hard model-unit mask to ``out_dir``; ``weights``
    replace slices (see :func:`pruned_state_dict`)."""
    os.makedirs(out_dir, exist_ok=True)
    sd, sizes, kept = pruned_state_dict(model, units, mask, weights)
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: the embedding is the one copy on disk
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    pruned_config(model.config, sizes, kept["layers"]).save_pretrained(out_dir)
    shutil.copyfile(modeling_probprune.__file__, os.path.join(out_dir, "modeling_probprune.py"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    manifest = {"format": FORMAT_VERSION, "model_type": model.config.model_type,
                "original_num_layers": units.n_layers, "kept": kept,
                "kept_params": float(units.kept_params(mask)),
                "prunable_params": units.prunable_params,
                "params": {"base_total": sum(p.numel() for p in model.parameters()),
                           "total": sum(v.numel() for v in sd.values())},
                **(metadata or {})}
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    write_model_card(out_dir)  # without figures yet: whoever measures them writes it again
    return out_dir
