"""The one registry of the benchmarks: model shapes, the providers compared, and the plans.

Every benchmark (CPU runs, GPU micro-benchmarks, ``bench/gpu_check.sh``, pytest-benchmark) takes
its sizes from ``MODEL_REGISTRY`` and its provider names from here. Shapes are ``LlamaConfig``
keyword arguments: ``synth-*`` and ``tiny`` are built in memory with random weights (no hub),
``smollm2-135m`` is the embedded checkpoint, ``llama-7b``/``llama-13b`` are built with random
weights (GPU) and give the layer shapes of the GPU micro-benchmarks.

Kept free of torch so that building the command line stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple


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
    # Gemma 3's head (262,144 x 640) outweighs its 18 decoder layers: a step bound by lm_head_ce;
    # skipped when the `gemma` extra is not installed
    "gemma3-270m": _llama(640, 18, 4, 1, 2048, 262144, head_dim=256, source="embedded"),
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


DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    import torch

    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------
# providers: what each measurement runs. Backends are those of probprune_kernels.backends() worth
# timing on the device (see micro.bench_backends).

# Micro-benchmarks (one op at keep ratio r, K masks):
#   probprune-<backend>   the public op (probprune_kernels.<op>(..., backend=<backend>)), all K
#                         masks in one call: the dispatch the engine pays
#   k-launches-<backend>  the same op called once per mask
#   torch-dense           torch on the full weight (what an unpruned layer costs)
#   torch-masked-dense    the full matmul with the mask multiplied into the activations (the paper
#                         code's way)
#   torch-gather          index the kept rows/columns of the weight, then matmul (per mask)
#   torch-sliced          torch on the weight sliced beforehand: the limit (what the pruned model
#                         pays)
OURS, K_LAUNCHES = "probprune-", "k-launches-"
GEMM_OPS = ("gather_rows_gemm", "gather_rows_swiglu", "gather_cols_gemm")
OPS = GEMM_OPS + ("masked_attention", "masked_attention_heads", "lm_head_ce", "compact_masks",
                  "sample_masks",
                  "sample_and_compact")
_MATMUL_BASELINES = ("torch-dense", "torch-masked-dense", "torch-gather", "torch-sliced")
BASELINES: Dict[str, Tuple[str, ...]] = {
    **{op: _MATMUL_BASELINES for op in GEMM_OPS},
    "masked_attention": ("torch-dense", "torch-masked-dense", "torch-sliced"),
    "masked_attention_heads": ("torch-dense", "torch-masked-dense", "torch-sliced"),
    "lm_head_ce": ("torch-dense",),
    "compact_masks": (),
    "sample_masks": (),
    "sample_and_compact": (),
}
KEEP_INDEPENDENT = ("lm_head_ce",)  # no mask: timed at keep 1.0 only

# The end-to-end step (the K losses of one policy-gradient step):
#   dense-mask        probprune.baseline.DenseMaskedLM: K dense forwards with the masks
#                     multiplied into the activations (the paper code's way)
#   engine-<backend>  probprune.forward.MaskedCausalLM: one K-mask forward
#   engine-refit-<backend>  the same forward scoring each mask after its own least-squares
#                     refit of o_proj and down_proj (--search-loss refit)
#   pruned-limit      K forwards of the physically pruned model of the hard mask: the limit
DENSE_MASK, ENGINE, LIMIT = "dense-mask", "engine-", "pruned-limit"
REFIT = ENGINE + "refit-"


def engine_case(backend: str) -> str:
    return ENGINE + backend


def refit_case(backend: str) -> str:
    return REFIT + backend


def step_case_names(backends: List[str]) -> List[str]:
    """Every provider of an end-to-end setting, in timing order."""
    return ([DENSE_MASK] + [engine_case(b) for b in backends] + [refit_case(b) for b in backends]
            + [LIMIT])


def provider_backend(provider: str) -> str:
    """The kernel backend a provider runs on; ``torch`` for the torch baselines."""
    for prefix in (OURS, K_LAUNCHES, REFIT, ENGINE):
        if provider.startswith(prefix):
            return provider[len(prefix):]
    return "torch"


# ---------------------------------------------------------------------------------------------
# plans

@dataclass(frozen=True)
class StepSetting:
    """One end-to-end comparison: same model, batch, K and sparsity for every step provider."""
    model: str
    batch: int
    seqlen: int
    K: int
    sparsity: float

    @property
    def label(self) -> str:
        return f"{self.model} B{self.batch}xT{self.seqlen} K={self.K} s={self.sparsity:g}"


@dataclass(frozen=True)
class Rounds:
    """How one group of cases is timed. CPU: ``warmup`` untimed rounds, then ``repeats`` samples
    per case, a sample lasting at least ``min_time`` s. GPU: ``triton.testing.do_bench`` with
    ``warmup_ms`` and ``rep_ms`` where ``do_bench`` (kernels: microseconds to milliseconds),
    else the CPU scheme with CUDA events (whole steps, whose samples are then the plan's)."""
    warmup: int
    repeats: int
    min_time: float = 0.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    do_bench: bool = True


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
    gpu_warmup_ms: float = 25.0            # do_bench's warm-up and repetition time per case
    gpu_rep_ms: float = 100.0
    memory: bool = True
    check_outputs: bool = False            # compare each backend's output with the reference's
    dtype: Optional[str] = None            # None: float32 on CPU, bfloat16 on CUDA
    needs_gpu: bool = False

    def with_(self, **kw) -> "Plan":
        return replace(self, **kw)

    @property
    def micro_rounds(self) -> Rounds:
        return Rounds(self.micro_warmup, self.micro_repeats, self.micro_min_time,
                      self.gpu_warmup_ms, self.gpu_rep_ms)

    @property
    def step_rounds(self) -> Rounds:
        # the first call of each step case (its losses) counts as the first warm-up round
        return Rounds(max(0, self.warmup - 1), self.repeats, do_bench=False)


PLANS = ("full", "quick", "tiny", "gpu-check")


def _grid(models, batch, seqlen, Ks, sparsities):
    return tuple(StepSetting(m, batch, seqlen, K, s) for m in models for K in Ks for s in sparsities)


def make_plan(name: str, device: str = "cpu") -> Plan:
    """``full``: the tables of docs/benchmarks.md (about 10-15 min on a 2-core CPU); ``quick``: a reduced set in
    under 3 min; ``tiny``: the pipeline's test (seconds); ``gpu-check``: the kernel
    micro-benchmarks of ``bench/gpu_check.sh`` at LLaMA-7B layer shapes (a GPU, about 100 s)."""
    gpu = device.startswith("cuda")
    if name == "tiny":
        return Plan("tiny", _grid(["tiny"], 2, 16, [2], [0.5]), ("tiny",), (2, 16),
                    keeps=(1.0, 0.5), Ks=(2,), warmup=0, repeats=1, micro_warmup=0,
                    micro_repeats=1, micro_min_time=0.0)
    if name == "gpu-check":  # one calibration sequence of 2048 tokens, K = 1 and 4
        return Plan("gpu-check", (), ("llama-7b",), (1, 2048), keeps=(1.0, 0.5), Ks=(1, 4),
                    gpu_warmup_ms=10.0, gpu_rep_ms=40.0, memory=False, check_outputs=True,
                    needs_gpu=True)
    if name not in ("full", "quick"):
        raise ValueError(f"unknown plan {name!r}; choose one of {', '.join(PLANS)}")
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
    if not quick:  # the Gemma table's step (docs/families.md)
        settings += (StepSetting("gemma3-270m", 4, 128, 2, 0.3),)
    if gpu and not quick:  # LLaMA-7B itself (random weights): the paper's smallest model
        settings += (StepSetting("llama-7b", B, T, 2, 0.5),)
    micro_shapes = ("llama-7b", "llama-13b") if gpu else ("smollm2-135m",)
    if quick:
        return Plan("quick", settings, micro_shapes[:1], (B, T), keeps=(1.0, 0.5), Ks=(2,),
                    warmup=1, repeats=2, micro_repeats=3)
    # 5 timed repeats: with 3, a load burst from other users spanning two repeats moved a median
    # by 30% on the shared 2-core machine
    return Plan("full", settings, micro_shapes, (B, T), repeats=5)
