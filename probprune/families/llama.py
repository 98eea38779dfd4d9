"""Llama and Mistral: the layout of :class:`~probprune.families.base.Family` as it is."""
from __future__ import annotations

from .base import Family


class Llama(Family):
    pass


class Mistral(Family):
    """Mistral differs from Llama only in its sliding window, which the K-mask forward refuses
    beyond (see :class:`probprune.forward.MaskedCausalLM`)."""
    name = "Mistral"
    model_types = ("mistral",)
