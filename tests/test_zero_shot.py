"""Zero-shot scores through lm-evaluation-harness, offline: a multiple-choice task this file
defines (a YAML over a local JSON file), scored against the model's own log-likelihoods."""
import json
import math
import statistics

import pytest
import torch

from probprune.cli import main
from probprune.config import ConfigError, EvalConfig, PruneConfig
from probprune.preflight import check
from probprune.export import export_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from tests.test_forward import _masks

TASK = "probprune_tiny_choice"
BROKEN = "probprune_tiny_broken"  # its data file does not exist
CHOICES = [["the lazy dog", "a free online encyclopedia", "heads"],
           ["channels and layers", "the quick brown fox jumps", "volunteers"],
           ["perplexity", "language model after training", "the mean"]]
MISSES = (1, 4, 8)  # documents whose label is not the model's own choice


def _task_yaml(name, data_file, cache_dir):
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache_dir}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@torch.no_grad()
def _loglikelihood(model, tok, context, continuation):
    """log p(continuation | context): the continuation's tokens are those the joined text adds
    after the context's."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _oracle(model, tok, docs):
    """(acc, acc_norm) per document: the choice of highest log-likelihood, and of highest
    log-likelihood per character, against the label."""
    acc, acc_norm = [], []
    for doc in docs:
        context = f"Question: {doc['goal']}\nAnswer:"
        ll = [_loglikelihood(model, tok, context, " " + c) for c in doc["choices"]]
        norm = [v / len(c) for v, c in zip(ll, doc["choices"])]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == doc["label"]))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["label"]))
    return acc, acc_norm


def _stderr(xs):  # lm-eval's standard error of a mean: the sample deviation over sqrt(n)
    return statistics.stdev(xs) / math.sqrt(len(xs))


@pytest.fixture(scope="module")
def pruned_task(tiny_model_dirs, tmp_path_factory):
    """A pruned tiny Qwen3 directory, and a task folder whose labels are set from the pruned
    model's own preferences: all but MISSES right, so the accuracy must come out 0.7 exactly."""
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("zero_shot")
    model, tok = load_model(tiny_model_dirs["qwen3"])
    units = MaskedCausalLM(model, include_layers=True).units
    out = export_pruned(model, tok, units, _masks(units, 3, seed=1)[1], str(root / "pruned"))
    pruned, ptok = load_pruned(out, with_tokenizer=True)
    docs = [{"goal": f"what is {i}?", "choices": CHOICES[i % 3], "label": 0} for i in range(10)]
    for i, doc in enumerate(docs):
        context = f"Question: {doc['goal']}\nAnswer:"
        ll = [_loglikelihood(pruned, ptok, context, " " + c) for c in doc["choices"]]
        best = max(range(3), key=ll.__getitem__)
        doc["label"] = (best + 1) % 3 if i in MISSES else best
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cache = root / "datasets_cache"
    (tasks / f"{TASK}.yaml").write_text(_task_yaml(TASK, data, cache))
    (tasks / f"{BROKEN}.yaml").write_text(_task_yaml(BROKEN, tasks / "missing.jsonl", cache))
    return {"model": out, "tasks": str(tasks), "docs": docs, "pruned": pruned, "tok": ptok}


def test_lm_eval_scores_a_pruned_model_by_its_own_loglikelihoods(pruned_task, capsys):
    assert main(["eval", "--model", pruned_task["model"], "--tasks", TASK,
                 "--tasks-path", pruned_task["tasks"], "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    score = record["zero_shot"]["tasks"][TASK]
    acc, acc_norm = _oracle(pruned_task["pruned"], pruned_task["tok"], pruned_task["docs"])
    assert sum(acc) == 10 - len(MISSES) and score["documents"] == 10 and score["num_fewshot"] == 0
    metrics = score["metrics"]
    assert metrics["acc"]["value"] == pytest.approx(0.7, abs=1e-12)
    assert metrics["acc"]["stderr"] == pytest.approx(_stderr(acc), rel=1e-9)
    assert metrics["acc_norm"]["value"] == pytest.approx(statistics.mean(acc_norm), abs=1e-12)
    assert metrics["acc_norm"]["stderr"] == pytest.approx(_stderr(acc_norm), rel=1e-9)


def test_eval_prints_a_table_per_task_and_limit_cuts_documents(pruned_task, capsys):
    assert main(["eval", "--model", pruned_task["model"], "--tasks", TASK,
                 "--tasks-path", pruned_task["tasks"], "--task-limit", "4",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    print(printed)  # shown with pytest -s: the table a user sees
    acc, acc_norm = _oracle(pruned_task["pruned"], pruned_task["tok"], pruned_task["docs"][:4])
    lines = printed.splitlines()
    header = lines.index(f"{TASK} (4 documents, 0-shot)")
    assert lines[header + 1].split() == ["metric", "value", "stderr"]
    assert lines[header + 2].split() == ["acc", f"{statistics.mean(acc):.4f}",
                                         f"{_stderr(acc):.4f}"]
    assert lines[header + 3].split()[:2] == ["acc_norm", f"{statistics.mean(acc_norm):.4f}"]


def test_prune_puts_the_exports_scores_in_the_report(tiny_model_dirs, calib_file, pruned_task,
                                                     tmp_path):
    from probprune.pipeline import prune

    out = tmp_path / "run"
    cfg = PruneConfig(model=tiny_model_dirs["qwen3"], sparsity=0.3, out=str(out), steps=2, k=2,
                      batch_size=2, seqlen=24, calib=calib_file, nsamples=8, val_windows=2,
                      eval=calib_file, max_eval_windows=2, eval_every=1, progress=False,
                      compensate="none", eval_tasks=[TASK], tasks_path=pruned_task["tasks"],
                      speed_tokens=0,
                      task_limit=5)
    report = prune(cfg)
    assert json.load(open(out / "report.json"))["zero_shot"] == report["zero_shot"]
    score = report["zero_shot"]["tasks"][TASK]
    acc, _ = _oracle(load_pruned(str(out)), pruned_task["tok"], pruned_task["docs"][:5])
    assert score["documents"] == 5
    assert score["metrics"]["acc"]["value"] == pytest.approx(statistics.mean(acc), abs=1e-12)


def test_a_task_that_cannot_be_loaded_is_named(pruned_task, capsys):
    from probprune.pipeline import zero_shot_of_export

    assert main(["eval", "--model", pruned_task["model"], "--tasks", f"{TASK},{BROKEN}",
                 "--tasks-path", pruned_task["tasks"], "--device", "cpu"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after lm-eval's progress bars
    assert last.startswith(f"probprune-fast: error: lm-eval task '{BROKEN}' cannot be loaded or "
                           f"run: FileNotFoundError: ")
    # A prune run keeps its report: the error stands in for the scores.
    cfg = PruneConfig(model=pruned_task["model"], sparsity=0.3, out="unused", eval_tasks=[BROKEN],
                      tasks_path=pruned_task["tasks"])
    result = zero_shot_of_export(cfg, pruned_task["pruned"], pruned_task["tok"])
    assert f"lm-eval task '{BROKEN}' cannot be loaded or run" in result["error"]


def test_unknown_task_is_named(pruned_task, capsys):
    assert main(["eval", "--model", pruned_task["model"], "--tasks", f"{TASK},no_such_task",
                 "--tasks-path", pruned_task["tasks"]]) == 2
    assert capsys.readouterr().err.strip() == (
        "probprune-fast: error: --tasks: 'no_such_task' is neither an lm-eval task, group or tag "
        f"nor a task YAML under {pruned_task['tasks']} (`lm-eval ls tasks` lists them)")


def test_missing_lm_eval_names_the_extra(tiny_model_dirs, monkeypatch):
    import importlib.util

    from probprune import zero_shot

    real = importlib.util.find_spec
    monkeypatch.setattr(zero_shot.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    cfg = EvalConfig(model=tiny_model_dirs["llama"], eval_tasks=["piqa"])
    with pytest.raises(ConfigError, match=r"^--tasks: zero-shot tasks need lm-evaluation-harness, "
                                          r"which is not installed: pip install "
                                          r"'probprune\[lmeval\]'$"):
        check(cfg)


@pytest.mark.parametrize("flags,message", [
    (["--tasks-path", "."], "--tasks-path applies only with --tasks (the tasks to run)"),
    (["--task-limit", "3"], "--task-limit applies only with --tasks (the tasks to run)"),
    (["--tasks", "piqa", "--task-limit", "0"], "--task-limit must be at least 1, got 0"),
    (["--tasks", "piqa,piqa"], "--tasks must name each task once, got ['piqa', 'piqa']"),
    (["--tasks", "piqa", "--tasks-path", "/no/such/dir"],
     "--tasks-path '/no/such/dir' is not a directory"),
])
def test_task_flags_are_checked(tiny_model_dirs, capsys, flags, message):
    assert main(["eval", "--model", tiny_model_dirs["llama"], *flags]) == 2
    assert capsys.readouterr().err.strip() == f"probprune-fast: error: {message}"


def test_prune_names_its_flag(tiny_model_dirs, tmp_path):
    cfg = PruneConfig(model=tiny_model_dirs["llama"], sparsity=0.3, out=str(tmp_path),
                      task_limit=2)
    with pytest.raises(ConfigError, match="^--task-limit applies only with --eval-tasks"):
        check(cfg)
