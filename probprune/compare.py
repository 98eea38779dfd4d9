"""``probprune-fast compare``: the quality table of several prune runs, read from their
``report.json``, one row per run and a mean +- sd row per group of runs that differ only in
their seed. Runs evaluated on different protocols (text, window length, stride, windows, BOS)
are refused: their perplexities are not comparable."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

# Settings that cannot move a perplexity: where and how the run ran, and what else it measured.
NOT_QUALITY = ("seed", "out", "resume", "progress", "dry_run", "stop_after", "dist_timeout",
               "device", "devices", "backend", "checkpoint_every", "eval_batch_size",
               "speed_tokens", "speed_rounds", "eval_tasks", "tasks_path", "task_limit")
PROTOCOL = ("seqlen", "stride", "windows", "tokens", "bos")
# report.json perplexity entry -> column; init_compensated is absent without compensation
STAGES = (("dense", "dense"), ("init", "init"), ("init_compensated", "init + comp"),
          ("search_bare", "search"), ("search_compensated", "search + comp"), ("pruned", "export"))


@dataclass
class RunRow:
    run: str
    sparsity: float
    seed: int
    ppl: Dict[str, Optional[float]]  # by STAGES' report key
    chosen: str                      # "search step N" or "init": which mask was exported
    parameters: int                  # the export's, all of them


def read_report(run: str) -> dict:
    path = os.path.join(run, "report.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run!r} holds no report.json: give the --out folder of a finished "
                         f"prune run")
    with open(path, encoding="utf-8") as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in ("settings", "params", "perplexity") if k not in report] or [
        f"perplexity.{k}" for k in ("dense", "pruned_bare", "pruned")
        if k not in report["perplexity"]]
    if missing:
        raise ValueError(f"{path} is not a finished prune run's report (no {', '.join(missing)})")
    return report


def protocol(report: dict) -> Tuple:
    dense = report["perplexity"]["dense"]
    return (report.get("eval_data"),) + tuple(dense.get(k) for k in PROTOCOL)


def ordinal(n: int) -> str:
    """2 -> '2nd', 11 -> '11th', 32 -> '32nd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe_protocol(p: Tuple) -> str:
    data, seqlen, stride, windows, tokens, bos = p
    every = f", every {ordinal(stride)}" if stride and stride > 1 else ""
    return (f"{data} (seqlen {seqlen}, {windows} windows{every}, {tokens:,} predicted tokens, "
            f"{'a BOS token' if bos else 'no BOS token'} at position 0)")


def row_of(run: str, report: dict) -> RunRow:
    ppl = report["perplexity"]
    chosen = next((c for c in report.get("selection") or [] if c.get("chosen")), None)
    best_step = report.get("val_loss", {}).get("best_step")
    # no selection: the search's best held-out mask was exported as it was (the init at step 0)
    step = chosen["step"] if chosen else best_step
    figures = {key: ppl[key]["ppl"] for key, _ in STAGES if key in ppl}
    if step == best_step:  # the export is the search's best mask: its figures are the search's
        figures.setdefault("search_bare", ppl["pruned_bare"]["ppl"])
        if report["settings"].get("compensate", "none") != "none":
            figures.setdefault("search_compensated", ppl["pruned"]["ppl"])
    # else a report without search_* (written before they were measured): the search's unknown
    return RunRow(
        run=run, sparsity=report["settings"]["sparsity"], seed=report["settings"]["seed"],
        ppl={key: figures.get(key) for key, _ in STAGES},
        chosen="init" if step == 0 else "search" if step is None else f"search step {step}",
        parameters=int(report["params"]["pruned_model_total"]))


def quality_key(report: dict) -> Tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in report["settings"].items()
                        if k not in NOT_QUALITY))


@dataclass
class Comparison:
    protocol: str
    groups: List[List[RunRow]]  # runs alike but for their seed, in the order given
    varied: List[str]           # the settings the groups differ in

    def as_dict(self) -> dict:
        return {"protocol": self.protocol, "varied": self.varied,
                "groups": [{"runs": [asdict(r) for r in g], "mean": mean_sd(g)}
                           for g in self.groups]}


def compare(runs: List[str]) -> Comparison:
    if not runs:
        raise ValueError("compare needs at least one run folder")
    where = [os.path.realpath(r) for r in runs]
    twice = sorted({r for r, w in zip(runs, where) if where.count(w) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)}: given more than once (a run counted twice "
                         f"would weigh twice in the mean)")
    reports = [read_report(r) for r in runs]
    by_protocol: Dict[Tuple, List[str]] = {}
    for run, report in zip(runs, reports):
        by_protocol.setdefault(protocol(report), []).append(run)
    if len(by_protocol) > 1:
        listed = "; ".join(f"{', '.join(names)} on {describe_protocol(p)}"
                           for p, names in by_protocol.items())
        raise ValueError(f"the runs were evaluated on different protocols, so their "
                         f"perplexities are not comparable: {listed}")
    groups: Dict[Tuple, List[RunRow]] = {}
    for run, report in zip(runs, reports):
        groups.setdefault(quality_key(report), []).append(row_of(run, report))
    settings = [dict(key) for key in groups]
    varied = sorted(name for name in set().union(*settings)
                    if len({s.get(name) for s in settings}) > 1)
    return Comparison(describe_protocol(next(iter(by_protocol))), list(groups.values()), varied)


def mean_sd(rows: List[RunRow]) -> Dict[str, Optional[List[float]]]:
    """{stage: [mean, sample sd]} over the group's runs (sd 0 for one run); None where a run
    lacks the stage."""
    out = {}
    for key, _ in STAGES:
        values = [r.ppl[key] for r in rows]
        out[key] = (None if None in values else
                    [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0])
    return out


def markdown(c: Comparison) -> str:
    stages = [(k, name) for k, name in STAGES
              if any(r.ppl[k] is not None for g in c.groups for r in g)]
    head = ["run", "sparsity", "seed"] + [name for _, name in stages] + ["exported mask", "parameters"]
    lines = [f"perplexity on {c.protocol}"
             + (f"; the groups differ in: {', '.join(c.varied)}" if c.varied else ""),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in c.groups:
        for r in group:
            cells = [f"{r.ppl[k]:.2f}" if r.ppl[k] is not None else "-" for k, _ in stages]
            lines.append(f"| {r.run} | {r.sparsity:g} | {r.seed} | " + " | ".join(cells)
                         + f" | {r.chosen} | {r.parameters:,} |")
        if len(group) > 1:
            stats = mean_sd(group)
            cells = [f"**{stats[k][0]:.2f} +- {stats[k][1]:.2f}**" if stats[k] else "-"
                     for k, _ in stages]
            lines.append(f"| mean +- sd of {len(group)} | {group[0].sparsity:g} | | "
                         + " | ".join(cells) + " | | |")
    return "\n".join(lines)
