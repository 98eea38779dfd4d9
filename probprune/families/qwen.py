"""Qwen2 and Qwen3: the Llama layout, with q/k/v biases (Qwen2) or per-head q/k norms (Qwen3)."""
from __future__ import annotations

from .base import Family


class Qwen2(Family):
    name = "Qwen2"
    model_types = ("qwen2",)

    def attention_biases(self, config):
        return True, False  # q/k/v always carry a bias, o_proj never


class Qwen3(Family):
    name = "Qwen3"
    model_types = ("qwen3",)
    QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
