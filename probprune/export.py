"""Export of a physically smaller model and its reload in one call.

A pruned model is a directory: ``model.safetensors`` (sliced weights; dropped layers removed and
the rest renumbered), ``config.json`` (the original config with the kept layer count, the per-layer
sizes in ``probprune_layout`` and an ``auto_map`` to ``modeling_probprune.py``), the tokenizer, and
``probprune.json`` (kept KV groups, channels and layers by original index, and the settings).
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
from .models import resolve_dtype
from .units import UnitLayout

MANIFEST = "probprune.json"
FORMAT_VERSION = 1


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def kept_indices(layout: UnitLayout, mask: torch.Tensor) -> dict:
    """Kept layers, and per kept layer its KV groups and channels, by original index."""
    m = layout.split(mask.bool().cpu())
    layers = [l for l in range(layout.n_layers) if bool(m.layers[l])]
    return {"layers": layers,
            "kv_heads": {str(l): m.heads[l].nonzero().flatten().tolist() for l in layers},
            "channels": {str(l): m.channels[l].nonzero().flatten().tolist() for l in layers}}


def pruned_state_dict(model, layout: UnitLayout, mask: torch.Tensor):
    """(state dict of the physically pruned model, per-saved-layer sizes)."""
    kept = kept_indices(layout, mask)
    G, hd = layout.q_per_kv, layout.head_dim
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


def export_pruned(model, tokenizer, layout: UnitLayout, mask: torch.Tensor, out_dir: str,
                  metadata: Optional[Dict] = None) -> str:
    """Writes the physically pruned model to ``out_dir``; returns ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    sd, sizes, kept = pruned_state_dict(model, layout, mask)
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: the embedding is the one copy on disk
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    pruned_config(model.config, sizes, kept["layers"]).save_pretrained(out_dir)
    shutil.copyfile(modeling_probprune.__file__, os.path.join(out_dir, "modeling_probprune.py"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    manifest = {"format": FORMAT_VERSION, "model_type": model.config.model_type,
                "original_num_layers": layout.n_layers, "kept": kept,
                "kept_params": float(layout.kept_params(mask)),
                "prunable_params": layout.prunable_params, **(metadata or {})}
    _atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    return out_dir


def load_pruned(path: str, dtype="float32", device="cpu", with_tokenizer: bool = False):
    """Loads a probprune export in one call (no ``trust_remote_code`` needed)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise FileNotFoundError(f"{path!r} is not a probprune export (no {MANIFEST})")
    config = AutoConfig.from_pretrained(path)
    cls = modeling_probprune.CLASSES[config.model_type]
    model = cls.from_pretrained(path, config=config, dtype=resolve_dtype(dtype))
    model.to(device).eval()
    if not with_tokenizer:
        return model
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(path)
