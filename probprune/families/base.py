"""The Llama layout, which every family starts from and overrides where it differs.

A family answers three kinds of questions:

* **where**: the dotted names of the embedding, rotary table, decoder layers, final norm and
  ``lm_head`` in the model, and of each role inside a decoder layer (:attr:`Family.PARTS`); state
  dict keys are these names, so slicing, refit weights and the device map use them too;
* **shape**: the sizes and unit costs of a config (:meth:`Family.shape`) and which tensors of a
  layer are sliced along which axis by which kept units (:meth:`Family.slice_rule`);
* **how**: the engine's masked decoder layer built from a model layer's own modules
  (:meth:`Family.masked_layer`), the embedding, the rotary tables per layer and the final norm.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..units import ModelShape


class UnsupportedModelError(ValueError):
    """A model of a family the engine has no adapter for, or with a feature it cannot run."""


# How a layer tensor is cut: along ``dim``, keeping the rows/columns of the kept ``units``:
# "q_rows" (the kept query heads' head_dim rows each), "kv_rows" (the kept KV heads'), "channels".
SliceRule = Tuple[int, str]


class Family:
    """Llama: pre-norm attention (grouped query heads, RoPE) and a SwiGLU MLP, each added to the
    residual stream."""
    name = "Llama"
    model_types: Tuple[str, ...] = ("llama",)

    EMBED = "model.embed_tokens"
    ROTARY = "model.rotary_emb"
    LAYERS = "model.layers"
    FINAL_NORM = "model.norm"
    HEAD = "lm_head"
    # Roles inside one decoder layer. "attn" and "mlp" are the blocks the projections sit in.
    PARTS: Dict[str, str] = {
        "attn": "self_attn", "mlp": "mlp",
        "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    }
    # Per-head norms that no head owns (one head_dim weight each): kept with the layer.
    QK_NORMS: Tuple[str, ...] = ()
    NORMS = 2  # norms over the residual width in one layer
    BOS_WINDOWS = False  # windows start with the tokenizer's BOS token (LLaMA protocol: no)
    # Roles of the norms each block's output passes before it joins the residual: none here.
    OUT_NORMS: Tuple[str, ...] = ()

    # -- shape -----------------------------------------------------------------------------------

    def check(self, config) -> None:
        """Raises :class:`UnsupportedModelError` for a feature of ``config`` the engine cannot
        run (``config`` may be a plain namespace of config.json)."""
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError("MLP biases (mlp_bias=True) are not supported by the "
                                        "masked forward")

    def attention_biases(self, config) -> Tuple[bool, bool]:
        """(q/k/v carry a bias, o_proj carries one)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def shape(self, config) -> ModelShape:
        hq = config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
        qkv_bias, o_bias = self.attention_biases(config)
        return ModelShape(config.num_hidden_layers, hkv, hq // hkv, head_dim, config.hidden_size,
                          config.intermediate_size, qkv_bias, o_bias, bool(self.QK_NORMS),
                          self.NORMS)

    # -- where -----------------------------------------------------------------------------------

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.LAYERS)

    def part(self, layer: nn.Module, role: str) -> nn.Module:
        return layer.get_submodule(self.PARTS[role])

    def head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.HEAD)

    def layer_prefix(self, l: int) -> str:
        """The state-dict prefix of decoder layer ``l`` (with the trailing dot)."""
        return f"{self.LAYERS}.{l}."

    def key(self, l: int, role: str) -> str:
        """The state-dict name of the module of ``role`` in layer ``l`` (no ``.weight``)."""
        return self.layer_prefix(l) + self.PARTS[role]

    def module_names(self, n_layers: int) -> Dict[str, str]:
        """Where each placed module of the model is: ``embed``, ``rotary``, ``final_norm``,
        ``head`` and ``layer.<l>``, by dotted name."""
        out = {"embed": self.EMBED, "rotary": self.ROTARY, "final_norm": self.FINAL_NORM,
               "head": self.HEAD}
        out.update((f"layer.{l}", f"{self.LAYERS}.{l}") for l in range(n_layers))
        return out

    def slice_rule(self, name: str) -> Optional[SliceRule]:
        """How the layer tensor ``name`` (relative to its layer) is cut to the kept units; None:
        kept whole (norms)."""
        p = self.PARTS
        if name.startswith(p["q"] + "."):
            return 0, "q_rows"
        if name.startswith((p["k"] + ".", p["v"] + ".")):
            return 0, "kv_rows"
        if name == p["o"] + ".weight":
            return 1, "q_rows"
        if name.startswith((p["gate"] + ".", p["up"] + ".")):
            return 0, "channels"
        if name == p["down"] + ".weight":
            return 1, "channels"
        return None

    def is_attention(self, name: str) -> bool:
        """``name`` (relative to its layer) belongs to the attention block."""
        return name.startswith(self.PARTS["attn"] + ".")

    def is_qk_norm(self, name: str) -> bool:
        return any(name == n + ".weight" for n in self.QK_NORMS)

    def modeling_layout(self) -> dict:
        """What the export's modeling file needs to resize a layer (config.json's
        ``probprune_modules``)."""
        return {"layers": self.LAYERS, "parts": dict(self.PARTS), "qk_norms": list(self.QK_NORMS)}

    def window_bos(self, tokenizer) -> Optional[int]:
        """The token every calibration and evaluation window starts with, or None: windows cut
        from the text as they are."""
        if not self.BOS_WINDOWS:
            return None
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UnsupportedModelError(f"{self.name} windows start with a BOS token, and this "
                                        f"tokenizer has none")
        return bos

    # -- how -------------------------------------------------------------------------------------

    def masked_layer(self, layer: nn.Module, config, backend: Optional[str] = None,
                     attn_units: str = "kv-group"):
        """The engine's masked decoder layer over ``layer``'s own modules (no copy)."""
        from probprune_kernels.layers import MaskedDecoderLayer, MaskedLlamaAttention

        shape = self.shape(config)
        part = lambda role: self.part(layer, role)  # noqa: E731
        norms = [layer.get_submodule(n) for n in self.QK_NORMS] or [None, None]
        attn = MaskedLlamaAttention(
            part("q"), part("k"), part("v"), part("o"), shape.n_query_heads, shape.n_kv_heads,
            shape.head_dim, scale=getattr(part("attn"), "scaling", None), backend=backend,
            q_norm=norms[0], k_norm=norms[1], units=attn_units)
        mlp = self.masked_mlp_class()(part("gate"), part("up"), part("down"), backend=backend)
        out_norms = [part(role) for role in self.OUT_NORMS] or [None, None]
        return MaskedDecoderLayer(part("attn_norm"), attn, part("mlp_norm"), mlp, *out_norms)

    @staticmethod
    def masked_mlp_class():
        """The kernel library's masked MLP of the family's activation."""
        from probprune_kernels.layers import MaskedSwiGLUMLP

        return MaskedSwiGLUMLP

    def embed(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The input hidden states [B, T, d] of token ids, on the embedding's device."""
        table = model.get_submodule(self.EMBED)
        return table(ids.to(table.weight.device))

    def rotary(self, model: nn.Module, h: torch.Tensor,
               n_layers: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [1, T, head_dim] of every layer for hidden states ``h`` [B, T, d]: one
        table shared by all layers here."""
        T = h.shape[-2]
        table = model.get_submodule(self.ROTARY)(h, torch.arange(T, device=h.device)[None])
        return [table] * n_layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.FINAL_NORM)

    def causal_lm_class(self, config):
        """The family's Hugging Face causal-LM class for ``config``."""
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def pruned_class(self, config):
        """The export's model class for ``config`` (:mod:`probprune.modeling_probprune`): the
        family's Hugging Face causal-LM class with each layer shrunk to the saved sizes."""
        from ..modeling_probprune import pruned_class

        return pruned_class(self.causal_lm_class(config))

    def decoder(self, model: nn.Module) -> nn.Module:
        """The model without its ``lm_head``: its forward returns the final hidden states."""
        return model.get_submodule(self.LAYERS.rpartition(".")[0])
