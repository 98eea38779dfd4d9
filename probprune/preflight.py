"""Preflight: every check of a config before any model is loaded, run once per run.

Whatever can be known without the model fails here, in one line that names the flag and the
rule: each field's type, finiteness, choices and rule (:mod:`probprune.settings`), the rules
over several fields, and then the probes, which read files (model directories, scores files,
data) or ask the machine (devices, kernel backends, the torchrun launch). Cheap checks run
first. The command line runs :func:`check` and hands the config on as checked;
:func:`probprune.pipeline.prune` runs it for any other caller.
"""
import glob
import json
import os
import re
import types
from dataclasses import dataclass, fields
from typing import Any, Callable, List

import torch

from .data import WIKITEXT2_ENV, DataError, check_calibration_source, check_eval_source
from .distributed import local_world_size_from_env, world_size_from_env
from .flags import type_problem
from .models import EMBEDDED, MANIFEST, UnsupportedModelError, check_supported
from .settings import INIT_METHODS, ConfigError, Problem, one_line

# ---------------------------------------------------------------------------------------------
# probes: the checks of one field that read files or ask the machine

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


def _models_problem(names: List[str]) -> Problem:
    return next((p for p in map(_model_problem, names) if p), None)


def _run_problem(path: str) -> Problem:
    """None when ``path`` is a prune run's directory: its manifest with the run's settings, and a
    readable scores file."""
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


# field name -> probe(value, dry): ``dry`` for a --dry-run, which plans from config.json alone
# and needs no device on this machine
PROBES = {
    "model": lambda name, dry: _model_problem(name, files=not dry),
    "models": lambda names, dry: _models_problem(names),
    "out": lambda path, dry: _out_problem(path),
    "run": lambda path, dry: _run_problem(path),
    "init": lambda value, dry: _init_problem(value),
    "device": lambda value, dry: _device_problem(value, present=not dry),
    "devices": lambda names, dry: _devices_problem(names, present=not dry),
    "tasks_path": lambda path, dry: None if os.path.isdir(path) else f"{path!r} is not a directory",
}


# ---------------------------------------------------------------------------------------------
# rules over several fields

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


PASSED = "_preflight_passed"  # the attribute that records a passed check on a config


def check(config, skip: tuple = ()) -> None:
    """Raises :class:`ConfigError` for the first setting of ``config`` that cannot work; the
    fields named in ``skip`` are not probed (a model already in memory is not looked for on
    disk). A config that passed, unchanged since, passes at once: the probes read files and ask
    the machine, so the command line's check is not repeated by the run it starts."""
    passed = getattr(config, PASSED, None)
    if passed is not None and passed[0] <= set(skip) and passed[1] == config.as_dict():
        return
    _check(config, skip)
    # not a field: a copy (dataclasses.replace) or a changed config is checked anew
    setattr(config, PASSED, (frozenset(skip), config.as_dict()))


def _check(config, skip: tuple) -> None:
    mine = {f.name for f in fields(config)}
    combos = [c for c in COMBINATIONS if set(c.names) <= mine]
    for f in fields(config):
        _raise(config, f.name, _field_problem(config, f))
    for c in combos:
        if not c.probe:
            _raise(config, None, c.check(config))
    dry = getattr(config, "dry_run", False)
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in PROBES and value is not None and f.name not in skip:
            _raise(config, f.name, PROBES[f.name](value, dry))
    for c in combos:
        if c.probe:
            _raise(config, None, c.check(config))


def _field_problem(config, f) -> Problem:
    value = getattr(config, f.name)
    problem = type_problem(value, f.type)
    if problem or value is None:
        return problem
    choices = f.metadata["choices"]
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}, got {value!r}"
    return f.metadata["check"](value) if f.metadata["check"] else None


def _raise(config, name, problem: Problem) -> None:
    if problem:
        raise ConfigError(problem if name is None else f"{config.flag(name)} {problem}")


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


@combination("shape", "budget", "scope", "prune_layers", "protect_layers", "attn_units",
             "mlp_sparsity", "init_attn_sparsity")
def _uniform_shape_is_its_own_allocation(c) -> Problem:
    if c.shape != "uniform":
        return None
    for name, free in (("budget", "global"), ("scope", "global"), ("attn_units", "kv-group")):
        if getattr(c, name) != free:
            return (f"--shape uniform needs {c.flag(name)} {free}: every layer keeps the same "
                    f"number of whole KV groups and MLP channels")
    for name in ("prune_layers", "protect_layers", "mlp_sparsity", "init_attn_sparsity"):
        if getattr(c, name):
            return (f"{c.flag(name)} does not apply with --shape uniform: every layer keeps the "
                    f"same number of KV groups (--attn-sparsity) and MLP channels (the rest of "
                    f"--sparsity)")
    return None


@combination("shape", "compensate", "compensate_bias")
def _uniform_shape_has_no_bias(c) -> Problem:
    if c.shape == "uniform" and c.compensate != "none" and c.compensate_bias:
        return ("--compensate-bias gives o_proj and down_proj a bias that the plain architecture "
                "of a --shape uniform export has no place for; leave it unset")
    return None


@combination("budget", "attn_sparsity", "mlp_sparsity", "init_attn_sparsity", "shape")
def _ratios_match_the_budget(c) -> Problem:
    # Each of these is read under one budget mode only; under the other it would be ignored.
    if c.shape == "uniform":  # its own rule above
        return None
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
