"""Triton kernels of every probprune op; one launch covers all K masks.

Importing this package does not import Triton: the launchers load on first use (``load()`` or
attribute access), so ``probprune_kernels`` works where Triton is absent. Each launcher has the
positional signature of ``probprune_kernels.reference.<op>`` and assumes inputs already validated by
``probprune_kernels.ops`` (shapes via ``_shapes``, contiguity checked for this backend).

Triton reads ``TRITON_INTERPRET`` when ``triton`` itself and each kernel are imported, so on CPU
set it before anything imports ``triton`` (``transformers`` model modules do).
"""
import importlib

_OP_MODULES = {
    "sample_masks": "sample_compact",
    "compact_masks": "sample_compact",
    "sample_and_compact": "sample_compact",
    "gather_rows_gemm": "gather_rows",
    "gather_rows_swiglu": "gather_rows",
    "gather_cols_gemm": "gather_cols",
    "masked_attention": "attention",
    "masked_attention_heads": "attention",
    "lm_head_ce": "lm_head_ce",
}

__all__ = list(_OP_MODULES)


def load():
    """Imports every kernel module (raises if Triton is missing or broken)."""
    for mod in sorted(set(_OP_MODULES.values())):
        importlib.import_module(f"{__name__}.{mod}")


def __getattr__(name):
    if name in _OP_MODULES:
        mod = importlib.import_module(f"{__name__}.{_OP_MODULES[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
