"""The settings of each command, composed of the stages' settings (:mod:`probprune.settings`).

:class:`PruneConfig` is every stage's settings at once, so it goes wherever one stage's settings
are expected (``compensate(..., cfg)``). ``eval``, ``speed`` and ``export`` take some of the same
definitions (:class:`EvalConfig`, :class:`SpeedConfig`, :class:`ExportConfig`). From the fields,
:mod:`probprune.flags` makes the command line and reads ``--config`` files, and
:mod:`probprune.preflight` checks a config before any model is loaded.
"""
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Dict, List

from .settings import (STAGES, BudgetSettings, CompensationSettings, ConfigError, DataSettings,
                       EvalSettings, RunSettings, SearchSettings, Settings, default_device,
                       one_line, setting)
from .settings.base import at_least

__all__ = ["ConfigError", "EvalConfig", "ExportConfig", "PruneConfig", "STAGES", "SpeedConfig",
           "default_device", "one_line"]


@dataclass(kw_only=True)
class PruneConfig(RunSettings, EvalSettings, CompensationSettings, SearchSettings, BudgetSettings,
                  DataSettings):
    """A pruning run (its fields in the order of the stages: model and data first, system
    last). ``probprune-fast prune`` builds it from its flags; :meth:`validate` checks it."""


def _subset(name: str, doc: str, names: tuple, flags: Dict[str, str], own: tuple = ()):
    """A config class of some of :class:`PruneConfig`'s fields, with the same definitions (only
    the flags that ``flags`` renames differ), after its ``own`` fields ((name, type, setting)
    triples)."""
    chosen = list(own) + [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory,
                               metadata={**f.metadata, **({"flag": flags[f.name]}
                                                          if f.name in flags else {})}))
        for f in fields(PruneConfig) if f.name in names]
    cls = dataclasses.make_dataclass(name, chosen, bases=(Settings,), namespace={"__doc__": doc},
                                     kw_only=True)
    cls.__module__ = __name__
    return cls


EvalConfig = _subset(
    "EvalConfig", "What ``probprune-fast eval`` needs: the model and evaluation fields of "
                  ":class:`PruneConfig`; the evaluation text is ``--data`` there.",
    ("model", "eval", "eval_file", "seqlen", "max_eval_windows", "window_stride",
     "eval_batch_size", "eval_tasks", "tasks_path", "task_limit", "device", "devices", "dtype"),
    {"eval": "--data", "eval_tasks": "--tasks"})

SpeedConfig = _subset(
    "SpeedConfig", "What ``probprune-fast speed`` needs: the models to time side by side, the "
                   "batch, and the device and dtype fields of :class:`PruneConfig`.",
    ("device", "dtype", "speed_rounds"), {"speed_rounds": "--rounds"},
    own=(("models", List[str], setting(
            flag="--model",
            help="a model to time (directory, hub name, pruned directory or the embedded "
                 "'smollm2-135m'); repeat it to compare models, e.g. the dense one first")),
         ("batch", int, setting(1, help="sequences in the prefill and decode batch",
                                check=at_least(1))),
         ("seqlen", int, setting(128, help="prompt tokens of each sequence (prefill length)",
                                 check=at_least(1))),
         ("new_tokens", int, setting(32, help="tokens each decode generates (greedy, exactly "
                                              "this many)", check=at_least(2))),
         ("repeats", int, setting(3, help="timed repeats after a warm-up; the median is shown",
                                  check=at_least(1)))))

ExportConfig = _subset(
    "ExportConfig", "What ``probprune-fast export`` needs: a prune run's directory, the new budget, "
                    "and the compensation, device and evaluation fields of :class:`PruneConfig`.",
    ("sparsity", "compensate", "compensate_select", "compensate_target", "compensate_inputs",
     "compensate_bias", "compensate_damping",
     "compensate_windows", "eval_batch_size", "device", "progress"), {},
    own=(("run", str, setting(help="the --out directory of a prune run (its settings and "
                                   "scores.safetensors)")),
         ("out", str, setting(help="directory of the re-exported model")),
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
