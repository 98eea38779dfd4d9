"""One default per setting: every flag of ``probprune-fast prune``, ``eval``, ``export`` and
``speed`` defaults to its settings field (the command's config and the stage's settings class
alike), and every library function or class that takes the setting defaults to it too, either
as a keyword or through the stage's settings object it takes. The flags of ``prune`` not read by
a library default are named here as the command line's own (where the run goes, what it reads).
A library caller gets the method the command-line user gets; a new flag fails this test until it
is placed in one list or the other."""
import argparse
import inspect
from dataclasses import MISSING, fields

import pytest

from probprune.cli import SETTINGS, build_parser
from probprune.budget import Budget
from probprune.compensate import compensate
from probprune.config import STAGES, PruneConfig
from probprune.evaluate import masked_perplexity, model_nll, perplexity
from probprune.forward import MaskedCausalLM
from probprune.importance import initial_probs
from probprune.models import load_model
from probprune.policy import PolicyConfig
from probprune.search import Search
from probprune.settings import CompensationSettings, SearchSettings
from probprune.speed import measure_fresh, measure_in_turn

# prune flag (PruneConfig field) -> the library parameters that take it: (callable, parameter);
# "settings.compensate" is the field of the settings object a parameter defaults to
LIBRARY = {
    "steps": [(PolicyConfig, "steps")],
    "lr": [(PolicyConfig, "lr")],
    "min_lr_ratio": [(PolicyConfig, "min_lr_ratio")],
    "baseline": [(PolicyConfig, "baseline")],
    "ma_window": [(PolicyConfig, "ma_window")],
    "optimizer": [(PolicyConfig, "optimizer")],
    "antithetic": [(PolicyConfig, "antithetic")],
    "control_variate": [(PolicyConfig, "control_variate")],
    "cv_history": [(PolicyConfig, "cv_history")],
    "cv_ridge": [(PolicyConfig, "cv_ridge")],
    "compensate": [(compensate, "settings.compensate")],
    "compensate_damping": [(compensate, "settings.compensate_damping"),
                           (MaskedCausalLM.use_refits, "damping")],
    "compensate_bias": [(compensate, "settings.compensate_bias")],
    "compensate_select": [(compensate, "settings.compensate_select")],
    "compensate_target": [(compensate, "settings.compensate_target")],
    "compensate_inputs": [(compensate, "settings.compensate_inputs")],
    "eval_batch_size": [(compensate, "batch_size"), (initial_probs, "batch_size"),
                        (perplexity, "batch_size"), (masked_perplexity, "batch_size"),
                        (model_nll, "batch_size")],
    "init_temperature": [(initial_probs, "temperature")],
    "init_attn_sparsity": [(initial_probs, "attn_sparsity")],
    "seqlen": [(perplexity, "seqlen"), (masked_perplexity, "seqlen")],
    "window_stride": [(perplexity, "stride"), (masked_perplexity, "stride")],
    "max_eval_windows": [(perplexity, "max_windows"), (masked_perplexity, "max_windows")],
    "attn_units": [(MaskedCausalLM, "attn_units")],
    "prune_layers": [(MaskedCausalLM, "include_layers")],
    "backend": [(MaskedCausalLM, "backend"), (Search, "backend")],
    "select_candidates": [(Search, "candidates")],
    "dtype": [(load_model, "dtype"), (measure_fresh, "dtype")],
    "shape": [(Budget.build, "shape")],
    "speed_rounds": [(measure_in_turn, "rounds")],
}
# flags with no library default to match: the run's inputs and outputs, the run's own loop and
# system settings (the library takes these as required arguments, or they only exist for a run)
CLI_ONLY = {"model", "sparsity", "out", "k", "batch_size", "calib", "nsamples", "val_windows",
            "select_windows", "eval", "eval_file", "eval_tasks", "tasks_path", "task_limit",
            "speed_tokens", "init", "init_windows", "channel_block", "budget", "scope",
            "attn_sparsity", "mlp_sparsity", "protect_layers", "compensate_windows",
            "search_loss", "search_refit_windows", "eval_every", "checkpoint_every", "device",
            "devices", "seed", "dist_timeout", "dry_run", "resume", "progress", "stop_after"}
# the stage functions that take a stage's whole settings object: (callable, parameter, class)
TAKE_SETTINGS = [(compensate, "settings", CompensationSettings)]


def _field_default(cls, name):
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def cli_defaults(command: str) -> dict:
    """{field: the value a run gets when its flag is not given} of every flag of ``command``
    (MISSING: a required flag)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cls = SETTINGS[command]
    out = {}
    for action in sub.choices[command]._actions:
        if action.dest in ("help", "config", "json"):
            continue
        convert = cls.__dataclass_fields__[action.dest].metadata["from_cli"]
        out[action.dest] = (MISSING if action.required else
                            convert(action.default) if convert else action.default)
    return out


PRUNE_FLAGS = cli_defaults("prune")


def _library_default(fn, param):
    param, _, attr = param.partition(".")
    if isinstance(fn, type) and hasattr(fn, "__dataclass_fields__"):
        value = _field_default(fn, param)
    else:
        value = inspect.signature(fn).parameters[param].default
    return getattr(value, attr) if attr else value


def test_every_flag_is_placed():
    names = {f.name for f in fields(PruneConfig)}
    assert not set(LIBRARY) & CLI_ONLY
    assert names == set(LIBRARY) | CLI_ONLY, (names ^ (set(LIBRARY) | CLI_ONLY))
    assert set(PRUNE_FLAGS) == names - {"progress", "stop_after"}  # the two without a flag


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_every_flag_defaults_to_its_settings_field(command):
    """The flag's default is the command's config field's, and that of the stage's settings
    class that defines the field (eval's --seqlen is DataSettings.seqlen)."""
    cls = SETTINGS[command]
    for name, want in cli_defaults(command).items():
        flag = cls.flag(name)
        assert _field_default(cls, name) == want, f"{command} {flag}"
        group = cls.__dataclass_fields__[name].metadata["group"]
        stage = next((s for s in STAGES if s.title == group), None)
        if stage is not None:
            assert _field_default(stage, name) == want, f"{command} {flag} ({stage.__name__})"


@pytest.mark.parametrize("flag", sorted(LIBRARY))
def test_the_library_default_is_the_flags(flag):
    want = PRUNE_FLAGS[flag]
    for fn, param in LIBRARY[flag]:
        got = _library_default(fn, param)
        assert got == want, (f"{PruneConfig.flag(flag)} defaults to {want!r}, "
                             f"{fn.__qualname__}({param}=...) to {got!r}")


@pytest.mark.parametrize("fn,param,cls", TAKE_SETTINGS)
def test_a_stage_function_defaults_to_the_stages_settings(fn, param, cls):
    default = inspect.signature(fn).parameters[param].default
    assert isinstance(default, cls)
    for f in fields(cls):
        assert getattr(default, f.name) == PRUNE_FLAGS[f.name], f"{fn.__qualname__} {f.name}"


def test_the_policy_takes_the_search_settings():
    """PolicyConfig is SearchSettings with the update's own constants: a run's config gives it
    every search setting, and its defaults are the flags'."""
    assert issubclass(PolicyConfig, SearchSettings)
    cfg = PruneConfig(model="m", sparsity=0.5, out="o", lr=0.5, steps=7, optimizer="adam")
    policy = PolicyConfig.taken_from(cfg)
    assert (policy.lr, policy.steps, policy.optimizer) == (0.5, 7, "adam")
    assert policy.eps == PolicyConfig().eps


def test_a_config_made_in_python_takes_the_machines_device():
    from probprune.config import default_device
    assert PruneConfig(model="m", sparsity=0.5, out="o").device == default_device()
