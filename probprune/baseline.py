"""The paper code's way of evaluating K masks: a baseline mode of the engine.

``DenseMaskedLM(model).losses(input_ids, masks)`` returns the same numbers as
``MaskedCausalLM.losses`` but computes them the way the method's public code does
(ethanygao/backprop-free_LLM_pruning, ``prune_channel/models/modeling_llama.py``): one full dense
forward of the Hugging Face model per mask, one after another, with the masks multiplied into the
activations:

* a KV-group mask multiplies the attention output columns that enter ``o_proj`` (each group's
  ``G * head_dim`` columns; the paper's ``attn_output.mul_(attn_head_mask.repeat_interleave(...))``);
* a channel mask multiplies the MLP intermediate ``silu(gate) * up`` entering ``down_proj``;
* a dropped layer (``include_layers=True``) passes its input through (the layer still runs: the
  dense approach pays for it).

Each loss is the model's own ``model(ids, labels=ids).loss``. Every pruned unit is still computed,
so the cost is K dense forwards whatever the sparsity: this is what the benchmarks compare the
engine against (``vs_dense_mask``).

The masks enter through hooks registered on this model *instance* for the duration of one
``losses`` call and removed afterwards (also on error); no ``transformers`` class is patched.
"""
from __future__ import annotations

from typing import List

import torch

from .families import family_of, units_of


class DenseMaskedLM:
    """``losses(input_ids [B, T], masks bool [K, units.n_units]) -> [K]`` by K dense forwards."""

    def __init__(self, model, include_layers: bool = False, attn_units: str = "kv-group"):
        self.family = family_of(model.config)
        self.model = model
        self.units = units_of(model.config, include_layers, attn_units)

    @property
    def device(self) -> torch.device:
        return self.family.head(self.model).weight.device

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        units, shape = self.units, self.units.shape
        if masks.dim() != 2 or masks.shape[1] != units.n_units or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [K, {units.n_units}], got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        ids = input_ids.to(self.device)
        dtype = self.family.head(self.model).weight.dtype
        m = units.split(masks.to(self.device))
        # Column masks as the paper builds them: a KV group's mask repeated over its G query heads
        # and their head_dim columns; one factor per MLP channel.
        o_cols = units.query_kept(m.heads).repeat_interleave(shape.head_dim, dim=-1).to(dtype)  # [K,L,Hq*hd]
        d_cols = m.mlp.to(dtype)                                                       # [K, L, F]
        layer_keep = m.layers.tolist()                                                  # [K][L]
        current = {"k": 0}

        def scale_input(cols: torch.Tensor, l: int):
            def hook(_module, args):
                return (args[0] * cols[current["k"], l],) + tuple(args[1:])
            return hook

        def pass_through(l: int):
            def hook(_module, args, kwargs, output):
                if layer_keep[current["k"]][l]:
                    return output
                h_in = args[0] if args else kwargs["hidden_states"]
                return (h_in,) + tuple(output[1:]) if isinstance(output, tuple) else h_in
            return hook

        handles: List[torch.utils.hooks.RemovableHandle] = []
        try:
            for l, layer in enumerate(self.family.layers(self.model)):
                for role, cols in (("o", o_cols), ("down", d_cols)):
                    handles.append(self.family.part(layer, role).register_forward_pre_hook(
                        scale_input(cols, l)))
                if units.include_layers:
                    handles.append(layer.register_forward_hook(pass_through(l), with_kwargs=True))
            out = []
            for k in range(masks.shape[0]):
                current["k"] = k
                out.append(self.model(ids, labels=ids, use_cache=False).loss.float())
        finally:
            for h in handles:
                h.remove()
        return torch.stack(out)

    def all_ones(self, K: int = 1) -> torch.Tensor:
        return torch.ones(K, self.units.n_units, dtype=torch.bool, device=self.device)
