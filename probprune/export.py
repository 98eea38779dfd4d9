"""Export of a physically smaller model and its reload in one call.

A pruned model is a directory: ``model.safetensors`` (sliced weights; dropped layers removed and
the rest renumbered), ``config.json`` (the original config with the kept layer count, the per-layer
sizes in ``probprune_layout`` and an ``auto_map`` to ``modeling_probprune.py``), the tokenizer, and
``probprune.json`` (kept KV groups, channels and layers by original index, and the settings).
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
from .models import MANIFEST
from .units import UnitSpace

FORMAT_VERSION = 1


def kept_indices(units: UnitSpace, mask: torch.Tensor) -> dict:
    """Kept layers, and per kept layer its KV groups and channels, by original index."""
    m = units.split(mask.bool().cpu())
    layers = [l for l in range(units.n_layers) if bool(m.layers[l])]
    return {"layers": layers,
            "kv_heads": {str(l): m.heads[l].nonzero().flatten().tolist() for l in layers},
            "channels": {str(l): m.mlp[l].nonzero().flatten().tolist() for l in layers}}


def pruned_state_dict(model, units: UnitSpace, mask: torch.Tensor):
    """(state dict of the physically pruned model, per-saved-layer sizes, kept indices) for a
    hard model-unit mask."""
    kept = kept_indices(units, mask)
    G, hd = units.shape.q_per_kv, units.shape.head_dim
    sd = model.state_dict()
    out, sizes = {}, []
    for key, t in sd.items():
        if not key.startswith("model.layers."):
            out[key] = t
    for new, l in enumerate(kept["layers"]):
        heads = torch.tensor(kept["kv_heads"][str(l)], dtype=torch.long)
        chans = torch.tensor(kept["channels"][str(l)], dtype=torch.long)
        q_rows = (heads[:, None] * (G * hd) + torch.arange(G * hd)).flatten()
        kv_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        src, dst = f"model.layers.{l}.", f"model.layers.{new}."
        for key, t in sd.items():
            if not key.startswith(src):
                continue
            name = key[len(src):]
            if heads.numel() == 0 and name.startswith("self_attn."):
                if name == "self_attn.o_proj.bias":
                    out[dst + "self_attn.o_bias"] = t
                continue
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
        sizes.append({"kv_heads": int(heads.numel()), "intermediate": int(chans.numel())})
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


def export_pruned(model, tokenizer, units: UnitSpace, mask: torch.Tensor, out_dir: str,
                  metadata: Optional[Dict] = None) -> str:
    """Writes the model physically pruned to a hard model-unit mask to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    sd, sizes, kept = pruned_state_dict(model, units, mask)
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
                "prunable_params": units.prunable_params, **(metadata or {})}
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    return out_dir
