"""What a user measures after pruning: parameters, weights on disk, prefill latency, decode
tokens/s with the KV cache, and peak memory, of one model at a time.

:func:`measure` times a model already in memory. :func:`measure_fresh` loads one model by name
in a new process and measures it there, so that its peak memory is its own: on a CPU the peak
resident set of a process is all a process can report, and it never goes down, so two models
measured in one process would share one number.

Prefill: the forward of a ``[batch, seqlen]`` batch of token ids (last-position logits only, as
``generate`` computes them), the median of ``repeats`` timed runs after one warm-up. Decode:
greedy ``generate`` of exactly ``new_tokens`` tokens with the KV cache from that batch; the clock
is read as each token's logits arrive, so the rate counts the ``new_tokens - 1`` steps after the
first (the prefill excluded), median over ``repeats``.

:func:`check_speedup` says what a dense-to-pruned comparison can be trusted for: the spread of
the timings over the rounds, and whether a speed-up exceeds what the smaller matrix multiplies
explain (a pruned model cannot run faster than its FLOPs allow; a machine whose load changed
between the two measurements can make it look so).
"""
from __future__ import annotations

import builtins
import dataclasses
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from torch import nn

from .models import load_model, resolve_model_path

# The weight files of a Hugging Face or probprune directory (not a run's scores / masks files).
WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin")

MEMORY_KINDS = {
    "cuda": "CUDA max allocated during the measurement (whatever else is resident counts too)",
    "cuda-fresh": "CUDA max allocated in a fresh process holding only this model (weights, "
                  "activations, KV cache)",
    "cpu-fresh": "peak RSS growth of a fresh process that loads and runs only this model",
}


@dataclass
class Speed:
    model: str
    params: int                 # parameters in memory (a tied embedding counted once)
    disk_bytes: Optional[int]   # weight files of the model's directory; None: not a local one
    weight_bytes: int           # parameters and buffers in memory
    batch: int
    seqlen: int
    new_tokens: int             # tokens each decode produced
    repeats: int
    prefill_ms: float
    decode_tokens_per_s: float  # batch * (new_tokens - 1) / time of the steps after the first
    peak_memory_mib: Optional[float]
    peak_memory_kind: str
    device: str
    dtype: str
    rounds: int = 1             # measurements in turn with other models; figures: their median
    # weights of the matrix multiplies each token passes (every nn.Linear but the output
    # layer's), and the output layer's (a tied lm_head included), which the prefill runs on the
    # last position only: a forward's FLOPs are twice these, plus attention's (small here)
    matmul_params: Optional[int] = None
    head_params: Optional[int] = None
    prefill_ms_rounds: Optional[List[float]] = None      # each round's, with rounds > 1
    decode_tokens_per_s_rounds: Optional[List[float]] = None

    def as_dict(self) -> dict:
        return asdict(self)


def weight_files(directory: str) -> List[str]:
    return sorted({p for pattern in WEIGHT_FILES
                   for p in glob.glob(os.path.join(directory, pattern))})


def disk_bytes(directory: Optional[str]) -> Optional[int]:
    """Bytes of the weight files in ``directory`` (None for no local directory)."""
    if directory is None or not os.path.isdir(directory):
        return None
    return sum(os.path.getsize(p) for p in weight_files(directory))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that reads the clock as each generated token's logits arrive."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def _prefill_ms(model, ids: torch.Tensor, repeats: int) -> float:
    device = ids.device
    model(ids, logits_to_keep=1)  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def _decode(model, ids: torch.Tensor, new_tokens: int, repeats: int):
    """(median tokens/s of the steps after the first, tokens produced by each run)."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
    # An explicit config: the model's own generation defaults (sampling, stop strings) are not
    # what is timed; min = max new tokens, so an end-of-text token never ends a run early.
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=eos, pad_token_id=pad, use_cache=True)
    mask = torch.ones_like(ids)
    rates, produced = [], set()
    for run in range(repeats + 1):  # the first run warms up
        clock = _StepClock(ids.device)
        out = model.generate(ids, attention_mask=mask, generation_config=gen,
                             logits_processor=LogitsProcessorList([clock]))
        produced.add(out.shape[1] - ids.shape[1])
        if run:
            rates.append(ids.shape[0] * (len(clock.times) - 1)
                         / (clock.times[-1] - clock.times[0]))
    if produced != {new_tokens}:
        raise RuntimeError(f"generate produced {sorted(produced)} new tokens, not {new_tokens}")
    return statistics.median(rates), new_tokens


def random_batch(vocab_size: int, batch: int, seqlen: int, device) -> torch.Tensor:
    """Token ids for timing (speed does not depend on which tokens), the same for every model."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seqlen), generator=g).to(device)


def measure(model, name: str, directory: Optional[str] = None, *, batch: int = 1,
            seqlen: int = 128, new_tokens: int = 32, repeats: int = 3) -> Speed:
    """Times ``model`` (in memory, on its device). Peak memory: on a GPU, the CUDA peak from the
    start of this call (what is resident then counts: the weights); on a CPU, none (a process's
    peak RSS is not one model's; :func:`measure_fresh` measures it)."""
    if new_tokens < 2:
        raise ValueError(f"decode needs at least 2 new tokens to time a step, got {new_tokens}")
    param = next(model.parameters())
    device = param.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = random_batch(model.config.vocab_size, batch, seqlen, device)
    prefill = _prefill_ms(model, ids, repeats)
    rate, produced = _decode(model, ids, new_tokens, repeats)
    peak, kind = None, "not measured (CPU, in process)"
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, MEMORY_KINDS["cuda"]
    tensors = list(model.parameters()) + list(model.buffers())
    head = model.get_output_embeddings()
    matmul = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) and m is not head)
    return Speed(model=name, params=sum(p.numel() for p in model.parameters()),
                 matmul_params=matmul, head_params=head.weight.numel() if head is not None else 0,
                 disk_bytes=disk_bytes(directory),
                 weight_bytes=sum(t.numel() * t.element_size() for t in tensors),
                 batch=batch, seqlen=seqlen, new_tokens=produced, repeats=repeats,
                 prefill_ms=prefill, decode_tokens_per_s=rate, peak_memory_mib=peak,
                 peak_memory_kind=kind, device=str(device), dtype=str(param.dtype).split(".")[-1])


def _resident_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _measure_here(name: str, dtype: str, device: str, threads: Optional[int], kw: dict,
                  devices: Optional[List[str]] = None) -> dict:
    """The child's job: load ``name``, measure it, and report its own memory."""
    if threads:
        torch.set_num_threads(threads)
    # Import the model code before the baseline, so that the memory counted is the model's.
    import transformers
    from . import modeling_probprune  # noqa: F401

    transformers.utils.logging.disable_progress_bar()  # a child's bars would interleave
    transformers.utils.logging.set_verbosity_error()

    dev = torch.device(device)
    before = _resident_bytes()
    model, _ = load_model(name, dtype=dtype, device=device, devices=devices)
    result = measure(model, name, resolve_model_path(name), **kw)
    if dev.type == "cpu" and before is not None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        result.peak_memory_mib = (peak_kib * 1024 - before) / 2**20
        result.peak_memory_kind = MEMORY_KINDS["cpu-fresh"]
    elif dev.type == "cuda":
        # In a fresh process the CUDA peak (reset after loading) holds this model's weights and
        # its activations and KV cache, nothing else.
        result.peak_memory_kind = MEMORY_KINDS["cuda-fresh"]
    return result.as_dict()


# The child's program: read the job, measure, print one JSON line (the Speed, or the error).
CHILD = ("import json, sys; job = json.load(sys.stdin); sys.path[:0] = job.pop('path'); "
         "from probprune.speed import _child; _child(job)")


def _child(job: dict) -> None:
    try:
        print(json.dumps({"speed": _measure_here(**job)}))
    except Exception as e:  # noqa: BLE001 - any failure goes back to the parent, which raises
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        sys.exit(1)


def measure_fresh(name: str, *, dtype: str = "auto", device: str = "cpu", batch: int = 1,
                  seqlen: int = 128, new_tokens: int = 32, repeats: int = 3,
                  devices: Optional[List[str]] = None) -> Speed:
    """Loads the model ``name`` (directory, hub name, embedded name or probprune export) in a new
    process (on ``device``, or spread over ``devices``), measures it there, and returns its
    :class:`Speed`; a failure there is raised here, as the same built-in exception class.

    The process is a plain ``python -c``, not a ``multiprocessing`` spawn: a spawned child
    imports the caller's main script again, which runs a script without a ``__main__`` guard
    (a ``probprune.prune(...)`` call in a notebook-style script) a second time."""
    job = dict(name=name, dtype=dtype, device=device, threads=torch.get_num_threads(),
               kw=dict(batch=batch, seqlen=seqlen, new_tokens=new_tokens, repeats=repeats),
               devices=devices, path=[p for p in sys.path if p])
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(job),
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"measuring {name!r} in a fresh process failed (exit code "
                           f"{proc.returncode}): {tail[0]}") from None
    if "error" in answer:
        cls = getattr(builtins, answer["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = RuntimeError
        raise cls(answer["message"])
    return Speed(**answer["speed"])


def measure_in_turn(names: List[str], rounds: int = 3, **kw) -> List[Speed]:
    """Each model measured ``rounds`` times by :func:`measure_fresh`, the models in turn, and
    the median of each figure over the rounds (the highest peak memory): on a shared machine
    the background load then falls on every model alike, not on whichever ran during a burst."""
    runs = [[] for _ in names]
    for _ in range(rounds):
        for i, name in enumerate(names):
            runs[i].append(measure_fresh(name, **kw))
    out = []
    for records in runs:
        peaks = [r.peak_memory_mib for r in records if r.peak_memory_mib is not None]
        prefill = [r.prefill_ms for r in records]
        decode = [r.decode_tokens_per_s for r in records]
        out.append(dataclasses.replace(
            records[0], rounds=len(records), prefill_ms=statistics.median(prefill),
            decode_tokens_per_s=statistics.median(decode),
            peak_memory_mib=max(peaks) if peaks else None,
            prefill_ms_rounds=prefill if rounds > 1 else None,
            decode_tokens_per_s_rounds=decode if rounds > 1 else None))
    return out


# Beyond this spread of a timing over the rounds ((max - min) / median), its ratios are noise.
SPREAD_LIMIT = 0.2
# A speed-up this far above the FLOP ratio is still measurement noise, not a claim to question.
FLOP_SLACK = 0.1


@dataclass
class SpeedCheck:
    """How far a dense-to-pruned comparison can be trusted."""
    prefill_speedup: float          # dense prefill time / pruned prefill time
    decode_speedup: float           # pruned tokens/s / dense tokens/s
    # dense / pruned matrix-multiply FLOPs of a prefill and of a decode step: the most the
    # smaller matrices explain
    prefill_flop_ratio: Optional[float]
    decode_flop_ratio: Optional[float]
    spread: Optional[float]         # the widest spread of a timing over the rounds; None: 1 round
    warnings: List[str]

    def as_dict(self) -> dict:
        return asdict(self)


def _spread(values: Optional[List[float]]) -> Optional[float]:
    if not values or len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def check_speedup(dense: Speed, pruned: Speed) -> SpeedCheck:
    """The speed-ups of ``pruned`` over ``dense`` and what speaks against them: timings that
    varied too much over the rounds, a single round, or a speed-up the FLOPs cannot explain."""
    prefill = dense.prefill_ms / pruned.prefill_ms
    decode = pruned.decode_tokens_per_s / dense.decode_tokens_per_s
    flops = {"prefill": None, "decode": None}
    if dense.matmul_params and pruned.matmul_params:
        # the prefill's tokens pass every layer, its output layer runs on the last one only
        def ratio(tokens):
            return ((dense.matmul_params * tokens + (dense.head_params or 0))
                    / (pruned.matmul_params * tokens + (pruned.head_params or 0)))
        flops = {"prefill": ratio(dense.seqlen), "decode": ratio(1)}
    spreads = [_spread(v) for v in (dense.prefill_ms_rounds, pruned.prefill_ms_rounds,
                                    dense.decode_tokens_per_s_rounds,
                                    pruned.decode_tokens_per_s_rounds)]
    spread = max((v for v in spreads if v is not None), default=None)
    again = f"`probprune-fast speed --model {dense.model} --model {pruned.model} --rounds 5`"
    warnings = []
    if spread is None:
        warnings.append(f"one round: the timings are not repeated, so their spread is unknown; "
                        f"{again} repeats them")
    elif spread > SPREAD_LIMIT:
        warnings.append(f"the timings varied by up to {spread:.0%} between rounds (other work "
                        f"on the machine?): the ratios are not to be trusted; rerun {again} "
                        f"on a quiet machine")
    slack = 1 + max(FLOP_SLACK, spread or 0.0)
    for what, measured in (("prefill", prefill), ("decode", decode)):
        bound = flops[what]
        if bound is not None and measured > bound * slack:
            warnings.append(f"{what} {measured:.2f}x faster is more than the {bound:.2f}x that "
                            f"the smaller matrix multiplies explain: the machine's load changed "
                            f"between the measurements, not the model; rerun {again}")
    return SpeedCheck(prefill, decode, flops["prefill"], flops["decode"], spread, warnings)


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def speed_table(records: List[Speed]) -> str:
    """Models side by side (one column each); after the first, each figure's ratio to it."""
    if not records:
        return ""
    first = records[0]
    rows = [
        ("parameters", lambda r: r.params, lambda v: f"{v:,}"),
        ("weights on disk (MiB)", lambda r: r.disk_bytes, _mib),
        ("weights in memory (MiB)", lambda r: r.weight_bytes, _mib),
        (f"prefill {first.batch}x{first.seqlen} (ms)", lambda r: r.prefill_ms,
         lambda v: f"{v:,.1f}"),
        (f"decode {first.new_tokens} tokens (tokens/s)", lambda r: r.decode_tokens_per_s,
         lambda v: f"{v:,.1f}"),
        ("peak memory (MiB)", lambda r: r.peak_memory_mib,
         lambda v: "-" if v is None else f"{v:,.0f}"),
    ]
    header = [""] + [r.model for r in records]
    lines = [header]
    for label, get, fmt in rows:
        cells = [label]
        for i, r in enumerate(records):
            v, v0 = get(r), get(first)
            cell = fmt(v)
            if i and v is not None and v0:
                cell += f" ({v / v0:.2f}x)"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(row[c]) for row in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                      for c, (cell, w) in enumerate(zip(row, widths))) for row in lines]
    kinds = sorted({r.peak_memory_kind for r in records})
    rounds = (f"; the median of {first.rounds} rounds, the models measured in turn"
              if first.rounds > 1 else "")
    text.append(f"{first.device}, {first.dtype}; prefill: median of {first.repeats} after a "
                f"warm-up; decode: greedy, KV cache, steps after the first{rounds}; peak "
                f"memory: " + "; ".join(kinds))
    text += [f"warning ({r.model}): {w}" for r in records[1:]
             for w in check_speedup(first, r).warnings]
    return "\n".join(text)
