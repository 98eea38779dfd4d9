"""``probprune-fast``: the command line, thin over :mod:`probprune.config` (every setting),
:mod:`probprune.flags` (their flags), :mod:`probprune.preflight` (their checks) and
:func:`probprune.pipeline.prune`.

    probprune-fast eval  --model smollm2-135m --data wikitext2 --seqlen 128
    probprune-fast eval  --model runs/smollm2-30 --tasks piqa,hellaswag
    probprune-fast prune --model smollm2-135m --sparsity 0.3 --out runs/smollm2-30
    probprune-fast export --run runs/smollm2-30 --sparsity 0.5 --out runs/smollm2-50
    probprune-fast speed --model smollm2-135m --model runs/smollm2-30 --model runs/smollm2-50
    probprune-fast compare runs/smollm2-30-s0 runs/smollm2-30-s1 runs/smollm2-50-s0
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional

from probprune_kernels import BackendUnavailableError

from . import __version__
from .distributed import PeerFailure
from .compare import ordinal
from .config import EvalConfig, ExportConfig, PruneConfig, SpeedConfig, one_line
from .flags import add_arguments, from_args, read_config_file
from .preflight import check


def quiet_libraries() -> None:
    """Silences the progress bars of transformers and datasets (for machine-readable output)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def cmd_eval(args) -> int:
    from .data import eval_text, tokenize_joined
    from .evaluate import perplexity
    from .families import family_of
    from .models import load_model

    if args.json:
        quiet_libraries()
    config = from_args(EvalConfig, args)
    check(config)
    if config.eval_tasks:
        return zero_shot_eval(config, args.json)
    text = eval_text(config.eval, config.eval_file)
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device,
                                  devices=config.devices)
    load_s = time.perf_counter() - t0
    ids = tokenize_joined(tokenizer, [text.text])
    result = perplexity(model, ids, seqlen=config.seqlen, batch_size=config.eval_batch_size,
                        max_windows=config.max_eval_windows, stride=config.window_stride,
                        device=config.device, progress=not args.json,
                        bos=family_of(model.config).window_bos(tokenizer))
    record = {"model": config.model, "data": text.name, **result.as_dict(),
              "dtype": _dtype_name(model), "device": config.device, "load_s": round(load_s, 2)}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{config.model} on {text.name}: perplexity {result.ppl:.3f} "
              f"(mean NLL {result.nll:.4f} over {result.tokens:,} predicted tokens in "
              f"{result.windows:,} windows of {result.seqlen}; model loaded in {load_s:.1f} s)")
    return 0


def _dtype_name(model) -> str:
    """The dtype the model was loaded in (what ``--dtype auto`` chose)."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


def zero_shot_eval(config, as_json: bool) -> int:
    """``eval --tasks``: lm-eval's tasks instead of the perplexity."""
    from .models import load_model
    from .zero_shot import table, zero_shot

    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device,
                                  devices=config.devices)
    load_s = time.perf_counter() - t0
    result = zero_shot(model, tokenizer, config.eval_tasks, config.tasks_path,
                       config.eval_batch_size, config.task_limit)
    if as_json:
        print(json.dumps({"model": config.model, "zero_shot": result, "dtype": _dtype_name(model),
                          "device": config.device, "load_s": round(load_s, 2)}))
    else:
        print(f"{config.model} (lm-eval {result['lm_eval_version']}; model loaded in "
              f"{load_s:.1f} s)\n{table(result)}")
    return 0


def prune_record(out: str, report: dict) -> dict:
    """The one JSON line of ``prune --json``: the report's headline figures."""
    ppl, params = report["perplexity"], report["params"]
    return {"out": out, "dense_ppl": ppl["dense"]["ppl"], "init_ppl": ppl["init"]["ppl"],
            "pruned_ppl": ppl["pruned"]["ppl"], "pruned_bare_ppl": ppl["pruned_bare"]["ppl"],
            "init_compensated_ppl": ppl.get("init_compensated", {}).get("ppl"),
            # the search's best mask when another mask won the selection, else null
            "search_bare_ppl": ppl.get("search_bare", {}).get("ppl"),
            "search_compensated_ppl": ppl.get("search_compensated", {}).get("ppl"),
            "kept_prunable": params["kept_prunable"], "prunable": params["prunable"],
            "median_step_s": report["median_step_s"],
            "peak_memory_mib": report["peak_memory_mib"], "zero_shot": report.get("zero_shot")}


def cmd_prune(args) -> int:
    if args.json:
        quiet_libraries()
    config = from_args(PruneConfig, args, progress=not args.json)
    check(config)
    from .pipeline import prune

    report = prune(config)  # validated above: not probed again
    if report is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return 0
    if config.dry_run:
        print(json.dumps(report["memory_plan"]) if args.json else report["memory_plan_text"])
        return 0
    ppl = report["perplexity"]
    params = report["params"]
    if args.json:
        print(json.dumps(prune_record(config.out, report)))
        return 0
    windows = ppl["dense"]["windows"]
    print(f"\n{config.model}: removed {1 - params['kept_prunable'] / params['prunable']:.1%} of "
          f"{params['prunable']:,} prunable parameters (total {params['total']:,} -> "
          f"{params['pruned_model_total']:,})")
    stride = f", every {ordinal(config.window_stride)}" if config.window_stride > 1 else ""
    print(f"perplexity on {report['eval_data']} (seqlen {config.seqlen}, {windows} windows"
          f"{stride}): dense {ppl['dense']['ppl']:.2f} -> init ({config.init}) "
          f"{ppl['init']['ppl']:.2f} -> pruned (bare) {ppl['pruned_bare']['ppl']:.2f}"
          + (f" -> pruned (compensated, {config.compensate}) {ppl['pruned']['ppl']:.2f}"
             f" [init compensated: {ppl['init_compensated']['ppl']:.2f}]"
             if "init_compensated" in ppl else ""))
    chosen = next((c for c in report.get("selection", []) if c["chosen"]), None)
    if chosen is not None and chosen["step"] == 0:
        print("exported the init mask: after compensation it beat the searched masks on the "
              "held-out windows (report.json selection)"
              + (f"; the search's best mask: bare {ppl['search_bare']['ppl']:.2f}, compensated "
                 f"{ppl['search_compensated']['ppl']:.2f}" if "search_bare" in ppl else ""))
    if "zero_shot" in report:
        from .zero_shot import table

        zs = report["zero_shot"]
        print(f"zero-shot (exported model): {zs['error']}" if "error" in zs else
              f"zero-shot (exported model, lm-eval {zs['lm_eval_version']}):\n{table(zs)}")
    print(f"median step {report['median_step_s']:.3f} s, peak memory "
          f"{report['peak_memory_mib']:.0f} MiB ({report['peak_memory_kind']})")
    if "speed" in report:
        for line in speed_lines(report["speed"]):
            print(line)
    print(f"wrote {config.out}: pruned model ({_how_to_load(config.out)}) with its model card "
          f"README.md, masks.safetensors, scores.safetensors, report.json, *.png")
    return 0


def speed_lines(speed: dict) -> list:
    """The run's speed in one line, then a warning line for each reason to doubt it."""
    d, p, c = speed["dense"], speed["pruned"], speed["check"]
    rounds = (f"median of {p['rounds']} rounds, the models in turn" if p["rounds"] > 1 else
              "one round")
    flops = (f"; the smaller matrix multiplies explain up to {c['prefill_flop_ratio']:.2f}x "
             f"and {c['decode_flop_ratio']:.2f}x" if c["prefill_flop_ratio"] else "")
    return ([f"speed ({p['device']}, prefill of 1x{p['seqlen']}, {p['new_tokens']} decode "
             f"tokens, {rounds}): prefill {d['prefill_ms']:.1f} -> {p['prefill_ms']:.1f} ms "
             f"({c['prefill_speedup']:.2f}x), decode {d['decode_tokens_per_s']:.1f} -> "
             f"{p['decode_tokens_per_s']:.1f} tokens/s ({c['decode_speedup']:.2f}x){flops}"]
            + [f"warning: {w}" for w in c["warnings"]])


def _how_to_load(export_dir: str) -> str:
    from .models import MANIFEST

    with open(os.path.join(export_dir, MANIFEST), encoding="utf-8") as f:
        plain = json.load(f).get("architecture") == "plain"
    return ("plain architecture: from_pretrained loads it, no remote code" if plain else
            "probprune.load_pruned or from_pretrained with trust_remote_code=True")


def cmd_speed(args) -> int:
    if args.json:
        quiet_libraries()
    config = from_args(SpeedConfig, args)
    check(config)
    from .speed import measure_in_turn, speed_table

    records = measure_in_turn(config.models, config.speed_rounds, dtype=config.dtype,
                              device=config.device, batch=config.batch, seqlen=config.seqlen,
                              new_tokens=config.new_tokens, repeats=config.repeats)
    print(json.dumps([r.as_dict() for r in records]) if args.json else speed_table(records))
    return 0


def cmd_export(args) -> int:
    if args.json:
        quiet_libraries()
    config = from_args(ExportConfig, args, progress=not args.json)
    from .reexport import reexport

    record = reexport(config)
    if args.json:
        print(json.dumps(record))
        return 0
    p = record["params"]
    print(f"{record['out']}: {p['total']:,} parameters (base model {p['base_total']:,}); "
          f"prunable kept {p['kept_prunable']:,.0f} of {p['prunable']:,} "
          f"({1 - p['kept_prunable'] / p['prunable']:.1%} removed; allocation "
          f"{record['allocation']}, compensation {record['compensate']})")
    if record["perplexity"]:
        ppl = record["perplexity"]["pruned"]
        print(f"perplexity on {record['eval_data']} (seqlen {ppl['seqlen']}, {ppl['windows']} "
              f"windows): {ppl['ppl']:.2f}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, markdown

    comparison = compare(args.runs)
    print(json.dumps(comparison.as_dict()) if args.json else markdown(comparison))
    return 0


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse would print the whole usage first)."""

    def error(self, message):
        if message.endswith("expected one argument"):  # argparse took "-1e-3" or "-inf" for a flag
            message += " (a value that starts with '-' is written --flag=-value)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SETTINGS = {"eval": EvalConfig, "prune": PruneConfig, "speed": SpeedConfig,
            "export": ExportConfig}


def file_settings(argv) -> dict:
    """{command: the settings of its ``--config`` file} when the line names one, else {}: they
    become the flags' defaults, so the line overrides them and the flags they give are no
    longer required."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    command = next((a for a in argv if a in SETTINGS), None)
    if not known.config or command is None:
        return {}
    return {command: read_config_file(known.config, SETTINGS[command])}


def build_parser(defaults: Optional[dict] = None) -> argparse.ArgumentParser:
    defaults = defaults or {}
    parser = Parser(
        prog="probprune-fast",
        description="Structural pruning of LLaMA-family models by policy gradient, with masked kernels.")
    parser.add_argument("--version", action="version", version=f"probprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a model (dense, or a pruned directory), or "
                                    "its lm-eval task scores (--tasks)")
    add_arguments(EvalConfig, p, defaults.get("eval"))
    p.add_argument("--json", action="store_true",
                   help="print one JSON line (ppl, nll, tokens, windows, seqlen, ...; "
                        "with --tasks: zero_shot)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="search a pruning mask by policy gradient and export the "
                                     "smaller model")
    add_arguments(PruneConfig, p, defaults.get("prune"))
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("speed", help="parameters, size, prefill latency, decode tokens/s and "
                                     "peak memory of models, side by side")
    add_arguments(SpeedConfig, p, defaults.get("speed"))
    p.add_argument("--json", action="store_true", help="print one JSON list, a record per model")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("export", help="re-export a prune run at another sparsity from its saved "
                                      "scores, without searching")
    add_arguments(ExportConfig, p, defaults.get("export"))
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="the perplexities of several prune runs in one table, "
                                       "with the mean and sd over runs that differ only in seed")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a prune run's --out folder")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: the protocol, the groups and their means")
    p.set_defaults(func=cmd_compare)
    return parser


# What a user can cause (bad flags, files, models, an unusable backend): one line, no traceback.
USER_ERRORS = (ValueError, OSError, BackendUnavailableError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(file_settings(argv)).parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0): an exit code to return
        return e.code
    except ValueError as e:  # an unreadable --config file
        print(f"probprune-fast: error: {one_line(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"probprune-fast: error: {one_line(e)}", file=sys.stderr)
        return 2
    except PeerFailure as e:
        print(f"probprune-fast: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("probprune-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
