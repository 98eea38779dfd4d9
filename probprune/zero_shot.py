"""Zero-shot scores through lm-evaluation-harness (the optional ``lmeval`` extra): any loaded causal
LM, a pruned export included, on lm-eval's tasks (``piqa``, ``hellaswag``, ...) or on task YAML
files of the user's own folder.

lm-eval is imported only when a task is asked for, so the rest of probprune runs without it. Each
task is evaluated by its own ``simple_evaluate`` call on one wrapped model: a task that cannot be
loaded (an unreachable dataset, a broken YAML) is named in the error, and every task is scored
exactly as it would be alone.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Optional, Sequence

INSTALL_HINT = "pip install 'probprune[lmeval]'"


class ZeroShotError(ValueError):
    """lm-eval is missing, a task is unknown, or a task cannot be loaded."""


def _lm_eval():
    if importlib.util.find_spec("lm_eval") is None:
        raise ZeroShotError(f"zero-shot tasks need lm-evaluation-harness, which is not "
                            f"installed: {INSTALL_HINT}")
    import lm_eval

    return lm_eval


@functools.lru_cache(maxsize=4)
def _task_manager(tasks_path: Optional[str]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_path)


def task_manager(tasks_path: Optional[str] = None):
    """lm-eval's index of tasks: the built-in ones and, with ``tasks_path``, the task YAML files
    under that folder. Indexing reads thousands of YAML files (seconds), so the validation of
    the names and the evaluation share one index per folder."""
    _lm_eval()
    return _task_manager(None if tasks_path is None else os.path.abspath(tasks_path))


def check_tasks(names: Sequence[str], tasks_path: Optional[str] = None) -> None:
    """Raises :class:`ZeroShotError` unless lm-eval is installed and every name is a task, group
    or tag of its index, or a task YAML file."""
    known = set(task_manager(tasks_path).all_tasks)
    unknown = [n for n in names if n not in known and not os.path.isfile(n)]
    if unknown:
        where = f" nor a task YAML under {tasks_path}" if tasks_path else ""
        raise ZeroShotError(f"{', '.join(map(repr, unknown))} is neither an lm-eval task, group "
                            f"or tag{where} (`lm-eval ls tasks` lists them)")


def zero_shot(model, tokenizer, tasks: Sequence[str], tasks_path: Optional[str] = None,
              batch_size: int = 8, limit: Optional[int] = None) -> dict:
    """Scores ``model`` (on its own device) on lm-eval ``tasks``: ``{"tasks": {task: {"metrics":
    {metric: {"value", "stderr"}}, "documents", "num_fewshot"}}, "limit", "lm_eval_version"}``;
    a group task (``mmlu``) adds its subtasks. ``limit``: the first N documents of each task."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    check_tasks(tasks, tasks_path)
    manager = task_manager(tasks_path)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warning about a pre-loaded model is meant for launchers
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)
    scores = {}
    for name in tasks:
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager,
                                          limit=limit, log_samples=False)
        except Exception as e:  # noqa: BLE001 - dataset, YAML and metric failures alike
            raise ZeroShotError(f"lm-eval task {name!r} cannot be loaded or run: "
                                f"{type(e).__name__}: {' '.join(str(e).split())}") from e
        scores.update(_task_scores(out))
    return {"tasks": scores, "limit": limit, "lm_eval_version": lm_eval.__version__}


def _task_scores(out: dict) -> dict:
    """lm-eval's ``results`` ("acc,none", "acc_stderr,none", ...) as metric -> value, stderr."""
    scores = {}
    for task, values in out["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            metrics[name] = {"value": value,
                             "stderr": stderr if isinstance(stderr, (int, float)) else None}
        samples = out.get("n-samples", {}).get(task, {})
        scores[task] = {"metrics": metrics, "documents": samples.get("effective"),
                        "num_fewshot": out.get("n-shot", {}).get(task)}
    return scores


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def table(result: dict) -> str:
    """One block per task: its metrics with value and standard error."""
    lines = []
    for task, score in result["tasks"].items():
        docs = "" if score["documents"] is None else f"{score['documents']} documents, "
        shots = "" if score["num_fewshot"] is None else f"{score['num_fewshot']}-shot"
        lines.append(f"{task} ({docs}{shots})" if docs or shots else task)
        lines.append(f"  {'metric':<24} {'value':>8} {'stderr':>8}")
        for name, m in score["metrics"].items():
            stderr = "n/a" if m["stderr"] is None else _number(m["stderr"])
            lines.append(f"  {name:<24} {_number(m['value']):>8} {stderr:>8}")
    return "\n".join(lines)
