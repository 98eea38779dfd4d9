"""One default per setting: every flag of ``probprune-fast prune`` is either read by a library
function or class whose default for it is the flag's, or named here as the command line's own
(where the run goes, what it reads). A library caller gets the method the command-line user gets;
a new flag fails this test until it is placed in one list or the other."""
import inspect
from dataclasses import MISSING, fields

import pytest

from probprune.compensate import compensate
from probprune.config import PruneConfig
from probprune.evaluate import masked_perplexity, model_nll, perplexity
from probprune.forward import MaskedCausalLM
from probprune.importance import initial_probs
from probprune.models import load_model
from probprune.policy import PolicyConfig
from probprune.search import Search
from probprune.speed import measure_fresh

# flag (PruneConfig field) -> the library parameters that take it: (callable, parameter name)
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
    "compensate": [(compensate, "mode")],
    "compensate_damping": [(compensate, "damping"), (MaskedCausalLM.use_refits, "damping")],
    "compensate_bias": [(compensate, "bias")],
    "compensate_select": [(compensate, "select")],
    "compensate_target": [(compensate, "target")],
    "compensate_inputs": [(compensate, "correct_inputs")],
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
}
# flags with no library default to match: the run's inputs and outputs, the run's own loop and
# system settings (the library takes these as required arguments, or they only exist for a run)
CLI_ONLY = {"model", "sparsity", "out", "k", "batch_size", "calib", "nsamples", "val_windows",
            "select_windows", "eval", "eval_file", "eval_tasks", "tasks_path", "task_limit",
            "speed_tokens", "init", "init_windows", "channel_block", "budget", "scope",
            "attn_sparsity", "mlp_sparsity", "protect_layers", "compensate_windows",
            "search_loss", "search_refit_windows", "eval_every", "checkpoint_every", "device",
            "devices", "seed", "dist_timeout", "dry_run", "resume", "progress", "stop_after"}


def _cli_default(name):
    f = next(f for f in fields(PruneConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _library_default(fn, param):
    if isinstance(fn, type) and hasattr(fn, "__dataclass_fields__"):
        f = fn.__dataclass_fields__[param]
        return f.default_factory() if f.default_factory is not MISSING else f.default
    return inspect.signature(fn).parameters[param].default


def test_every_flag_is_placed():
    names = {f.name for f in fields(PruneConfig)}
    assert not set(LIBRARY) & CLI_ONLY
    assert names == set(LIBRARY) | CLI_ONLY, (names ^ (set(LIBRARY) | CLI_ONLY))


@pytest.mark.parametrize("flag", sorted(LIBRARY))
def test_the_library_default_is_the_flags(flag):
    want = _cli_default(flag)
    for fn, param in LIBRARY[flag]:
        got = _library_default(fn, param)
        assert got == want, (f"{PruneConfig.flag(flag)} defaults to {want!r}, "
                             f"{fn.__qualname__}({param}=...) to {got!r}")


def test_a_config_made_in_python_takes_the_machines_device():
    from probprune.config import default_device
    assert PruneConfig(model="m", sparsity=0.5, out="o").device == default_device()
