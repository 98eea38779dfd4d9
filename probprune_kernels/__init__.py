"""probprune_kernels: masked GEMMs, masked attention and mask ops, K sampled masks in one launch.

Layers (from the bottom): ``reference`` (pure torch, the oracle) and ``triton`` / ``_cuda`` kernels
-> ``ops`` (registered ``torch.ops.probprune.*`` ops with one dispatch point, ``backends``) ->
``layers`` (``MaskedLinear``, ``MaskedSwiGLUMLP``, ``MaskedLlamaAttention``).

``probprune_kernels.backends()`` lists the backends usable here. This package never imports
``probprune`` (the engine).
"""
from . import backends, ops  # noqa: F401  (registers torch.ops.probprune.*)
from .backends import BackendUnavailableError  # noqa: F401
from .ops import (compact_masks, gather_cols_gemm, gather_rows_gemm,  # noqa: F401
                  gather_rows_swiglu, lm_head_ce, masked_attention, sample_and_compact,
                  sample_masks)
from . import layers  # noqa: F401,E402
from .layers import MaskedLinear, MaskedLlamaAttention, MaskedSwiGLUMLP  # noqa: F401,E402

__version__ = "0.1.0"
