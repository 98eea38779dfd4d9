"""Machine facts, the markdown tables and the PNG plots of a benchmark run."""
from __future__ import annotations

import math
import os
import platform
import subprocess
from collections import defaultdict
from importlib import metadata
from typing import List, Optional

import torch

import probprune_kernels as pk

from .micro import bench_backends
from .registry import OURS

COLUMNS_E2E = """\
- **dense-mask (a)**: seconds for the K losses the paper code's way: K full dense forwards of the
  Hugging Face model, masks multiplied into the activations (`probprune.baseline.DenseMaskedLM`);
- **engine (b)**: seconds for the same K losses by the engine (`MaskedCausalLM`, one K-mask forward
  through `probprune_kernels` on the named backend);
- **pruned ×K (c)**: seconds for K forwards (with labels) of the physically pruned model exported
  for the hard mask at that sparsity (`export_pruned` + `load_pruned`): the limit;
- **b/a** (`vs_dense_mask`, lower is better; target ≤ 0.625 at 50% sparsity, i.e. 1.6× faster)
  and **b/c** (`vs_limit`, target ≤ 1.15): ratios of medians timed side by side;
- **refit/b** (`refit_vs_engine`): the engine scoring each mask after its own least-squares refit
  of o_proj and down_proj (`--search-loss refit`) against the bare engine, side by side;
- **peak MiB a / b / c**: weights the case reads plus the memory one call adds (peak RSS rise in a
  fresh process on the CPU, `torch.cuda.max_memory_allocated` on a GPU);
- **loss gap**: max |b − a| over the K losses (the two compute the same numbers)."""

COLUMNS_MICRO = """\
- one row per op, shape, K and keep ratio; times are medians of the op with all K masks in one call;
- **vs sliced**: op / matmul on weights sliced beforehand (the physical limit; target ≤ 1.15);
- **vs dense**, **vs masked-dense**: op / full matmul, op / full matmul × mask (the paper's way);
- **vs K launches**: op with K masks in one call / the op called once per mask (< 1: batching pays);
- **sliced/dense**: what slicing saves at best at that keep ratio."""


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict:
    cuda = torch.cuda.is_available()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": _version("triton"), "transformers": _version("transformers"),
            "probprune": _version("probprune"), "python": platform.python_version(),
            "platform": platform.platform(), "gpu": torch.cuda.get_device_name() if cuda else None,
            "cuda": torch.version.cuda if cuda else None, "backends_available": pk.backends(),
            "backends_benchmarked": bench_backends(device), "git_commit": _git_commit(),
            "loadavg_start": load}


# ---------------------------------------------------------------------------------------------
# markdown

def _f(x, fmt="{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def conditions(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    dev = m["gpu"] or f"CPU ({m['cpu_count']} cores, {m['cpu_model']}), no GPU"
    load = m.get("loadavg_start")
    load_txt = f"; load average {load[0]:.1f} at start" if load else ""
    end = m.get("loadavg_end")
    load_txt += f", {end[0]:.1f} at end" if end else ""
    if s["device"].startswith("cuda"):
        micro_txt = (f"triton.testing.do_bench, {s['gpu_warmup_ms']:g} ms warm-up + "
                     f"{s['gpu_rep_ms']:g} ms, median (micro)")
    else:
        micro_txt = f"warm-up {s['micro_warmup']} + median of {s['micro_repeats']} (micro)"
    return (f"{dev}; torch {m['torch']} ({m['torch_threads']} threads), triton {m['triton']}, "
            f"transformers {m['transformers']}; {s['dtype']}; warm-up {s['warmup']} + median of "
            f"{s['repeats']} (end to end), {micro_txt}{load_txt}; plan `{result['plan']}`")


def e2e_table(rows: List[dict]) -> str:
    head = ("| model | params | B×T | K | sparsity | backend | dense-mask (a) s | engine (b) s | "
            "pruned ×K (c) s | b/a | b/c | refit/b | peak MiB a / b / c | loss gap |\n"
            "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|\n")
    lines = []
    for r in rows:
        t, mem = r["time_s"], r["memory"]
        peaks = " / ".join(_f(mem[k]["peak_mib"], "{:.0f}") for k in ("dense_mask", "engine", "limit"))
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['batch']}×{r['seqlen']} | {r['K']} | "
            f"{r['sparsity']:.0%} | {r['backend']} | {_f(t['dense_mask'])} | {_f(t['engine'])} | "
            f"{_f(t['limit'])} | **{_f(r['vs_dense_mask'], '{:.2f}')}** | "
            f"**{_f(r['vs_limit'], '{:.2f}')}** | {_f(r.get('refit_vs_engine'), '{:.2f}')} | "
            f"{peaks} | {_f(r['loss_gap'], '{:.1e}')} |")
    return head + "\n".join(lines) + "\n"


def _check(r: dict) -> str:
    """A backend's output against the reference backend's (plans with ``check_outputs``)."""
    if "matches_reference" in r:
        return "same" if r["matches_reference"] else "**differs**"
    diff = _f(r.get("max_abs_diff_vs_reference"), "{:.1e}")
    return f"**{diff} beyond tolerance**" if r.get("within_tolerance") is False else diff


def micro_table(rows: List[dict]) -> str:
    checked = any("matches_reference" in r or "max_abs_diff_vs_reference" in r for r in rows)
    head = ("| op | shape | K | keep | backend | op ms | sliced ms | vs sliced | vs dense | "
            "vs masked-dense | vs K launches | sliced/dense |" + (" vs reference |" if checked else "")
            + "\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
            + ("---:|" if checked else "") + "\n")
    by_group = defaultdict(dict)
    for r in rows:
        by_group[r["group"]][r["provider"]] = r
    lines = []
    for group, provs in by_group.items():
        for p, r in provs.items():
            if not p.startswith(OURS):
                continue
            sliced = provs.get("torch-sliced", {}).get("median_s")
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['K']} | {r['actual_keep']:.2f} | {r['backend']} | "
                f"{_f(r['median_s'] * 1e3, '{:.2f}')} | "
                f"{_f(None if sliced is None else sliced * 1e3, '{:.2f}')} | "
                f"{_f(r.get('vs_sliced'), '{:.2f}')} | {_f(r.get('vs_dense'), '{:.2f}')} | "
                f"{_f(r.get('vs_masked_dense'), '{:.2f}')} | {_f(r.get('vs_k_launches'), '{:.2f}')} | "
                f"{_f(r.get('sliced_vs_dense'), '{:.2f}')} |" + (f" {_check(r)} |" if checked else ""))
    return head + "\n".join(lines) + "\n"


def write_markdown(path: str, result: dict) -> None:
    parts = [f"# probprune benchmarks\n\n{conditions(result)}.\n"]
    if result["end_to_end"]:
        parts += ["\n## End-to-end step (K losses of one policy-gradient step)\n\n",
                  e2e_table(result["end_to_end"]), "\n", COLUMNS_E2E, "\n"]
    if result["micro"]:
        parts += ["\n## Micro-benchmarks\n\n", micro_table(result["micro"]), "\n", COLUMNS_MICRO,
                  "\n"]
    if result.get("dry_run"):
        planned = result["planned"]
        parts.append(f"\nDry run: nothing was timed. The plan has {len(planned['micro'])} "
                     f"micro-benchmark and {len(planned['end_to_end'])} end-to-end cases "
                     f"(listed in bench.json).\n")
    for msg in result.get("skipped", []):
        parts.append(f"\nSkipped: {msg}\n")
    if result.get("errors"):
        parts.append("\n## Errors\n\n" + "".join(
            f"- {e['part']} {e['case']} `{e['provider']}`: {e['error']}\n"
            for e in result["errors"]))
    if result.get("plots"):
        parts.append("\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                      for p in result["plots"]) + "\n")
    with open(path, "w") as f:
        f.write("".join(parts))


# ---------------------------------------------------------------------------------------------
# plots

def write_plots(out: str, result: dict) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = result["end_to_end"]
    note = conditions(result)
    if rows:
        fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows)), 4))
        labels = [f"{r['model']}\nK={r['K']} s={r['sparsity']:g}\n{r['backend']}" for r in rows]
        xs = range(len(rows))
        for j, (key, name) in enumerate((("dense_mask", "(a) dense-mask"), ("engine", "(b) engine"),
                                         ("limit", "(c) pruned ×K"))):
            ax.bar([x + (j - 1) * 0.27 for x in xs], [r["time_s"][key] for r in rows], width=0.27,
                   label=name)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds per step (K losses)")
        ax.set_title("End-to-end step, side by side", fontsize=10)
        ax.legend(fontsize=8)
        fig.text(0.01, 0.005, note, fontsize=5, wrap=True)
        paths.append(_save(fig, out, "e2e_step_time.png"))

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        base = [r for r in rows if r["K"] == 2 and abs(r["sparsity"] - 0.5) < 1e-9]
        for backend in sorted({r["backend"] for r in base}):
            sel = sorted((r for r in base if r["backend"] == backend), key=lambda r: r["params"])
            x = [r["params"] / 1e6 for r in sel]
            axes[0].plot(x, [r["vs_dense_mask"] for r in sel], "o-", label=f"b/a ({backend})")
            axes[0].plot(x, [r["vs_limit"] for r in sel], "s--", label=f"b/c ({backend})")
            for r in sel:
                axes[0].annotate(r["model"], (r["params"] / 1e6, r["vs_dense_mask"]), fontsize=6)
        axes[0].axhline(1.15, color="grey", lw=0.6, ls=":")
        axes[0].axhline(0.625, color="grey", lw=0.6, ls=":")
        axes[0].set(xscale="log", xlabel="parameters (M)", ylabel="time ratio",
                    title="K=2, 50% sparsity: ratios vs model size")
        axes[0].legend(fontsize=7)
        smol = defaultdict(list)
        for r in rows:
            if abs(r["sparsity"] - 0.5) < 1e-9:
                smol[r["model"]].append(r)
        multi_k = {m: v for m, v in smol.items() if len({r["K"] for r in v}) > 1}
        for m, sel in multi_k.items():
            sel = sorted(sel, key=lambda r: r["K"])
            ks = [r["K"] for r in sel]
            for key, style in (("dense_mask", "o-"), ("engine", "s-"), ("limit", "^-")):
                axes[1].plot(ks, [r["time_s"][key] for r in sel], style, label=f"{m} {key}")
        axes[1].set(xlabel="K (masks per step)", ylabel="seconds per step",
                    title="Cost vs K at 50% sparsity")
        if multi_k:
            axes[1].legend(fontsize=7)
        else:
            axes[1].text(0.5, 0.5, "no K series in this plan", ha="center", va="center",
                         transform=axes[1].transAxes)
        fig.text(0.01, 0.005, note, fontsize=5, wrap=True)
        paths.append(_save(fig, out, "e2e_scaling.png"))

    mrows = [r for r in result["micro"] if r["provider"].startswith(OURS)
             and r.get("vs_sliced") is not None]
    if mrows:
        ops = sorted({r["op"] for r in mrows})
        fig, axes = plt.subplots(1, len(ops), figsize=(3.2 * len(ops), 3.2), squeeze=False)
        for ax, op in zip(axes[0], ops):
            series = defaultdict(list)
            for r in mrows:
                if r["op"] == op:
                    series[(r["shape"], r["backend"], r["K"])].append(r)
            for (shape, backend, K), sel in sorted(series.items()):
                sel = sorted(sel, key=lambda r: r["actual_keep"])
                ax.plot([r["actual_keep"] for r in sel], [r["vs_sliced"] for r in sel], "o-",
                        label=f"{shape} {backend} K={K}", ms=3)
            ax.axhline(1.15, color="grey", lw=0.6, ls=":")
            ax.set(title=op, xlabel="keep ratio", ylabel="time / pre-sliced matmul")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=5)
        fig.text(0.01, 0.005, note, fontsize=5, wrap=True)
        paths.append(_save(fig, out, "micro_vs_sliced.png"))
    return paths


def _save(fig, out, name):
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
