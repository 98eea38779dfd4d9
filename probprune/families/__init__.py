"""Model families: where each Hugging Face causal-LM family keeps its parts, and its shape rules.

The engine, compensation, the export, the reload and the export's modeling file reach a model's
modules and tensors through its :class:`~probprune.families.base.Family` only: no other module
spells a Hugging Face attribute path. Adding a family is one module here that subclasses
:class:`~probprune.families.base.Family` (or a family it resembles) and lists its
``model_types``, plus its tests.
"""
from __future__ import annotations

from typing import Dict

from ..units import UnitSpace
from .base import Family, UnsupportedModelError
from .gemma import Gemma3
from .llama import Llama, Mistral
from .qwen import Qwen2, Qwen3

FAMILIES = (Llama(), Mistral(), Qwen2(), Qwen3(), Gemma3())
BY_MODEL_TYPE: Dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_names() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(config) -> Family:
    """The family of a Hugging Face config (or any object with a ``model_type``); raises
    :class:`UnsupportedModelError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        archs = ", ".join(getattr(config, "architectures", None) or [])
        raise UnsupportedModelError(f"model type {model_type!r} ({archs}) is not supported; "
                                    f"supported architectures: {supported_names()}")
    family.check(config)
    return family


def shape_of(config):
    """The :class:`~probprune.units.ModelShape` of a config, by its family's rules."""
    return family_of(config).shape(config)


def units_of(config, include_layers: bool = False, attn_units: str = "kv-group") -> UnitSpace:
    """The model units of a Hugging Face config."""
    return UnitSpace(shape_of(config), include_layers, attn_units=attn_units)


def check_supported(config) -> None:
    """Raises for an architecture the engine has no family for, or a feature it cannot run."""
    family_of(config)


__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "check_supported", "family_of",
           "shape_of", "supported_names", "units_of"]
