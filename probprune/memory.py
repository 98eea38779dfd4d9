"""The memory plan of a run, from the model's config alone (nothing loaded): what one rank's device
holds at its peak, so that a run that cannot fit stops before loading, naming the flag to change.

The terms follow the engine's data flow (:mod:`probprune.forward`, :mod:`probprune.compensate`):
the weights; the live activations of a forward at its widest layer (the hidden states in and
out, plus the larger of attention's q/k/v/o and the MLP's gate/up/product, all units kept, the
worst a sampled mask can be) and the lm_head's logit chunk with the normed hidden states it
reads, for the K-mask search batch and for an evaluation batch (evaluation never builds the full
logits either, :mod:`probprune.evaluate`); with ``--search-loss refit`` every layer's input second
moments and one layer's solves during the search, and the pass that collects them; and
compensation's calibration hidden states with one float64 Gram matrix; the pruned model's
evaluation, which slices one layer at a time beside the dense weights. The phases run one after
another, so the peak is the weights plus the largest phase.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .forward import LOGIT_CHUNK_VALUES
from .placement import balance
from .families import shape_of

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 2 ** 30


def param_count(config) -> int:
    """Parameters of a Llama / Mistral / Qwen2 / Qwen3 model from its config, counted the way the
    modules hold them (tied embeddings once)."""
    per_layer, embed, head = param_parts(config)
    return config.num_hidden_layers * per_layer + embed + head


def largest_shard(config, n_devices: int) -> int:
    """Parameters on the fullest device when the layers are spread over ``n_devices`` as
    :func:`probprune.placement.place` spreads them."""
    per_layer, embed, head = param_parts(config)
    if n_devices == 1:
        return config.num_hidden_layers * per_layer + embed + head
    tied = getattr(config, "tie_word_embeddings", False)
    first, last = (0, embed + head) if tied else (embed, head)
    owner = balance([per_layer] * config.num_hidden_layers, n_devices, first, last)
    loads = [per_layer * owner.count(j) for j in range(n_devices)]
    loads[0] += first
    loads[-1] += last
    return max(loads)


def param_parts(config):
    """(parameters of one decoder layer, of the embedding, of lm_head and the final norm)."""
    shape = shape_of(config)
    d = shape.hidden
    per_layer = shape.layer_cost
    embed = config.vocab_size * d
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    return per_layer, embed, head + d


@dataclass
class MemoryPlan:
    """Bytes on one rank's device, by term; ``peak`` = weights + the largest phase."""
    terms: Dict[str, int]
    phases: Dict[str, int]
    devices: int = 1  # the devices one rank's layers are spread over

    @property
    def peak(self) -> int:
        return self.terms["weights"] + max(self.phases.values())

    def lines(self) -> list:
        where = ("one rank's device" if self.devices == 1 else
                 f"the fullest of one rank's {self.devices} devices")
        out = [f"memory plan ({where}): peak {self.peak / GIB:.2f} GiB"]
        out += [f"  {name:<42} {value / GIB:8.3f} GiB" for name, value in self.terms.items()]
        return out


def plan(config, *, dtype: str, k: int, batch_size: int, seqlen: int, world_size: int = 1,
         eval_batch_size: int = 8, compensate: str = "none", compensate_windows: int = 0,
         compensate_target: str = "local", compensate_inputs: bool = False, devices: int = 1,
         search_loss: str = "bare", search_refit_windows: int = 0) -> MemoryPlan:
    """``devices``: the devices one rank spreads its layers over (the weights term is then the
    fullest device's share; every device may hold the activations of its layers)."""
    b = DTYPE_BYTES[dtype]
    shape = shape_of(config)
    d, inter, hd = shape.hidden, shape.intermediate, shape.head_dim
    heads, kv = shape.n_query_heads, shape.n_kv_heads
    vocab = config.vocab_size
    km = k // world_size  # masks this rank evaluates

    def forward_terms(tokens: int, what: str) -> Dict[str, int]:
        # A decoder forward over ``tokens`` rows: a layer's input and output, the larger of
        # attention's q/k/v/o and the MLP's gate/up/product (all units kept, the worst a sampled
        # mask can be), and the lm_head's fp32 logit chunk with the normed hidden states it reads.
        widest = max(tokens * (2 * heads + 2 * kv) * hd, 3 * tokens * inter) * b
        chunk = min(LOGIT_CHUNK_VALUES, tokens * vocab)
        return {f"{what}: hidden states x2": 2 * tokens * d * b,
                f"{what}: widest layer intermediate": widest,
                f"{what}: lm_head logit chunk": chunk * 4 + tokens * d * b}

    search = forward_terms(km * batch_size * seqlen, "search [K/W, B, T]")
    if search_loss == "refit":
        # Every layer's fp32 input second moments (o_proj's, down_proj's) and the W C weights
        # beside them, on the device holding that layer; and the solve of the widest layer:
        # K/W Cholesky factors (and the gathered systems) and the solved inputs.
        layers = -(-config.num_hidden_layers // devices)
        width = max(inter, heads * hd)
        search["search refit: input second moments"] = layers * (
            (inter ** 2 + (heads * hd) ** 2) * 4 + d * (inter + heads * hd) * b)
        search["search refit: one layer's solves"] = km * (2 * width ** 2 + 2 * batch_size *
                                                           seqlen * width) * 4
    evaluation = forward_terms(eval_batch_size * seqlen, "evaluation [B, T]")
    terms = {"weights": largest_shard(config, devices) * b, **search, **evaluation}
    phases = {"search": sum(search.values()), "evaluation": sum(evaluation.values())}
    # The pruned model is evaluated (selection, the init's compensated perplexity) with each
    # layer sliced from the dense weights as the forward reaches it (probprune.export
    # .pruned_model), and the export slices onto the host: one layer at most beside the weights.
    pruned_layer = param_parts(config)[0] * b
    terms["pruned model: one layer sliced beside the weights"] = pruned_layer
    phases["pruned evaluation"] = phases["evaluation"] + pruned_layer
    if search_loss == "refit":
        # Their collection: a parallel compensation pass (hidden states in and out, one Gram).
        phases["search refit statistics"] = (
            search["search refit: input second moments"]
            + 2 * search_refit_windows * seqlen * d * 4
            + (max(inter, heads * hd) + 1) ** 2 * 8)
    if compensate != "none":
        # The calibration windows' hidden states (in and out of a layer, fp32; the dense
        # target carries the dense model's stream too) and one float64 Gram matrix of the
        # widest input (the MLP's channels, and a bias column).
        copies = 3 if compensate_target == "dense" or compensate_inputs else 2
        states = copies * compensate_windows * seqlen * d * 4
        gram = (max(inter, heads * hd) + 1) ** 2 * 8
        terms["compensation: calibration hidden states"] = states
        terms["compensation: one float64 Gram matrix"] = gram
        phases["compensation"] = states + gram
    return MemoryPlan(terms, phases, devices)


def trim_host_memory() -> None:
    """Hands the host heap's free pages back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). glibc keeps the pages of freed tensors below its mmap threshold, so without this
    a large model freed on the host still counts in the process's resident memory."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def available_bytes(device: str) -> Optional[int]:
    """Free memory of ``device`` now: CUDA's free bytes, or MemAvailable of /proc/meminfo on a
    CPU (None where neither can be read)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PlanError(ValueError):
    """The run's planned peak does not fit its device."""


def check_fits(p: MemoryPlan, device: str, available: Optional[int] = None) -> None:
    """Raises :class:`PlanError` naming the flag to change when the plan exceeds ``device``."""
    available = available_bytes(device) if available is None else available
    if available is None or p.peak <= available:
        return
    biggest = max(p.phases, key=p.phases.get)
    if p.terms["weights"] > available:
        hint = "the weights alone do not fit: use --dtype bfloat16 or a device with more memory"
    elif biggest == "search":
        hint = "the K-mask forward is the largest part: lower --k or --batch-size, or add ranks"
    elif biggest == "compensation":
        hint = "compensation is the largest part: lower --compensate-windows"
    else:
        hint = "the evaluation batch is the largest part: lower --eval-batch-size"
    raise PlanError(f"the run needs about {p.peak / GIB:.2f} GiB on {device} and "
                    f"{available / GIB:.2f} GiB are free; {hint}")


def plan_for(cfg, config, world_size: int = 1, devices: int = 1) -> MemoryPlan:
    """The plan of a :class:`~probprune.config.PruneConfig` for the model ``config``."""
    return plan(config, dtype=cfg.dtype, k=cfg.k, batch_size=cfg.batch_size, seqlen=cfg.seqlen,
                world_size=world_size, eval_batch_size=cfg.eval_batch_size,
                compensate=cfg.compensate, compensate_windows=cfg.compensate_windows,
                compensate_target=cfg.compensate_target,
                compensate_inputs=cfg.compensate_inputs, devices=devices,
                search_loss=cfg.search_loss, search_refit_windows=cfg.search_refit_windows)
