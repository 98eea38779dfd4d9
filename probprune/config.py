"""Every prune setting, defined once.

Each field of :class:`PruneConfig` carries its default, help text, command-line flag, allowed
values, rule, and whether a resumed run must match it. The argparse flags
(:func:`add_prune_arguments`), :meth:`~PruneConfig.validate`, the resume check
(:meth:`~PruneConfig.resume_mismatch`) and the ``settings`` of report.json and checkpoints
(:meth:`~PruneConfig.as_dict`) are all derived from those fields. ``probprune-fast eval`` takes
the model and evaluation fields of the same definitions (:class:`EvalConfig`).

``validate()`` runs before any model is loaded: whatever can be known without the model (types,
finite numbers, ranges, choices, combinations, files, devices) fails there, in one line that names
the flag and the rule. Cheap checks run first, then those that read files or ask the machine.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import re
import types
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Union, get_args, get_origin

import torch

from .data import WIKITEXT2_ENV, DataError, check_calibration_source, check_eval_source
from .distributed import local_world_size_from_env, world_size_from_env
from .importance import INIT_METHODS
from .models import EMBEDDED, UnsupportedModelError, check_supported

Problem = Optional[str]  # what is wrong, in words that follow the flag ("must be ..."); None: fine


class ConfigError(ValueError):
    """A setting that cannot work; the message names its flag and the rule."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (some library messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def setting(default=MISSING, *, help: str, flag: Optional[str] = None, cli: bool = True,
            choices=None, check: Optional[Callable[[Any], Problem]] = None,
            probe: Optional[Callable[[Any], Problem]] = None, resume: bool = False,
            parse: Optional[Callable[[str], Any]] = None, cli_default=MISSING,
            from_cli: Optional[Callable[[Any], Any]] = None,
            dry_probe: Optional[Callable[[Any], Problem]] = None,
            factory: Optional[Callable[[], Any]] = None):
    """A config field. ``flag``: its spelling on the command line (default ``--name-with-dashes``;
    ``cli=False``: none). ``check(value)`` and ``probe(value)`` return None or the problem;
    ``probe`` reads files or asks the machine, so it runs after every cheap check. ``resume``:
    a resumed run must match it. ``parse``: how the flag's text becomes a value; ``cli_default``
    and ``from_cli``: the flag's own default and how its value becomes the field's.
    ``dry_probe``: the probe of a ``--dry-run``, which reads no weights and needs no device.
    ``factory``: the default, computed when a config is made (the machine's device)."""
    meta = dict(help=help, flag=flag, cli=cli, choices=choices, check=check, probe=probe,
                resume=resume, parse=parse, cli_default=cli_default, from_cli=from_cli,
                dry_probe=dry_probe)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def rule(ok: Callable[[Any], bool], text: str) -> Callable[[Any], Problem]:
    """A check from a predicate and the rule in words (``"must be at least 1"``)."""
    return lambda value: None if ok(value) else f"{text}, got {value!r}"


def at_least(low) -> Callable[[Any], Problem]:
    return rule(lambda v: v >= low, f"must be at least {low}")


POSITIVE = rule(lambda v: v > 0, "must be > 0")
FRACTION = rule(lambda v: 0.0 < v < 1.0, "must lie strictly between 0 and 1")


def _name_list(text: str) -> List[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _layer_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}")


# ---------------------------------------------------------------------------------------------
# probes: the checks that read files or ask the machine

HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[\w.-]+")


def _model_problem(name: str, files: bool = True) -> Problem:
    """``files``: a directory must hold weights and a tokenizer too (not for a dry run, which
    plans from config.json alone)."""
    if name in EMBEDDED:
        return None
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            return f"{name!r} is a directory without a config.json, not a model directory"
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{name!r}: config.json cannot be read ({one_line(e)})"
        if not isinstance(config, dict):
            return f"{name!r}: config.json holds no model configuration"
        try:  # the architecture check of the loader, here before any weight is read
            check_supported(types.SimpleNamespace(**config))
        except UnsupportedModelError as e:
            return f"{name!r}: {e}"
        return _files_problem(name) if files else None
    if os.path.exists(name):
        return f"{name!r} is a file, not a model directory"
    if HUB_ID.fullmatch(name):
        return None
    if os.path.sep in name or name.startswith((".", "~")):
        return f"{name!r} does not exist"
    return (f"{name!r} is neither a model directory, a hub name (org/name) nor an embedded "
            f"model ({', '.join(EMBEDDED)})")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "tekken.json", "spiece.model")


def _files_problem(directory: str) -> Problem:
    """The weights and tokenizer a model directory needs; a corrupt or truncated safetensors file
    fails here, where only its header is read."""
    from safetensors import safe_open

    weights = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not weights and not glob.glob(os.path.join(directory, "*.bin")):
        return f"{directory!r} holds no weights (model.safetensors or pytorch_model.bin)"
    if not any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES):
        return f"{directory!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
    for path in weights:
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure to parse the header: unreadable
            return f"{path!r} is not a readable safetensors file ({one_line(e)})"
    return None


def _out_problem(path: str) -> Problem:
    if not path:
        return "must name a directory, got ''"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path!r} is an existing file; it must be a directory (new, or an earlier run's)"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{path!r} cannot be created: {parent!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path!r} cannot be written: {parent!r} is not writable"
    return None


def _scores_problem(path: str) -> Problem:
    """None when ``path`` holds ``probs`` the way the init reads it (a safetensors file, or a
    torch file with a tensor or a dict with ``probs``): a 1-D tensor of values in [0, 1]. Scores
    files are small (one value per model unit), so reading the tensor costs nothing."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                if "probs" not in f.keys():
                    return (f"{path!r} holds no 'probs' tensor (it holds {sorted(f.keys())}): not "
                            f"a scores file")
                probs = f.get_tensor("probs")
        except Exception as e:  # noqa: BLE001 - any failure to parse it: not a scores file
            return f"{path!r} is not a readable safetensors file ({one_line(e)})"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to unpickle: not a scores file
            return (f"{path!r} is neither a safetensors nor a torch file ({type(e).__name__}); "
                    f"give the scores.safetensors of an earlier run")
        probs = obj.get("probs") if isinstance(obj, dict) else obj
        if not isinstance(probs, torch.Tensor):
            return f"{path!r} holds neither a tensor nor a dict with a 'probs' tensor"
    if probs.dim() != 1 or probs.numel() == 0:
        return (f"{path!r}: 'probs' must be a 1-D tensor of keep-probabilities, got shape "
                f"{tuple(probs.shape)}")
    if not torch.all((probs >= 0) & (probs <= 1)):  # NaN fails both comparisons
        return f"{path!r}: 'probs' holds values outside [0, 1] (or NaN)"
    return None


def _init_problem(value: str) -> Problem:
    if value in INIT_METHODS:
        return None
    if not os.path.isfile(value):
        return (f"must be one of {', '.join(INIT_METHODS)} or the scores file of an earlier run; "
                f"{value!r} is neither (no such file)")
    return _scores_problem(value)


def _device_problem(value: str, present: bool = True) -> Problem:
    """``present``: the device must exist on this machine (not for a dry run's plan)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return f"{value!r} is not a device: use cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{value!r} is not supported: use cpu, cuda or cuda:N"
    if not present:
        return None
    if not torch.cuda.is_available():
        return f"{value!r} needs a CUDA GPU, and torch {torch.__version__} sees none here; use cpu"
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        return (f"{value!r} does not exist: this machine has {n} CUDA device(s), cuda:0 to "
                f"cuda:{n - 1}")
    return None


def _devices_problem(names: List[str], present: bool = True) -> Problem:
    if len(names) == 1:
        return "lists one device: use --device for a single device"
    for name in names:
        problem = _device_problem(name, present)
        if problem:
            return problem
    return None


# ---------------------------------------------------------------------------------------------
# what is derived from the fields: flags, the config of parsed flags, validation, resume check

@dataclass
class _Combination:
    """A rule over several fields; ``check(config)`` returns None or the whole message."""
    names: tuple
    check: Callable[[Any], Problem]
    probe: bool  # reads files or asks the machine: runs after every cheap check


COMBINATIONS: List[_Combination] = []


def combination(*names: str, probe: bool = False):
    def register(check):
        COMBINATIONS.append(_Combination(names, check, probe))
        return check
    return register


class _AppendOverFile(argparse._AppendAction):
    """``append`` for a list a ``--config`` file set: the first flag on the line starts a new
    list (the line overrides the file), the next ones add to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def read_config_file(path: str, cls) -> Dict[str, Any]:
    """The settings of a YAML or JSON file, by field name of ``cls``: keys are flag names (with
    dashes or underscores, with or without the leading --) or field names; a file with a
    ``settings`` entry (a run's report.json or probprune.json) gives those, so a run's record
    re-runs it. Fields without a flag (progress) are passed over; any other key is an error."""
    import yaml  # a dependency of transformers

    try:
        with open(path, encoding="utf-8") as f:
            data = (json.load(f) if path.endswith(".json") else yaml.safe_load(f))
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r} ({one_line(e)})") from e
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--config: {path!r} is not valid JSON / YAML ({one_line(e)})") from e
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} holds no mapping of settings")
    by_key = {}
    for f in fields(cls):
        by_key[f.name] = f
        if f.metadata["cli"]:
            by_key[cls.flag(f.name).lstrip("-").replace("-", "_")] = f
    out, unknown = {}, []
    for key, value in data.items():
        f = by_key.get(str(key).lstrip("-").replace("-", "_"))
        if f is None:
            unknown.append(str(key))
        elif f.metadata["cli"]:
            out[f.name] = value
    if unknown:
        raise ConfigError(f"--config: {path!r} has settings this command does not take: "
                          f"{', '.join(sorted(unknown))}")
    return out


class _Settings:
    """What a config class derives from its fields (its subclasses are dataclasses)."""

    @classmethod
    def flag(cls, name: str) -> str:
        """How the messages name a field: its flag, or its name when it has none."""
        meta = next(f.metadata for f in fields(cls) if f.name == name)
        if not meta["cli"]:
            return name
        return meta["flag"] or "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser,
                      defaults: Optional[Dict[str, Any]] = None) -> None:
        """The flags of every field; ``defaults`` (a ``--config`` file's settings, by field name)
        take the place of the fields' own defaults, and the flags on the line override them."""
        defaults = defaults or {}
        parser.add_argument("--config", metavar="FILE",
                            help="settings from a YAML or JSON file (flag names as keys, or a "
                                 "run's report.json / probprune.json); flags on the line "
                                 "override it")
        for f in fields(cls):
            meta = f.metadata
            if not meta["cli"]:
                continue
            flag = cls.flag(f.name)
            default = meta["cli_default"]
            if default is MISSING:
                default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name in defaults:
                default = defaults[f.name]
            hidden = default is MISSING or default is None or default is False or default == []
            shown = "" if hidden else f" (default: {default})"
            kw: Dict[str, Any] = dict(dest=f.name, help=meta["help"] + shown)
            if f.type is bool:  # --flag / --no-flag, whichever way the default goes
                kw.update(action=argparse.BooleanOptionalAction, default=default)
            elif get_origin(f.type) is list and meta["parse"] is None:  # --flag A --flag B
                kw.update(action=_AppendOverFile if f.name in defaults else "append",
                          type=get_args(f.type)[0], required=default is MISSING,
                          metavar=flag.lstrip("-").upper())
                if f.name in defaults:
                    kw["default"] = list(default)
            else:
                kw.update(type=meta["parse"] or _scalar(f.type), choices=meta["choices"])
                if meta["choices"] is None:
                    kw["metavar"] = METAVARS.get(_scalar(f.type)) or flag.lstrip("-").upper()
                if default is MISSING:
                    kw["required"] = True
                else:
                    kw["default"] = default
            parser.add_argument(flag, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides):
        """The config of parsed flags; ``overrides`` set fields directly (those without a flag)."""
        values = {}
        for f in fields(cls):
            if f.metadata["cli"] and hasattr(args, f.name):
                convert = f.metadata["from_cli"]
                value = getattr(args, f.name)
                values[f.name] = convert(value) if convert else value
        values.update(overrides)
        return cls(**values)

    def validate(self, skip: tuple = ()) -> None:
        """Raises :class:`ConfigError` for the first setting that cannot work; the fields named
        in ``skip`` are not probed on the machine (a model already in memory is not looked for
        on disk)."""
        mine = {f.name for f in fields(self)}
        combos = [c for c in COMBINATIONS if set(c.names) <= mine]
        for f in fields(self):
            self._raise(f.name, self._field_problem(f))
        for c in combos:
            if not c.probe:
                self._raise(None, c.check(self))
        dry = getattr(self, "dry_run", False)
        for f in fields(self):
            value = getattr(self, f.name)
            probe = (dry and f.metadata["dry_probe"]) or f.metadata["probe"]
            if probe and value is not None and f.name not in skip:
                self._raise(f.name, probe(value))
        for c in combos:
            if c.probe:
                self._raise(None, c.check(self))

    def _field_problem(self, f) -> Problem:
        value = getattr(self, f.name)
        problem = _type_problem(value, f.type)
        if problem or value is None:
            return problem
        choices = f.metadata["choices"]
        if choices and value not in choices:
            return f"must be one of {', '.join(choices)}, got {value!r}"
        return f.metadata["check"](value) if f.metadata["check"] else None

    def _raise(self, name: Optional[str], problem: Problem) -> None:
        if problem:
            raise ConfigError(problem if name is None else f"{self.flag(name)} {problem}")

    def resume_mismatch(self, saved_settings: dict) -> List[str]:
        """One entry per setting a resumed run must match that differs from the checkpoint's."""
        return [f"{f.name} ({saved_settings.get(f.name)!r} there, {getattr(self, f.name)!r} now)"
                for f in fields(self)
                if f.metadata["resume"] and saved_settings.get(f.name) != getattr(self, f.name)]

    @classmethod
    def resume_keys(cls) -> tuple:
        return tuple(f.name for f in fields(cls) if f.metadata["resume"])

    def as_dict(self) -> dict:
        """The ``settings`` of report.json and of checkpoints."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# field types: what the flag's text converts to, and the type check of validate()

def _scalar(tp):
    """The type the flag's text converts to: int, float or str (``Optional[...]`` unwrapped)."""
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) is Union else tp


def _is(value, tp) -> bool:
    origin = get_origin(tp)
    if origin is Union:
        return any(_is(value, a) for a in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_is(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if tp is float else tp)


METAVARS = {int: "N", float: "X"}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
LIST_WORDS = {int: "integers", str: "strings"}


def _type_problem(value, tp) -> Problem:
    if not _is(value, tp):
        if get_origin(tp) is list:
            return f"must be a list of {LIST_WORDS[get_args(tp)[0]]}, got {value!r}"
        words = TYPE_WORDS[_scalar(tp)]
        unset = " or unset (None)" if get_origin(tp) is Union else ""
        return f"must be {words}{unset}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return None


# ---------------------------------------------------------------------------------------------
# the fields

@dataclass
class PruneConfig(_Settings):
    """A pruning run. ``probprune-fast prune`` builds it from its flags; every field's rule is
    checked by :meth:`validate`, which :func:`probprune.pipeline.prune` calls first."""
    model: str = setting(
        help="Hugging Face directory or hub name, a probprune pruned directory, or the embedded "
             "'smollm2-135m'; with --dry-run a directory holding only config.json will do",
        probe=_model_problem, dry_probe=lambda name: _model_problem(name, files=False),
        resume=True)
    sparsity: float = setting(
        help="fraction of the prunable parameters (attention, MLP, and layers with "
             "--prune-layers) to remove, in (0, 1)", check=FRACTION, resume=True)
    out: str = setting(help="run directory: checkpoint, pruned model, report", probe=_out_problem)
    steps: int = setting(400, help="policy-gradient steps", check=at_least(1), resume=True)
    k: int = setting(2, help="masks sampled per step (one batched forward)", check=at_least(1),
                     resume=True)
    batch_size: int = setting(4, help="calibration windows per step", check=at_least(1),
                              resume=True)
    seqlen: int = setting(128, help="window length in tokens", check=at_least(2), resume=True)
    calib: str = setting(
        "wiki-summaries", help="calibration text: wiki-summaries, wikitext2, c4, or a local "
                               ".txt/.jsonl/.json file or folder", resume=True)
    nsamples: int = setting(512, help="calibration windows the steps draw their batches from",
                            check=at_least(1), resume=True)
    val_windows: int = setting(64, help="held-out calibration windows that choose the best hard "
                                        "mask", check=at_least(1), resume=True)
    select_windows: int = setting(
        256, check=at_least(1),
        help="held-out calibration windows, apart from --val-windows, on which the compensated "
             "search mask and the compensated init mask compete for the export")
    eval: str = setting(
        "wikitext2", help="evaluation text: wikitext2 (hub, or the local file of --data-file / "
                          "$PROBPRUNE_WIKITEXT2), wiki-summaries (held-out part), or a local "
                          ".txt/.raw/.jsonl/.json file or folder")
    eval_file: Optional[str] = setting(
        None, flag="--data-file",
        help="local copy of the wikitext2 evaluation text, e.g. wikitext-2-raw/wiki.test.raw")
    max_eval_windows: Optional[int] = setting(
        None, flag="--max-windows", help="evaluate only the first N windows (a quick look)",
        check=at_least(1))
    window_stride: int = setting(
        1, help="evaluate every N-th window (16 with --seqlen 128: the every-16th-window "
                "WikiText-2 protocol of FLAP / LLM-Pruner comparisons)", check=at_least(1))
    eval_batch_size: int = setting(8, help="windows per forward during evaluation",
                                   check=at_least(1))
    eval_tasks: List[str] = setting(
        [], parse=_name_list,
        check=rule(lambda v: len(set(v)) == len(v), "must name each task once"),
        help="lm-evaluation-harness tasks, comma-separated, e.g. piqa,hellaswag,arc_easy (needs "
             "pip install 'probprune[lmeval]'): prune scores the exported model into "
             "report.json's zero_shot; eval runs them instead of the perplexity")
    tasks_path: Optional[str] = setting(
        None, probe=lambda path: None if os.path.isdir(path) else f"{path!r} is not a directory",
        help="a folder of your own lm-eval task YAML files, found besides the built-in tasks")
    task_limit: Optional[int] = setting(
        None, check=at_least(1), help="score only the first N documents of each task (a quick "
                                      "look; lm-eval's --limit)")
    speed_tokens: int = setting(
        32, help="decode tokens timed on the dense model and on the export for report.json's "
                "speed (after a prefill of one --seqlen window); 0: no timing",
        check=rule(lambda v: v == 0 or v >= 2, "must be 0 (no timing) or at least 2"))
    lr: float = setting(0.01, help="peak learning rate (cosine schedule); advantages are in "
                                   "units of their running RMS", check=POSITIVE, resume=True)
    min_lr_ratio: float = setting(0.0, help="final learning rate as a fraction of --lr",
                                  check=rule(lambda v: 0 <= v <= 1, "must lie in [0, 1]"))
    init: str = setting(
        "wanda-sp", help=f"{', '.join(INIT_METHODS)}, or the scores file of an earlier run "
                         f"(scores.safetensors)", probe=_init_problem, resume=True)
    init_temperature: float = setting(
        0.1, help="temperature of the sigmoid that maps the init metric (z-scores inside each "
                  "layer) to probabilities: lower keeps the sampled masks closer to the init's "
                  "hard mask", check=POSITIVE, resume=True)
    init_attn_sparsity: float = setting(
        0.0, help="fraction of attention the init removes under a global budget (the MLP takes "
                  "the rest; the search then moves budget between them)",
        check=rule(lambda v: 0 <= v < 1, "must lie in [0, 1)"), resume=True)
    init_windows: int = setting(64, help="calibration windows of the init's activation "
                                         "statistics", check=at_least(1), resume=True)
    channel_block: int = setting(
        64, help="MLP channels per search unit: each layer's channels are ranked by the init "
                 "metric and cut into blocks of this size, so the search learns how many "
                 "channels each layer keeps, with far less noise per unit; 1 searches every "
                 "channel on its own", check=at_least(1), resume=True)
    attn_units: str = setting(
        "kv-group", choices=("kv-group", "query-head"), resume=True,
        help="attention units: whole KV groups (a key/value head with its query heads), or "
             "single query heads (a KV group stays while any of its query heads does)")
    budget: str = setting("global", choices=("global", "per-type"), resume=True,
                          help="one parameter budget across all units, or separate "
                               "attention/MLP ratios")
    scope: str = setting("global", choices=("global", "layer"), resume=True,
                         help="budget over the whole model, or the same ratio in every layer")
    attn_sparsity: Optional[float] = setting(
        None, help="with --budget per-type: attention ratio (default: --sparsity)",
        check=FRACTION, resume=True)
    mlp_sparsity: Optional[float] = setting(
        None, help="with --budget per-type: MLP ratio (default: --sparsity)", check=FRACTION,
        resume=True)
    prune_layers: bool = setting(False, help="also search over whole layers", resume=True)
    protect_layers: List[int] = setting(
        [], help="comma-separated layers never pruned, e.g. 0,29", parse=_layer_list,
        check=rule(lambda v: min(v, default=0) >= 0, "must list layer numbers >= 0"),
        resume=True)
    compensate: str = setting(
        "sequential", choices=("none", "parallel", "sequential"),
        help="refit o_proj and down_proj on the kept heads and channels before export, by least "
             "squares on calibration activations: sequential takes each layer's inputs from the "
             "already pruned and refit layers before it, parallel from the dense model")
    compensate_select: str = setting(
        "obs", choices=("mask", "obs"),
        help="which MLP channels the compensated export keeps: the mask's, or as many per layer "
             "chosen by greedy structured OBS on that layer's down_proj input statistics")
    compensate_target: str = setting(
        "local", choices=("local", "dense"),
        help="what the sequential refit matches: local, the dense sublayer's output on the "
             "pruned model's own inputs; dense, the dense model's residual stream, so each "
             "refit also corrects the drift the earlier layers left (one more copy of the "
             "calibration hidden states)")
    compensate_inputs: bool = setting(
        False, help="with --compensate sequential: also refit each kept layer's q/k/v and "
                    "gate/up projections so that they read, from the pruned model's normed "
                    "inputs, what the dense model's would have been (one least-squares d x d map "
                    "per sublayer; carries the dense model's calibration stream)")
    compensate_bias: bool = setting(
        True, help="also fit a bias of o_proj and down_proj (the mean shift of the pruned "
                   "inputs; OBS then selects on the inputs' covariance); the export's config "
                   "records it and its modeling file adds it; --no-compensate-bias refits the "
                   "weights only")
    compensate_damping: float = setting(
        0.01, help="ridge damping of the refit, as a fraction of the mean diagonal of the kept "
                   "inputs' Gram matrix", check=rule(lambda v: v >= 0, "must be >= 0"))
    compensate_windows: int = setting(
        512, help="calibration windows the refit's statistics are taken on (the first of the "
                  "--nsamples pool; at most that many)",
        check=at_least(1))
    select_candidates: int = setting(
        1, check=at_least(1), resume=True,
        help="compensate the N hard masks with the lowest held-out losses seen (bare slices) and "
             "export the one whose compensated held-out loss is lowest; 1: the best bare mask. "
             "With compensation on, the init mask always competes too")
    search_loss: str = setting(
        "bare", choices=("bare", "refit"), resume=True,
        help="what scores each sampled mask: bare, the loss of its slice; refit, its loss after "
             "a least-squares refit of o_proj and down_proj to its own kept heads and channels "
             "(the dense model's input statistics on --search-refit-windows windows, with "
             "--compensate-damping), so the search ranks masks as compensation will leave them; "
             "costs one Cholesky solve per layer and mask in every step and all layers' input "
             "second moments in memory")
    search_refit_windows: int = setting(
        128, check=at_least(1), resume=True,
        help="with --search-loss refit: calibration windows of the input statistics (the first "
             "of the --nsamples pool)")
    optimizer: str = setting(
        "sgd", choices=("sgd", "adam"), resume=True,
        help="update of the keep-probabilities: sgd (the preconditioned REINFORCE step) or adam "
             "on that step (betas 0.5, 0.999, as the paper's code)")
    antithetic: bool = setting(
        False, resume=True,
        help="sample the K masks as K/2 antithetic pairs (u and 1 - u) and use the DisARM "
             "estimator, whose pairs are their own baseline (needs an even --k)")
    control_variate: bool = setting(
        False, resume=True,
        help="subtract a linear model of the loss in the mask (a ridge fit on the last "
             "--cv-history samples) and add its exact gradient: unbiased, lower variance")
    cv_history: int = setting(256, help="samples the control variate is fitted on",
                              check=at_least(2), resume=True)
    cv_ridge: float = setting(
        1.0, help="ridge of the control variate's fit, in units of the mean squared mask "
                  "deviation", check=rule(lambda v: v > 0, "must be > 0"), resume=True)
    baseline: str = setting("leave-one-out", choices=("leave-one-out", "moving-average"),
                            help="REINFORCE baseline", resume=True)
    ma_window: int = setting(5, help="past steps the moving-average baseline averages",
                             check=at_least(1))
    eval_every: int = setting(25, help="steps between held-out evaluations of the hard mask",
                              check=at_least(1))
    checkpoint_every: int = setting(25, help="steps between checkpoints", check=at_least(1))
    device: str = setting(
        factory=default_device, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)",
        probe=_device_problem, dry_probe=lambda v: _device_problem(v, present=False),
        cli_default=None, from_cli=lambda v: v or default_device())
    devices: List[str] = setting(
        [], parse=_name_list, probe=_devices_problem,
        dry_probe=lambda names: _devices_problem(names, present=False),
        help="several devices, comma-separated (cuda:0,cuda:1): contiguous decoder layers on "
             "each, balanced by parameters, for a model larger than one device; under torchrun "
             "the list is split evenly among the ranks. Takes the place of --device")
    dtype: str = setting("auto", choices=("auto", "float32", "float16", "bfloat16"),
                         help="weights and activations dtype; auto: float32 on the CPU, on a GPU "
                              "the checkpoint's float16/bfloat16, else bfloat16",
                         resume=True)
    backend: Optional[str] = setting(
        None, choices=("reference", "triton", "cuda"),
        help="kernel backend (default: $PROBPRUNE_BACKEND, else the best available)")
    seed: int = setting(0, help="seed of the calibration windows, batches and sampled masks",
                        check=rule(lambda v: 0 <= v < 2**63, "must lie in [0, 2**63)"),
                        resume=True)
    dist_timeout: float = setting(
        1800.0, check=rule(lambda v: v > 0, "must be > 0"),
        help="seconds a rank of a torchrun launch waits for the others before it stops with an "
             "error (rank 0 runs the init and the export alone)")
    dry_run: bool = setting(False, help="print the memory plan of the run and stop before "
                                        "loading any weight (the model's config.json is "
                                        "enough; the device need not be on this machine)")
    resume: bool = setting(False, help="continue the checkpoint in --out")
    progress: bool = setting(True, cli=False, help="show progress bars")
    stop_after: Optional[int] = setting(None, cli=False, check=at_least(1),
                                        help="end the process after this step (tests of resume)")


def add_prune_arguments(parser: argparse.ArgumentParser, defaults=None) -> None:
    PruneConfig.add_arguments(parser, defaults)


def _subset(name: str, doc: str, names: tuple, flags: Dict[str, str], own: tuple = ()):
    """A config class of some of :class:`PruneConfig`'s fields, with the same definitions (only
    the flags that ``flags`` renames differ), after its ``own`` fields ((name, type, setting)
    triples)."""
    chosen = list(own) + [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory,
                               metadata={**f.metadata, **({"flag": flags[f.name]}
                                                          if f.name in flags else {})}))
        for f in fields(PruneConfig) if f.name in names]
    cls = dataclasses.make_dataclass(name, chosen, bases=(_Settings,), namespace={"__doc__": doc},
                                     kw_only=True)
    cls.__module__ = __name__
    return cls


EvalConfig = _subset(
    "EvalConfig", "What ``probprune-fast eval`` needs: the model and evaluation fields of "
                  ":class:`PruneConfig`; the evaluation text is ``--data`` there.",
    ("model", "eval", "eval_file", "seqlen", "max_eval_windows", "window_stride",
     "eval_batch_size", "eval_tasks", "tasks_path", "task_limit", "device", "devices", "dtype"),
    {"eval": "--data", "eval_tasks": "--tasks"})


def add_eval_arguments(parser: argparse.ArgumentParser, defaults=None) -> None:
    EvalConfig.add_arguments(parser, defaults)


def _models_problem(names: List[str]) -> Problem:
    return next((p for p in map(_model_problem, names) if p), None)


SpeedConfig = _subset(
    "SpeedConfig", "What ``probprune-fast speed`` needs: the models to time side by side, the "
                   "batch, and the device and dtype fields of :class:`PruneConfig`.",
    ("device", "dtype"), {},
    own=(("models", List[str], setting(
            flag="--model", probe=_models_problem,
            help="a model to time (directory, hub name, pruned directory or the embedded "
                 "'smollm2-135m'); repeat it to compare models, e.g. the dense one first")),
         ("batch", int, setting(1, help="sequences in the prefill and decode batch",
                                check=at_least(1))),
         ("seqlen", int, setting(128, help="prompt tokens of each sequence (prefill length)",
                                 check=at_least(1))),
         ("new_tokens", int, setting(32, help="tokens each decode generates (greedy, exactly "
                                              "this many)", check=at_least(2))),
         ("repeats", int, setting(3, help="timed repeats after a warm-up; the median is shown",
                                  check=at_least(1))),
         ("rounds", int, setting(1, check=at_least(1),
                                 help="measure every model this many times, the models in turn "
                                      "(each in a fresh process), and show the medians: on a "
                                      "shared machine, background load then falls on all "
                                      "alike"))))


def _run_problem(path: str) -> Problem:
    """None when ``path`` is a prune run's directory: its manifest with the run's settings, and a
    readable scores file."""
    from .models import MANIFEST

    if not os.path.isdir(path):
        return f"{path!r} is not a directory (give the --out directory of a prune run)"
    manifest = os.path.join(path, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            settings = json.load(f).get("settings")
    except FileNotFoundError:
        return f"{path!r} is not a prune run's directory (no {MANIFEST})"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        return f"{manifest!r} cannot be read ({one_line(e)})"
    if not isinstance(settings, dict) or "model" not in settings:
        return f"{manifest!r} holds no run settings (a prune run writes them)"
    scores = os.path.join(path, "scores.safetensors")
    if not os.path.isfile(scores):
        return f"{path!r} holds no scores.safetensors (a prune run writes it)"
    problem = _scores_problem(scores)
    if problem:
        return problem
    problem = _model_problem(settings["model"])
    return f"{path!r}: the run's model {problem}" if problem else None


ExportConfig = _subset(
    "ExportConfig", "What ``probprune-fast export`` needs: a prune run's directory, the new budget, "
                    "and the compensation, device and evaluation fields of :class:`PruneConfig`.",
    ("sparsity", "compensate", "compensate_select", "compensate_target", "compensate_inputs",
     "compensate_bias", "compensate_damping",
     "compensate_windows", "eval_batch_size", "device", "progress"), {},
    own=(("run", str, setting(help="the --out directory of a prune run (its settings and "
                                   "scores.safetensors)", probe=_run_problem)),
         ("out", str, setting(help="directory of the re-exported model", probe=_out_problem)),
         ("allocation", str, setting(
             "scaled", choices=("scaled", "global"),
             help="how the new budget is shared: scaled keeps each layer's attention and MLP at "
                  "their share of the run's exported mask (scaled to the new budget, capped at "
                  "full size) and keeps the best-scored units inside each; global ranks the "
                  "scores under the run's own budget mode, which far from the run's sparsity "
                  "compares saturated scores across layers")),
         ("perplexity", bool, setting(False, help="also evaluate the export's perplexity by the "
                                                  "run's protocol (text, seqlen, windows, "
                                                  "stride)"))))


# ---------------------------------------------------------------------------------------------
# rules over several fields

@combination("baseline", "k")
def _leave_one_out_needs_two(c) -> Problem:
    if c.baseline == "leave-one-out" and c.k < 2:
        return (f"the leave-one-out baseline needs --k 2 or more (or use --baseline "
                f"moving-average), got --k {c.k}")
    return None


@combination("devices", probe=True)
def _devices_shared_evenly(c) -> Problem:
    size = local_world_size_from_env()
    if c.devices and len(c.devices) % size:
        return (f"--devices lists {len(c.devices)} devices, which the {size} processes of this "
                f"machine (LOCAL_WORLD_SIZE) cannot share evenly: list a multiple of {size}")
    return None


@combination("k", probe=True)
def _masks_shared_evenly(c) -> Problem:
    size = world_size_from_env()
    if c.k % size:
        return (f"--k {c.k} masks cannot be shared evenly by the {size} processes of this "
                f"launch (WORLD_SIZE): use a --k that is a multiple of {size}")
    return None


@combination("antithetic", "k")
def _antithetic_needs_pairs(c) -> Problem:
    if c.antithetic and c.k % 2:
        return f"--antithetic samples masks in pairs: --k must be even, got --k {c.k}"
    return None


@combination("control_variate", "cv_history", "k")
def _history_holds_a_step(c) -> Problem:
    if c.control_variate and c.cv_history < c.k:
        return (f"--cv-history must hold at least one step's --k samples, got --cv-history "
                f"{c.cv_history} with --k {c.k}")
    return None


@combination("search_loss", "compensate_damping")
def _refit_loss_needs_damping(c) -> Problem:
    if c.search_loss == "refit" and not c.compensate_damping > 0:
        return (f"--search-loss refit needs --compensate-damping > 0 (each step solves one "
                f"Cholesky system per layer and mask), got {c.compensate_damping}")
    return None


@combination("compensate", "compensate_inputs")
def _input_correction_needs_sequential(c) -> Problem:
    if c.compensate_inputs and c.compensate != "sequential":
        return (f"--compensate-inputs needs --compensate sequential, got --compensate "
                f"{c.compensate} (with parallel the inputs are the dense model's: nothing to "
                f"correct)")
    return None


@combination("compensate", "compensate_target")
def _dense_target_is_sequential(c) -> Problem:
    if c.compensate_target == "dense" and c.compensate != "sequential":
        return (f"--compensate-target dense needs --compensate sequential, got --compensate "
                f"{c.compensate} (with parallel the inputs are the dense model's, so the targets "
                f"are the local ones)")
    return None


@combination("prune_layers", "budget", "scope")
def _layers_need_one_budget(c) -> Problem:
    if c.prune_layers and (c.budget, c.scope) != ("global", "global"):
        return ("--prune-layers needs --budget global --scope global: a layer unit removes its "
                "heads and channels too, so it cannot share a per-type or per-layer budget")
    return None


@combination("budget", "attn_sparsity", "mlp_sparsity", "init_attn_sparsity")
def _ratios_match_the_budget(c) -> Problem:
    # Each of these is read under one budget mode only; under the other it would be ignored.
    if c.budget == "per-type":
        if c.init_attn_sparsity:
            return ("--init-attn-sparsity applies only with --budget global (with --budget "
                    "per-type the init removes --attn-sparsity of the attention)")
        return None
    for name in ("attn_sparsity", "mlp_sparsity"):
        if getattr(c, name) is not None:
            return (f"{c.flag(name)} applies only with --budget per-type (--budget global "
                    f"removes --sparsity across all units)")
    return None


@combination("eval", "eval_file")
def _data_file_is_wikitext2(c) -> Problem:
    if c.eval_file is not None and c.eval != "wikitext2":
        return (f"{c.flag('eval_file')} is the local copy of {c.flag('eval')} wikitext2; give "
                f"other evaluation text as {c.flag('eval')} PATH")
    return None


@combination("eval_tasks", "tasks_path", "task_limit")
def _task_options_need_tasks(c) -> Problem:
    for name in ("tasks_path", "task_limit"):
        if getattr(c, name) is not None and not c.eval_tasks:
            return f"{c.flag(name)} applies only with {c.flag('eval_tasks')} (the tasks to run)"
    return None


@combination("eval_tasks", "tasks_path", probe=True)
def _tasks_known(c) -> Problem:
    """Before any model is loaded: lm-eval is installed and knows every task."""
    if not c.eval_tasks:
        return None
    from .zero_shot import ZeroShotError, check_tasks

    try:
        check_tasks(c.eval_tasks, c.tasks_path)
    except ZeroShotError as e:
        return f"{c.flag('eval_tasks')}: {e}"
    return None


@combination("out", "model", probe=True)
def _out_is_not_the_model(c) -> Problem:
    if os.path.isdir(c.model) and os.path.realpath(c.out) == os.path.realpath(c.model):
        return "--out must not be the --model directory: the export would overwrite the model"
    return None


@combination("run", "out", probe=True)
def _out_is_not_the_run(c) -> Problem:
    if os.path.realpath(c.out) == os.path.realpath(c.run):
        return ("--out must not be the --run directory: the re-export would replace the run's "
                "own export")
    from .models import MANIFEST

    with open(os.path.join(c.run, MANIFEST), encoding="utf-8") as f:
        model = json.load(f)["settings"]["model"]
    if os.path.isdir(model) and os.path.realpath(c.out) == os.path.realpath(model):
        return "--out must not be the run's model directory: the export would overwrite the model"
    return None


def _data_message(flag: str, check, *args) -> Problem:
    try:
        check(*args)
    except DataError as e:
        return f"{flag}: {e}"
    return None


@combination("calib", probe=True)
def _calibration_readable(c) -> Problem:
    return _data_message(c.flag("calib"), check_calibration_source, c.calib)


@combination("eval", "eval_file", probe=True)
def _evaluation_readable(c) -> Problem:
    if c.eval_file:
        flag = c.flag("eval_file")
    elif c.eval == "wikitext2" and os.environ.get(WIKITEXT2_ENV):
        flag = f"${WIKITEXT2_ENV}"
    else:
        flag = c.flag("eval")
    return _data_message(flag, check_eval_source, c.eval, c.eval_file)


@combination("backend", "device", probe=True)
def _backend_usable(c) -> Problem:
    if c.backend is None:
        return None
    if c.backend == "cuda" and torch.device(c.device).type != "cuda":
        return f"--backend cuda runs on CUDA tensors only; it needs --device cuda, got {c.device!r}"
    import probprune_kernels as pk

    usable = pk.backends()
    if c.backend not in usable:
        hint = "; Triton on the CPU needs TRITON_INTERPRET=1" if c.backend == "triton" else ""
        return f"--backend {c.backend} cannot run here (usable: {', '.join(usable)}){hint}"
    return None
