"""The command line as a new user meets it: every bad invocation ends in exit code 2 and one line
that names the input and the rule, never a traceback; settings are refused before any model is
loaded; the few errors that need the model come after loading it, still in one line."""
import json
import re
import os

import pytest
import torch
from safetensors.torch import save_file

import probprune.models
import probprune.pipeline
from probprune.cli import build_parser, main
from probprune.config import ConfigError
from probprune.data import eval_text, tokenize_joined
from probprune.evaluate import perplexity
from probprune.models import load_model
from tests.tiny_models import CORPUS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    r = tmp_path_factory.mktemp("cli")
    (r / "text.txt").write_text("\n".join(CORPUS * 60) + "\n")
    (r / "empty.txt").write_text("")
    (r / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (r / "afile").write_text("a file")
    save_file({"mask": torch.ones(3)}, str(r / "noprobs.safetensors"))
    save_file({"probs": torch.full((2,), 0.5)}, str(r / "short.safetensors"))
    (r / "gpt2").mkdir()
    (r / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                        "architectures": ["GPT2LMHeadModel"]}))
    # keyed by the name without its extension, for "{name}" in the tables below
    return {p.name.split(".")[0]: str(p) for p in r.iterdir()} | {"dir": str(r)}


@pytest.fixture()
def text_file(files):
    return files["text"]


def prune_args(model, files, out, *extra):
    return ["prune", "--model", model, "--sparsity", "0.3", "--out", out, "--steps", "2",
            "--k", "2", "--batch-size", "2", "--seqlen", "24", "--calib", files["text"],
            "--nsamples", "8", "--val-windows", "2", "--eval", files["text"],
            "--max-windows", "4", "--eval-every", "1", "--device", "cpu", "--speed-tokens", "0",
            *extra]


def error_line(capsys) -> str:
    """The one error line on stderr (progress bars aside), checked to be the only one."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def no_loading(monkeypatch):
    """Fails the test if a model would be loaded or a run started."""
    def refuse(*a, **k):
        raise AssertionError("reached model loading")
    monkeypatch.setattr(probprune.models, "load_model", refuse)
    monkeypatch.setattr(probprune.pipeline, "prune", refuse)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

PRUNE_BAD = [
    # refused by argparse (its message, on one line)
    (["--lr", "abc"], "probprune-fast prune: error: argument --lr: invalid float value: 'abc'"),
    (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    (["--budget", "foo"], "argument --budget: invalid choice: 'foo'"),
    (["--protect-layers", "a,b"], "expected comma-separated layer numbers, got 'a,b'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    # refused by PruneConfig.validate
    (["--lr", "-1"], "probprune-fast: error: --lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr=-1e-3"], "--lr must be > 0, got -0.001"),
    (["--init-temperature=-inf"], "--init-temperature must be a finite number, got -inf"),
    (["--sparsity", "1"], "--sparsity must lie strictly between 0 and 1, got 1.0"),
    (["--k", "1"], "the leave-one-out baseline needs --k 2 or more"),
    (["--compensate-damping", "-0.5"], "--compensate-damping must be >= 0, got -0.5"),
    (["--compensate-windows", "0"], "--compensate-windows must be at least 1, got 0"),
    (["--window-stride", "0"], "--window-stride must be at least 1, got 0"),
    (["--antithetic", "--k", "3"], "--antithetic samples masks in pairs: --k must be even"),
    (["--cv-ridge", "-1"], "--cv-ridge must be > 0, got -1.0"),
    (["--seqlen", "1"], "--seqlen must be at least 2, got 1"),
    (["--protect-layers", "-1"], "--protect-layers must list layer numbers >= 0, got [-1]"),
    (["--attn-sparsity", "0.5"], "--attn-sparsity applies only with --budget per-type"),
    (["--prune-layers", "--scope", "layer"], "--prune-layers needs --budget global --scope global"),
    (["--device", "foo"], "--device 'foo' is not a device: use cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "--device 'cuda' needs a CUDA GPU", marks=NO_GPU),
    (["--backend", "cuda"], "--backend cuda runs on CUDA tensors only"),
    (["--out", "{afile}"], "--out '{afile}' is an existing file"),
    (["--init", "{dir}/missing.safetensors"],
     "--init must be one of wanda-sp, magnitude, constant"),
    (["--init", "{noprobs}"], "holds no 'probs' tensor"),
    (["--calib", "{empty}"], "--calib: data file '{empty}' is empty"),
    (["--calib", "nonsense"], "--calib: unknown calibration source 'nonsense'"),
    (["--eval", "{broken}"], "--eval: data file '{broken}' is not valid JSON"),
    (["--data-file", "{text}"], "--data-file is the local copy of --eval wikitext2"),
]


@pytest.mark.parametrize("extra,message", PRUNE_BAD)
def test_prune_bad_input_is_refused_before_loading(tiny_model_dirs, files, tmp_path, capsys,
                                                   no_loading, extra, message):
    extra = [e.format(**files) for e in extra]
    assert main(prune_args(tiny_model_dirs["llama"], files, str(tmp_path / "run"), *extra)) == 2
    assert message.format(**files) in error_line(capsys)


@pytest.mark.parametrize("model,message", [
    ("{gpt2}", "model type 'gpt2' (GPT2LMHeadModel) is not supported; supported architectures"),
    ("{dir}/missing", "--model '{dir}/missing' does not exist"),
    ("smollm2-13", "is neither a model directory, a hub name (org/name) nor an embedded model"),
])
def test_prune_bad_model_is_refused_before_loading(files, tmp_path, capsys, no_loading, model,
                                                   message):
    assert main(prune_args(model.format(**files), files, str(tmp_path / "run"))) == 2
    assert message.format(**files) in error_line(capsys)


def test_corrupt_weights_are_refused_before_loading(tiny_model_dirs, tmp_path, capsys, no_loading):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["eval", "--model", str(broken), "--data", "x.txt"]) == 2
    assert "model.safetensors' is not a readable safetensors file" in error_line(capsys)


@pytest.mark.parametrize("argv,message", [
    (["prune", "--model", "m"], "the following arguments are required: --sparsity, --out"),
    ([], "the following arguments are required: command"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    (["eval", "--model", "m", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["prune", "--model", "m", "--sparsity", "0.3", "--out", "o", "--lr", "-1e-3"],
     "argument --lr: expected one argument (a value that starts with '-' is written "
     "--flag=-value)"),
])
def test_usage_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    line = error_line(capsys)
    assert message in line and line.endswith("--help)")


@pytest.mark.parametrize("extra,message", [
    (["--data", "{dir}/nonexistent.txt"],
     "--data: data file '{dir}/nonexistent.txt' does not exist"),
    (["--data", "{empty}"], "--data: data file '{empty}' is empty"),
    (["--data", "{broken}"], "is not valid JSON"),
    (["--max-windows", "0"], "--max-windows must be at least 1, got 0"),
    (["--eval-batch-size", "-1"], "--eval-batch-size must be at least 1, got -1"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--data-file", "{text}"], "--data-file is the local copy of --data wikitext2"),
])
def test_eval_bad_input_is_refused_before_loading(tiny_model_dirs, files, capsys, no_loading,
                                                  extra, message):
    args = ["eval", "--model", tiny_model_dirs["llama"], "--data", files["text"]]
    assert main(args + [e.format(**files) for e in extra]) == 2
    assert message.format(**files) in error_line(capsys)


# -- errors that need the model: after loading it, still one line -------------------------------

def test_eval_window_longer_than_the_text(tiny_model_dirs, text_file, capsys):
    args = ["eval", "--model", tiny_model_dirs["llama"], "--data", text_file, "--seqlen", "100000"]
    assert main(args) == 2
    assert "fewer than one window of 100000" in error_line(capsys)


@pytest.mark.parametrize("extra,message", [
    (["--protect-layers", "7"], "protected layer 7 does not exist (model has 3 layers)"),
    (["--nsamples", "5000"], "5000 + 2 windows of 24 need"),
    (["--init", "{short}"], "has shape (2,); this model and unit setting need"),
])
def test_prune_errors_that_need_the_model(tiny_model_dirs, files, tmp_path, capsys, extra,
                                          message):
    extra = [e.format(**files) for e in extra]
    assert main(prune_args(tiny_model_dirs["llama"], files, str(tmp_path / "run"), *extra)) == 2
    assert message in error_line(capsys)


def test_prune_prints_its_summary_then_refuses_a_changed_resume(tiny_model_dirs, files,
                                                                 tmp_path, capsys):
    out = str(tmp_path / "run")
    timed = ("--speed-tokens", "3", "--speed-rounds", "2")
    assert main(prune_args(tiny_model_dirs["qwen2"], files, out, *timed)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if "prunable parameters (total" in line):]
    report = json.load(open(os.path.join(out, "report.json")))
    # The init mask can win the compensated held-out comparison; the summary then says so.
    init_won = next(c for c in report["selection"] if c["chosen"])["step"] == 0
    if init_won:
        assert lines.pop(2).startswith("exported the init mask: after compensation it beat")
    # the speed's doubts, one line each (a tiny model's timings vary): as report.json has them
    warnings = [f"warning: {w}" for w in report["speed"]["check"]["warnings"]]
    assert lines[4:-1] == warnings and len(lines) == 5 + len(warnings)
    assert lines[1].startswith(f"perplexity on {files['text']} (seqlen 24, 4 windows): dense")
    assert "-> init (wanda-sp)" in lines[1] and lines[2].startswith("median step")
    assert lines[3].startswith("speed (cpu, prefill of 1x24, 3 decode tokens, median of 2 "
                               "rounds, the models in turn): prefill ")
    assert lines[-1].startswith(f"wrote {out}: pruned model")
    assert report["settings"]["seqlen"] == 24 and report["settings"]["progress"] is True
    changed = prune_args(tiny_model_dirs["qwen2"], files, out, *timed, "--resume", "--lr", "0.02")
    assert main(changed) == 2
    line = error_line(capsys)
    assert "settings differ from the checkpoint's in lr (0.01 there, 0.02 now)" in line


def test_verbose_gives_the_traceback(tiny_model_dirs, files, tmp_path):
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        main(["-v"] + prune_args(tiny_model_dirs["llama"], files, str(tmp_path), "--lr", "-1"))


def test_interrupt_is_one_line(tiny_model_dirs, files, tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(probprune.pipeline, "prune", interrupted)
    assert main(prune_args(tiny_model_dirs["llama"], files, str(tmp_path / "run"))) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "probprune-fast: interrupted"


# -- eval output ---------------------------------------------------------------------------------

def test_eval_json_matches_library(tiny_model_dirs, text_file, capsys):
    assert main(["eval", "--model", tiny_model_dirs["qwen2"], "--data", text_file,
                 "--seqlen", "16", "--max-windows", "5", "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok = load_model(tiny_model_dirs["qwen2"])
    ids = tokenize_joined(tok, [eval_text(text_file).text])
    expected = perplexity(model, ids, seqlen=16, max_windows=5, progress=False)
    assert {"ppl", "nll", "tokens", "seqlen"} <= record.keys()
    assert record["seqlen"] == 16 and record["windows"] == 5 and record["tokens"] == 5 * 15
    assert record["ppl"] == pytest.approx(expected.ppl, rel=1e-6)


def test_eval_human_readable(tiny_model_dirs, text_file, capsys):
    assert main(["eval", "--model", tiny_model_dirs["llama"], "--data", text_file,
                 "--seqlen", "16", "--max-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_help_lists_every_flag(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--sparsity", "--eval", "--data-file", "--max-windows", "--init-windows",
                 "--ma-window", "--json", "--resume"):
        assert flag in out
    assert "bench" not in build_parser().format_help()


def test_help_puts_a_first_runs_flags_first_then_the_stages(capsys):
    """What a first run needs opens the help; the rest follows stage by stage, with defaults."""
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    titles = [line[:-1] for line in out.splitlines() if line and not line[0].isspace()
              and line.endswith(":")]
    assert titles == ["options", "required (a first run needs only these; every other flag has "
                      "a default)", "model and data", "budget", "search", "compensation",
                      "evaluation", "system"]
    required = out.split(titles[1] + ":")[1].split("model and data:")[0]
    assert re.findall(r"^  (--[a-z-]+)", required, re.M) == ["--model", "--sparsity", "--out"]
    budget = out.split("\nbudget:")[1].split("\nsearch:")[0]
    assert re.findall(r"^  (--[a-z-]+)", budget, re.M)[0] == "--shape"
    assert "(default: free)" in budget and "(default: 512)" in out.split("model and data:")[1]


def test_ordinals_in_the_summary():
    from probprune.cli import ordinal
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 16, 21, 22, 32, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "16th", "21st", "22nd", "32nd",
        "101st", "111th"]
