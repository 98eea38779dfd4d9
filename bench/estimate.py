"""An estimate to check GPU runs against: FLOPs and HBM bytes of one search step and of a whole
run for LLaMA-2-7B and 13B at the paper's settings, their roofline on one H100, the expected
times, and the peak memory from the engine's own plan (:func:`probprune.memory.plan_for`), beside
the paper's 2.7 h and ~35 GB for 13B on one A100.

    python -m bench.estimate                 the tables of docs/gpu-estimate.md (markdown)
    python -m bench.estimate --json          the same numbers as JSON
    python -m bench.estimate --plan-13b DIR  ``probprune-fast prune --dry-run`` of LLaMA-2-13B from
                                             a config.json written to DIR, at the paper's settings;
                                             exit 1 unless the plan fits 80 GB (bench/gpu_check.sh)

Every number comes from the constants below and the model shapes of ``bench.harness.registry``
(LLaMA-2-7B and 13B have the shapes of its ``llama-7b`` and ``llama-13b``: LLaMA-2 changed only the
context length, which seqlen 128 never reaches). Nothing here is measured.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List

from bench.harness.registry import llama_config, model_shape

# ---------------------------------------------------------------------------------------------
# assumptions (docs/gpu-estimate.md states each)

# The paper's code (ethanygao/backprop-free_LLM_pruning, scripts/llama2_7b.sh): --K 2
# --train-batch-size 8 --max-seq-length 128 --dataset-size 120000, one epoch (--n-epoches 1), so
# 120000 / 8 = 15000 steps; bf16 (--dtype default). It prunes 30, 40 and 50 %.
PAPER = dict(k=2, batch_size=8, seqlen=128, steps=120_000 // 8, dtype="bfloat16")
SPARSITY = 0.5
MODELS = {"LLaMA-2-7B": "llama-7b", "LLaMA-2-13B": "llama-13b"}  # name -> registry shapes
PAPER_13B = dict(hours=2.7, memory_gb=35.0, gpu="A100")

H100 = dict(name="H100 SXM", bf16_flops=990e12, fp32_flops=67e12, fp64_flops=67e12, hbm=3.35e12)
A100 = dict(name="A100", bf16_flops=312e12, hbm=2.0e12)
GPU_GB = 80  # the H100's memory, in 10^9 bytes (its 80 GiB hold more: the check errs safe)

# Expected = roofline / efficiency: bf16 GEMMs of 1-2k tokens reach about 60 % of the dense peak;
# the masked GEMMs target 1.15x the sliced one (DESIGN.md), so 0.6 / 1.15; streaming kernels
# about 80 % of HBM bandwidth.
GEMM_EFFICIENCY = 0.6 / 1.15
HBM_EFFICIENCY = 0.8
LAUNCH_S = 5e-6        # per kernel launch on the GPU's queue
KERNELS_PER_LAYER = 10  # norms, compaction, q/k/v, rope, attention, o, gate/up, down, residuals

# The rest of a run at the engine's defaults (probprune/config.py, probprune/pipeline.py): a
# Wanda-sp init on init_windows; the held-out loss of the hard mask every eval_every steps on
# val_windows; the best searched mask and the init mask each compensated (sequential, on
# compensate_windows) and scored on select_windows; perplexities on WikiText-2's test set at
# seqlen 128: the dense model's, and four of pruned models (init, bare searched mask, compensated
# init, the export).
WIKITEXT2_TOKENS = 338_000  # the test split under the LLaMA tokenizer, about 2,640 windows of 128
COMPENSATED_MASKS = 2
PRUNED_PERPLEXITIES = 4


@dataclass
class Work:
    """FLOPs (bf16 on tensor cores unless named) and HBM bytes of a piece of work."""
    flops: float = 0.0
    bytes: float = 0.0
    fp32_flops: float = 0.0   # the compensation's Gram matrices (TF32 off)
    fp64_flops: float = 0.0   # its solves
    launches: int = 0

    def __add__(self, o: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(asdict(self).values(), asdict(o).values())))

    def __mul__(self, n: float) -> "Work":
        return Work(self.flops * n, self.bytes * n, self.fp32_flops * n, self.fp64_flops * n,
                    int(self.launches * n))

    def roofline_s(self, gpu: dict = H100) -> float:
        """The lower bound: the slower of compute and memory traffic at peak."""
        compute = (self.flops / gpu["bf16_flops"] + self.fp32_flops / gpu.get("fp32_flops", 1)
                   + self.fp64_flops / gpu.get("fp64_flops", 1))
        return max(compute, self.bytes / gpu["hbm"])

    def expected_s(self, gpu: dict = H100) -> float:
        compute = (self.flops / (gpu["bf16_flops"] * GEMM_EFFICIENCY)
                   + self.fp32_flops / (gpu["fp32_flops"] * GEMM_EFFICIENCY)
                   + self.fp64_flops / (gpu["fp64_flops"] * GEMM_EFFICIENCY))
        return max(compute, self.bytes / (gpu["hbm"] * HBM_EFFICIENCY)) + self.launches * LAUNCH_S


def forward(s: dict, tokens: int, seqlen: int, keep: float, copies: int = 1,
            dense_masked: bool = False, fused_lm_head: bool = True, elt: int = 2) -> Work:
    """One forward over ``tokens`` tokens (windows of ``seqlen``) of ``copies`` masks, each keeping
    ``keep`` of every layer's heads and channels.

    FLOPs: 2 per multiply-add of the kept projections, causal attention (QK^T and PV over
    (seqlen + 1) / 2 keys on average), lm_head. Bytes: each mask reads its kept weights once
    (``dense_masked``: every weight, the paper's K dense forwards); every op reads its inputs and
    writes its outputs once; lm_head's logits never reach HBM when ``fused_lm_head``, else they
    are written and read once in fp32.
    """
    d, L, V = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"]
    hq, hkv, hd, F = (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"],
                      s["intermediate_size"])
    r = 1.0 if dense_masked else keep
    qkv, o = d * (hq + 2 * hkv) * hd, hq * hd * d
    per_token = 2 * r * (qkv + o + 3 * d * F) + 2 * 2 * r * hq * hd * (seqlen + 1) / 2
    weights = r * (qkv + o + 3 * d * F) * elt
    # activations of one token in one layer: norm in/out, q/k/v out, rope in/out of q and k,
    # attention in/out, o in + residual in/out, norm in/out, gate/up out, down in + residual in/out
    heads = (hq + 2 * hkv) * hd * r
    acts = (2 * d + d + heads + 2 * (hq + hkv) * hd * r + heads + hq * hd * r + hq * hd * r
            + 2 * d + 2 * d + d + F * r + F * r + 2 * d)
    if dense_masked:  # the masks multiplied into the head outputs and the MLP product
        acts += 2 * hq * hd + 2 * F
    n = tokens * copies
    head = Work(2 * n * d * V, V * d * elt + n * d * elt
                + (0 if fused_lm_head else n * V * 4 * 2), launches=2)
    return Work(L * n * per_token, L * (copies * weights + n * acts * elt),
                launches=L * KERNELS_PER_LAYER * (copies if dense_masked else 1)) + head


def step(s: dict, engine: bool, keep: float = 1 - SPARSITY) -> Work:
    """One policy-gradient step at the paper's settings: K losses on one batch."""
    k, b, t = PAPER["k"], PAPER["batch_size"], PAPER["seqlen"]
    return forward(s, b * t, t, keep, copies=k, dense_masked=not engine, fused_lm_head=engine)


def compensation(s: dict, windows: int, seqlen: int, keep: float) -> Work:
    """Sequential refit: the pruned model's and the dense layers' forwards over the windows, the
    fp32 input Gram matrices of o_proj and down_proj, and about 2 n^3 float64 per solve (OBS
    removals and the refit) on each layer's kept width n."""
    d, L, F = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    attn = s["num_attention_heads"] * s["head_dim"]
    n = windows * seqlen
    fwd = forward(s, n, seqlen, keep) + forward(s, n, seqlen, 1.0)
    grams = 2 * n * (F * F + attn * attn) * L
    solves = 2 * (F ** 3 + attn ** 3) * L
    return fwd + Work(fp32_flops=grams, fp64_flops=solves, bytes=4 * n * d * 2 * L)


def run_phases(s: dict, cfg) -> Dict[str, Work]:
    """A whole run at the paper's settings with the engine's defaults for the rest."""
    keep, t = 1 - SPARSITY, PAPER["seqlen"]
    return {
        "init (Wanda-sp)": forward(s, cfg.init_windows * t, t, 1.0),
        "search": step(s, engine=True) * PAPER["steps"],
        "held-out loss of the hard mask": forward(s, cfg.val_windows * t, t, keep)
        * (PAPER["steps"] // cfg.eval_every),
        "compensation (sequential, 2 masks)": compensation(s, cfg.compensate_windows, t, keep)
        * COMPENSATED_MASKS,
        "selection (2 compensated masks)": forward(s, cfg.select_windows * t, t, keep)
        * COMPENSATED_MASKS,
        "perplexities (WikiText-2 test, 5)": (forward(s, WIKITEXT2_TOKENS, t, 1.0)
                                              + forward(s, WIKITEXT2_TOKENS, t, keep)
                                              * PRUNED_PERPLEXITIES),
    }


def prune_config(model: str = "-", **kw):
    """The PruneConfig of a run at the paper's settings (the engine's defaults elsewhere)."""
    from probprune.config import PruneConfig

    return PruneConfig(model=model, sparsity=SPARSITY, out="-", **PAPER, **kw)


def estimate() -> dict:
    from probprune.memory import param_count, plan_for

    cfg = prune_config()
    out = {"assumptions": {"paper": PAPER, "sparsity": SPARSITY, "h100": H100, "a100": A100,
                           "gemm_efficiency": GEMM_EFFICIENCY, "hbm_efficiency": HBM_EFFICIENCY,
                           "launch_s": LAUNCH_S, "kernels_per_layer": KERNELS_PER_LAYER,
                           "wikitext2_tokens": WIKITEXT2_TOKENS, "paper_13b": PAPER_13B,
                           "compensated_masks": COMPENSATED_MASKS,
                           "pruned_perplexities": PRUNED_PERPLEXITIES},
           "models": {}}
    for name, reg in MODELS.items():
        s = model_shape(reg)
        config = llama_config(reg, PAPER["dtype"])
        plan = plan_for(cfg, config)
        eng, dense = step(s, engine=True), step(s, engine=False)
        phases = run_phases(s, cfg)
        total = sum(phases.values(), Work())
        out["models"][name] = {
            "params": param_count(config),
            "step": {"engine": _row(eng), "dense_masked": _row(dense),
                     "dense_masked_a100_roofline_s": dense.roofline_s(A100)},
            "run": {**{k: _row(w) for k, w in phases.items()}, "total": _row(total)},
            "paper_run_a100_roofline_s": dense.roofline_s(A100) * PAPER["steps"],
            "memory": {"peak": plan.peak, "terms": plan.terms},
        }
    return out


def _row(w: Work) -> dict:
    return {**asdict(w), "roofline_s": w.roofline_s(), "expected_s": w.expected_s()}


# ---------------------------------------------------------------------------------------------
# markdown

def _t(flops: float) -> str:
    return f"{flops / 1e12:,.1f}"


def _gb(b: float) -> str:
    return f"{b / 1e9:,.1f}"


def _time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:,.1f} ms"
    if seconds < 600:
        return f"{seconds:,.1f} s"
    return f"{seconds / 60:,.1f} min"


def markdown(e: dict) -> str:
    a = e["assumptions"]
    p = a["paper"]
    lines = [f"Settings: K {p['k']}, batch {p['batch_size']}, seqlen {p['seqlen']}, "
             f"{p['steps']:,} steps, {p['dtype']}, sparsity {a['sparsity']:.0%}; "
             f"H100 {a['h100']['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
             f"{a['h100']['hbm'] / 1e12:.2f} TB/s; expected = roofline at "
             f"{a['gemm_efficiency']:.2f} of peak FLOP/s and {a['hbm_efficiency']:.2f} of the "
             f"bandwidth, plus {a['launch_s'] * 1e6:.0f} us per launch.", "",
             "One search step (K losses on one batch):", "",
             "| model | params | way | TFLOP | HBM GB | roofline (H100) | bound | expected |",
             "|---|---:|---|---:|---:|---:|---|---:|"]
    for name, m in e["models"].items():
        for way, key in (("engine", "engine"), ("dense-masked (paper's code)", "dense_masked")):
            r = m["step"][key]
            bound = "compute" if r["flops"] / a["h100"]["bf16_flops"] >= r["bytes"] / \
                a["h100"]["hbm"] else "memory"
            lines.append(f"| {name} | {m['params'] / 1e9:.2f} B | {way} | {_t(r['flops'])} | "
                         f"{_gb(r['bytes'])} | {_time(r['roofline_s'])} | {bound} | "
                         f"{_time(r['expected_s'])} |")
    lines += ["", "A whole run (engine):", "",
              "| model | phase | TFLOP (bf16) | TFLOP (fp32 + fp64) | HBM GB | roofline | "
              "expected |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in e["models"].items():
        for phase, r in m["run"].items():
            strong = "**" if phase == "total" else ""
            lines.append(f"| {name} | {strong}{phase}{strong} | {_t(r['flops'])} | "
                         f"{_t(r['fp32_flops'] + r['fp64_flops'])} | {_gb(r['bytes'])} | "
                         f"{_time(r['roofline_s'])} | {strong}{_time(r['expected_s'])}{strong} |")
    paper = a["paper_13b"]
    m13 = e["models"]["LLaMA-2-13B"]
    lines += ["", "Against the paper (LLaMA-2-13B):", "",
              "| | time | peak memory |", "|---|---:|---:|",
              f"| paper, one {paper['gpu']} (reported) | {paper['hours']:.1f} h | "
              f"~{paper['memory_gb']:.0f} GB |",
              f"| paper's search, {paper['gpu']} roofline ({a['a100']['bf16_flops'] / 1e12:.0f} "
              f"TFLOP/s) | {_time(m13['paper_run_a100_roofline_s'])} | |",
              f"| paper's search (dense-masked), H100 roofline | "
              f"{_time(m13['step']['dense_masked']['roofline_s'] * p['steps'])} | |",
              f"| paper's search (dense-masked), H100 expected | "
              f"{_time(m13['step']['dense_masked']['expected_s'] * p['steps'])} | |",
              f"| engine, search only, H100 expected | "
              f"{_time(m13['run']['search']['expected_s'])} | |",
              f"| engine, whole run, H100 roofline | {_time(m13['run']['total']['roofline_s'])} "
              f"| |",
              f"| engine, whole run, H100 expected | "
              f"**{_time(m13['run']['total']['expected_s'])}** | "
              f"**{m13['memory']['peak'] / 1e9:.1f} GB** (plan) |"]
    measured, roof = paper["hours"] * 3600, m13["paper_run_a100_roofline_s"]
    engine_gain = m13["step"]["dense_masked"]["expected_s"] / m13["step"]["engine"]["expected_s"]
    lines += ["", f"The paper's {paper['hours']:.1f} h is {measured / roof:.1f}x its search's "
              f"{paper['gpu']} roofline (its code ran at {roof / measured:.0%} of the A100's bf16 "
              f"peak, its evaluations included); the engine's expected whole run on one H100 is "
              f"{measured / m13['run']['total']['expected_s']:.1f}x shorter than the reported "
              f"run, of which about {engine_gain:.1f}x is the engine (expected step, "
              f"dense-masked over engine, same GPU) and the rest the GPU and the paper code's "
              f"efficiency."]
    lines += ["", "Peak memory on the device (probprune.memory.plan_for at these settings, the "
              "engine's defaults elsewhere):", "", "| term | " +
              " | ".join(e["models"]) + " |", "|---|" + "---:|" * len(e["models"])]
    names = list(next(iter(e["models"].values()))["memory"]["terms"])
    for term in names:
        lines.append(f"| {term} | " + " | ".join(
            f"{m['memory']['terms'].get(term, 0) / 1e9:.2f} GB" for m in e["models"].values())
            + " |")
    lines.append("| **peak** (weights + the largest phase) | " + " | ".join(
        f"**{m['memory']['peak'] / 1e9:.2f} GB**" for m in e["models"].values()) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the dry run of LLaMA-2-13B (bench/gpu_check.sh's plan_13b step)

def plan_13b(directory: str) -> dict:
    """``probprune-fast prune --dry-run`` of LLaMA-2-13B from a config.json alone, at the paper's
    K, batch, seqlen and dtype, on a cuda device; the plan's terms and whether it fits."""
    from probprune.cli import main

    model_dir = os.path.join(directory, "llama-2-13b")
    llama_config(MODELS["LLaMA-2-13B"], PAPER["dtype"]).save_pretrained(model_dir)
    argv = ["prune", "--dry-run", "--json", "--model", model_dir, "--sparsity", str(SPARSITY),
            "--out", os.path.join(directory, "run"), "--device", "cuda",
            "--dtype", PAPER["dtype"], "--k", str(PAPER["k"]),
            "--batch-size", str(PAPER["batch_size"]), "--seqlen", str(PAPER["seqlen"])]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"probprune-fast {' '.join(argv)}: exit {rc}")
    terms = json.loads(out.getvalue().strip().splitlines()[-1])
    peak = terms.pop("peak")
    setting = (f"{PAPER['dtype']}, K {PAPER['k']}, batch {PAPER['batch_size']}, seqlen "
               f"{PAPER['seqlen']}")
    result = {"command": "probprune-fast " + " ".join(argv), "setting": setting, "peak": peak,
              "terms": terms, "limit_gb": GPU_GB, "fits": peak <= GPU_GB * 1e9}
    with open(os.path.join(directory, "plan.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="the numbers as JSON")
    parser.add_argument("--plan-13b", metavar="DIR",
                        help="dry-run LLaMA-2-13B's memory plan from a config.json written to DIR")
    args = parser.parse_args(argv)
    if args.plan_13b:
        os.makedirs(args.plan_13b, exist_ok=True)
        r = plan_13b(args.plan_13b)
        print(r["command"])
        print(f"LLaMA-2-13B ({r['setting']}): peak {r['peak'] / 2 ** 30:.2f} GiB = "
              f"{r['peak'] / 1e9:.2f} GB, {'fits' if r['fits'] else 'DOES NOT FIT'} "
              f"{GPU_GB} GB")
        for name, value in r["terms"].items():
            print(f"  {name:<44} {value / 2 ** 30:8.3f} GiB")
        return 0 if r["fits"] else 1
    e = estimate()
    print(json.dumps(e, indent=1) if args.json else markdown(e), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
