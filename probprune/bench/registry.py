"""The one registry of model shapes and the benchmark plans built from it.

Every benchmark (micro and end-to-end, CLI and pytest-benchmark) takes its sizes from
``MODEL_REGISTRY``; no test hard-codes a dimension. Entries are ``LlamaConfig`` keyword arguments:
``synth-*`` and ``tiny`` are built in memory with random weights (no hub), ``smollm2-135m`` is the
embedded checkpoint (``probprune.models.load_model``), ``llama-7b``/``llama-13b`` are layer shapes for
GPU micro-benchmarks only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple


def _llama(d: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, head_dim: int = None,
           source: str = "synthetic") -> dict:
    return dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                head_dim=head_dim or d // heads, source=source)


def _synth(d: int, layers: int) -> dict:
    """A Llama-style synthetic model: head_dim 64, 4 query heads per KV head, FFN about 8/3 d."""
    heads = max(4, d // 64)
    ffn = 64 * round(8 * d / 3 / 64)
    return _llama(d, layers, heads, max(1, heads // 4), ffn, vocab=8192, head_dim=64)


MODEL_REGISTRY: Dict[str, dict] = {
    "llama-7b": _llama(4096, 32, 32, 32, 11008, 32000, source="shape"),
    "llama-13b": _llama(5120, 40, 40, 40, 13824, 32000, source="shape"),
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, head_dim=64, source="embedded"),
    # growing width at depth 8, growing depth at width 512, one wide shallow model
    "synth-d256-L8": _synth(256, 8),
    "synth-d512-L4": _synth(512, 4),
    "synth-d512-L8": _synth(512, 8),
    "synth-d512-L16": _synth(512, 16),
    "synth-d1024-L8": _synth(1024, 8),
    "synth-d2048-L4": _synth(2048, 4),
    # for the pipeline's own test: seconds, not minutes
    "tiny": _llama(48, 2, 6, 2, 72, 320, head_dim=8),
}


def model_shape(name: str) -> dict:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown benchmark model {name!r}; registry: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]


def llama_config(name: str, dtype: str = "float32"):
    """The ``LlamaConfig`` of a registry entry (random-weight models are built from it)."""
    from transformers import LlamaConfig

    shape = {k: v for k, v in model_shape(name).items() if k != "source"}
    return LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False,
                       dtype=dtype)


# ---------------------------------------------------------------------------------------------
# plans

@dataclass(frozen=True)
class StepSetting:
    """One end-to-end comparison: same model, batch, K and sparsity for (a), (b) and (c)."""
    model: str
    batch: int
    seqlen: int
    K: int
    sparsity: float

    @property
    def label(self) -> str:
        return f"{self.model} B{self.batch}xT{self.seqlen} K={self.K} s={self.sparsity:g}"


@dataclass(frozen=True)
class Plan:
    name: str
    settings: Tuple[StepSetting, ...]
    micro_shapes: Tuple[str, ...]
    micro_tokens: Tuple[int, int]          # (B, T) of the micro-benchmark activations
    keeps: Tuple[float, ...] = (1.0, 0.7, 0.5, 0.3)
    Ks: Tuple[int, ...] = (1, 2, 4)
    warmup: int = 1                        # end-to-end: untimed rounds, then `repeats` timed ones
    repeats: int = 3
    micro_warmup: int = 1
    micro_repeats: int = 5
    micro_min_time: float = 0.01           # a micro sample repeats the call until this many s
    memory: bool = True
    dtype: Optional[str] = None            # None: float32 on CPU, bfloat16 on CUDA

    def with_(self, **kw) -> "Plan":
        return replace(self, **kw)


def _grid(models, batch, seqlen, Ks, sparsities):
    return tuple(StepSetting(m, batch, seqlen, K, s) for m in models for K in Ks for s in sparsities)


def make_plan(name: str, device: str = "cpu") -> Plan:
    """``full``: the README table (about 10-15 min on a 2-core CPU); ``quick``: a reduced set in
    under 3 min; ``tiny``: the pipeline's test (seconds)."""
    gpu = device.startswith("cuda")
    if name == "tiny":
        return Plan("tiny", _grid(["tiny"], 2, 16, [2], [0.5]), ("tiny",), (2, 16),
                    keeps=(1.0, 0.5), Ks=(2,), warmup=0, repeats=1, micro_warmup=0,
                    micro_repeats=1, micro_min_time=0.0)
    if name not in ("full", "quick"):
        raise ValueError(f"unknown plan {name!r}; choose full, quick or tiny")
    quick = name == "quick"
    B, T = (4, 512) if gpu else (4, 128)
    smol = [StepSetting("smollm2-135m", 4, 128, 2, 0.5)]
    if not quick:
        smol += [StepSetting("smollm2-135m", 4, 128, 2, 0.3),
                 StepSetting("smollm2-135m", 4, 128, 1, 0.5),
                 StepSetting("smollm2-135m", 4, 128, 4, 0.5)]
    if quick:
        synth = ["synth-d256-L8", "synth-d512-L8"]
    else:
        synth = ["synth-d256-L8", "synth-d512-L4", "synth-d512-L8", "synth-d512-L16",
                 "synth-d1024-L8", "synth-d2048-L4"]
    settings = tuple(smol) + _grid(synth, B, T, [2], [0.5])
    if gpu and not quick:  # LLaMA-7B itself (random weights): the paper's smallest model
        settings += (StepSetting("llama-7b", B, T, 2, 0.5),)
    micro_shapes = ("llama-7b", "llama-13b") if gpu else ("smollm2-135m",)
    if quick:
        return Plan("quick", settings, micro_shapes[:1], (B, T), keeps=(1.0, 0.5), Ks=(2,),
                    warmup=1, repeats=2, micro_repeats=3)
    # 5 timed repeats: with 3, a load burst from other users spanning two repeats moved a median
    # by 30% on the shared 2-core machine
    return Plan("full", settings, micro_shapes, (B, T), repeats=5)
