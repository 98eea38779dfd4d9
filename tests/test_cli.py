import json

import pytest

from probprune.cli import main
from probprune.data import tokenize_joined
from probprune.evaluate import perplexity
from probprune.models import load_model
from tests.tiny_models import CORPUS


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n".join(CORPUS * 6) + "\n")
    return str(path)


def test_eval_json_matches_library(tiny_model_dirs, text_file, capsys):
    assert main(["eval", "--model", tiny_model_dirs["qwen2"], "--data", text_file,
                 "--seqlen", "16", "--max-windows", "5", "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok = load_model(tiny_model_dirs["qwen2"])
    from probprune.data import eval_text
    ids = tokenize_joined(tok, [eval_text(text_file).text])
    expected = perplexity(model, ids, seqlen=16, max_windows=5, progress=False)
    assert {"ppl", "nll", "tokens", "seqlen"} <= record.keys()
    assert record["seqlen"] == 16 and record["windows"] == 5 and record["tokens"] == 5 * 15
    assert record["ppl"] == pytest.approx(expected.ppl, rel=1e-6)


def test_eval_human_readable(tiny_model_dirs, text_file, capsys):
    assert main(["eval", "--model", tiny_model_dirs["llama"], "--data", text_file,
                 "--seqlen", "16", "--max-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/file.txt"], "does not exist"),
    (["--seqlen", "100000"], "fewer than one window of 100000"),
])
def test_eval_errors_are_one_clear_line(tiny_model_dirs, text_file, capsys, argv, message):
    args = ["eval", "--model", tiny_model_dirs["llama"], "--data", text_file] + argv
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
