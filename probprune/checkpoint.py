"""The search's checkpoint as one safetensors file: its tensors in the file, everything else (the
settings, the history, scalars, the nesting) as JSON in the file's metadata.

No pickle: reading a checkpoint runs no code, any safetensors reader opens it, and the JSON says
what it holds. One file, written atomically (:func:`probprune.files.atomic_write`), so a run
killed while writing keeps its previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_write

FORMAT = "probprune-checkpoint/1"
_TENSOR = "__tensor__"  # {"__tensor__": key}: the tensor stored under key


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back."""


def _encode(value: Any, tensors: Dict[str, torch.Tensor], where: str):
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # contiguous host copies: safetensors refuses views and tensors that share storage
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or _TENSOR in value:
            raise TypeError(f"checkpoint entry {where or '/'}: keys must be strings (JSON)")
        return {k: _encode(v, tensors, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint entry {where or '/'} is a {type(value).__name__}: only tensors, "
                    f"numbers, strings, None, lists and dicts are stored")


def _decode(value: Any, tensors: Dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_checkpoint(path: str, ckpt: Dict[str, Any]) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(ckpt, tensors, "")
    metadata = {"format": FORMAT, "tree": json.dumps(tree)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The dict :func:`save_checkpoint` wrote (tuples come back as lists), tensors on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors' own errors say little of which file
        raise CheckpointError(f"cannot read the checkpoint {path!r}: {e}") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a probprune checkpoint of format {FORMAT} "
                              f"(its metadata says {metadata.get('format')!r})")
    return _decode(json.loads(metadata["tree"]), tensors)
