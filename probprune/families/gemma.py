"""Gemma 3 (text): the Llama layout with four norms per layer, a GeGLU MLP, per-head q/k norms,
scaled embeddings, and two rotary tables (sliding-window layers and full-attention layers).

Each block's output is normed before it joins the residual stream ("sandwich" norms):
``h + post_attention_layernorm(o_proj(attn))``, then ``h + post_feedforward_layernorm(down(...))``,
and the MLP reads ``pre_feedforward_layernorm(h)``. The embedding module scales by
``sqrt(hidden_size)`` itself, and the attention scale is ``query_pre_attn_scalar ** -0.5``
(the module's own ``scaling``), so both come with the model's modules.
"""
from __future__ import annotations

import torch

from .base import Family, UnsupportedModelError


class Gemma3(Family):
    name = "Gemma3"
    model_types = ("gemma3_text",)
    PARTS = {**Family.PARTS, "mlp_norm": "pre_feedforward_layernorm",
             "attn_out_norm": "post_attention_layernorm",
             "mlp_out_norm": "post_feedforward_layernorm"}
    QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
    NORMS = 4
    OUT_NORMS = ("attn_out_norm", "mlp_out_norm")
    BOS_WINDOWS = True  # without BOS at position 0 Gemma's perplexity is ~10x higher
    ACTIVATION = "gelu_pytorch_tanh"

    def check(self, config) -> None:
        super().check(config)
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None) is not None:
                raise UnsupportedModelError(f"Gemma 3 with {name}={getattr(config, name)} is not "
                                            f"supported (the kernels do not soft-cap logits)")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with bidirectional attention is not a causal LM")
        act = getattr(config, "hidden_activation", self.ACTIVATION)
        if act != self.ACTIVATION:
            raise UnsupportedModelError(f"Gemma 3 with the MLP activation {act!r} is not "
                                        f"supported (only {self.ACTIVATION!r})")

    @staticmethod
    def masked_mlp_class():
        from probprune_kernels.layers import MaskedGeGLUMLP

        return MaskedGeGLUMLP

    def rotary(self, model, h, n_layers):
        """Each layer's (cos, sin) by its kind: local (sliding-window) layers and global ones
        rotate with different bases."""
        T = h.shape[-2]
        positions = torch.arange(T, device=h.device)[None]
        rotary = model.get_submodule(self.ROTARY)
        kinds = model.config.layer_types[:n_layers]
        tables = {kind: rotary(h, positions, kind) for kind in set(kinds)}
        return [tables[kind] for kind in kinds]
