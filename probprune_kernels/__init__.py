"""probprune_kernels: masked GEMMs, masked attention and mask ops, K sampled masks in one launch.

Layers (from the bottom): ``reference`` (pure torch, the oracle) and ``triton`` / ``_cuda`` kernels
-> ``ops`` (registered ``torch.ops.probprune.*`` ops; ``dispatch`` picks their backend) ->
``layers`` (``MaskedLinear``, ``MaskedSwiGLUMLP``, ``MaskedGeGLUMLP``, ``MaskedLlamaAttention``,
``MaskedDecoderLayer``).

``probprune_kernels.backends()`` lists the backends usable here; ``set_default_backend`` sets the
one used without ``backend=``. This package never imports ``probprune`` (the engine).
"""
from . import dispatch, layers, ops
from .dispatch import BackendUnavailableError, set_default_backend
from .dispatch import available_backends as backends
from .layers import (MaskedDecoderLayer, MaskedGeGLUMLP, MaskedLinear, MaskedLlamaAttention,
                     MaskedSwiGLUMLP)
from .refit import LeastSquaresRefit
from .ops import (HeadLists, compact_masks, gather_cols_gemm, gather_rows_gemm,
                  gather_rows_swiglu, head_lists, head_lists_from_groups, lm_head_ce,
                  masked_attention, masked_attention_heads, sample_and_compact, sample_masks)

__all__ = ["dispatch", "layers", "ops", "backends", "set_default_backend",
           "BackendUnavailableError", "MaskedDecoderLayer", "MaskedGeGLUMLP", "MaskedLinear",
           "MaskedLlamaAttention", "MaskedSwiGLUMLP",
           "LeastSquaresRefit", "compact_masks", "gather_cols_gemm", "gather_rows_gemm", "gather_rows_swiglu",
           "lm_head_ce", "masked_attention", "masked_attention_heads", "sample_and_compact",
           "sample_masks", "HeadLists", "head_lists", "head_lists_from_groups"]

__version__ = "0.1.0"
