"""Weights streamed from safetensors files straight onto their devices, in the target dtype.

``from_pretrained`` without accelerate materialises the whole model on the host before it can be
moved: 26 GB of host memory for a 13B model in bf16 headed for a GPU, 140 GB for a 70B. Here the
model is built on the meta device (no storage), then each tensor is read from its file, cast and
placed on the device that will hold it, one tensor at a time; the host holds at most one tensor
in the file's dtype beyond what lives on the host anyway. The files are memory-mapped, so their
pages are the kernel's page cache (reclaimable), not process memory. accelerate's
``init_empty_weights`` builds the model: parameters without storage, buffers computed as at any
construction (the rotary frequencies, which no checkpoint holds), then moved to their devices.

Checkpoints without safetensors files (``pytorch_model.bin``) go through ``from_pretrained``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(path: str) -> Optional[List[str]]:
    """The weight files of a directory (the index's shards, or the single file); None if it has no
    safetensors weights."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, SINGLE_FILE)
    return [single] if os.path.isfile(single) else None


def device_map(model: nn.Module, devices: Optional[List[str]], device: str) -> Dict[str, torch.device]:
    """Module-name prefix -> device: everything on ``device``, or the layer sharding of
    :func:`probprune.placement.plan` over ``devices``."""
    if devices and len(devices) > 1:
        from .placement import plan

        return plan(model, devices).module_devices()
    return {"": torch.device(device)}


def device_of(name: str, mapping: Dict[str, torch.device]) -> torch.device:
    # The longest prefix that names ``name`` or one of its parent modules.
    best = None
    for prefix, dev in mapping.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return mapping[best]


def stream_model(cls, path: str, config, dtype: torch.dtype,
                 mapping_of: Callable[[nn.Module], Dict[str, torch.device]]):
    """Builds ``cls`` from ``config`` on the meta device and streams the directory's safetensors
    weights into it; ``mapping_of(meta_model)`` says where each module goes. Raises
    ``FileNotFoundError`` naming the file when the directory has no safetensors weights, and
    ``ValueError`` naming the tensors a checkpoint lacks or has in another shape."""
    from safetensors import safe_open

    from accelerate import init_empty_weights

    files = safetensors_files(path)
    if files is None:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")
    with init_empty_weights(include_buffers=False):
        # AutoModelForCausalLM resolves the architecture's class through from_config
        build = getattr(cls, "_from_config", None) or cls.from_config
        model = build(config, dtype=dtype)
    model.tie_weights()  # the empty parameters were made apart: one tensor under both names again
    mapping = mapping_of(model)
    # Every name of every tensor the checkpoint holds: a tied lm_head is one tensor under two
    # names, and checkpoints store it under either (save_model keeps one of them).
    wanted = model.state_dict(keep_vars=True)
    names = {}
    for name, t in wanted.items():
        names.setdefault(id(t), []).append(name)
    loaded, unexpected = set(), []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in wanted:
                    unexpected.append(key)
                    continue
                meta = wanted[key]
                if id(meta) in loaded:
                    continue  # the second name of a tied tensor
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the "
                                     f"model expects {tuple(meta.shape)}")
                target = meta.dtype if meta.is_floating_point() else tensor.dtype
                placed = tensor.to(device_of(key, mapping), target)
                del tensor
                if isinstance(meta, nn.Parameter):  # one Parameter object under every name
                    placed = nn.Parameter(placed, requires_grad=meta.requires_grad)
                for name in names[id(meta)]:
                    _set(model, name, placed)
                loaded.add(id(meta))
    missing = sorted(names[i][0] for i in set(names) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint in {path!r} lacks {len(missing)} tensors the model "
                         f"needs: {shown}")
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model has no place for: %s",
                    len(unexpected), ", ".join(unexpected[:5]))
    for name, buf in model.named_buffers():  # those no checkpoint holds, made on the host
        if buf.device != device_of(name, mapping):
            _set(model, name, buf.to(device_of(name, mapping)))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"tensors left without storage after loading {path!r}: {', '.join(left)}")
    _generation_config(model, path)
    return model.eval()


def _set(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Puts ``tensor`` in the place of the parameter or buffer ``name`` (a parameter must come
    as an ``nn.Parameter``)."""
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, tensor)


def _generation_config(model: nn.Module, path: str) -> None:
    if not os.path.isfile(os.path.join(path, "generation_config.json")):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(path)
