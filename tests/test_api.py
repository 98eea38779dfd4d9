"""``probprune.prune`` from Python: on a model already in memory it finds the mask the command
line finds with the same settings and seed, leaves the model as it was, and saves the directory
the command line writes."""
import os

import pytest
import torch
from safetensors.torch import load_file

import probprune
from probprune.cli import main
from probprune.models import load_model

# keywords as the flags read, with underscores (--max-windows: max_windows)
SETTINGS = dict(sparsity=0.3, steps=4, k=3, batch_size=2, seqlen=24, nsamples=12,
                val_windows=3, select_windows=3, max_windows=6, eval_every=2, seed=3,
                compensate_windows=6, speed_tokens=0)


def _flags(settings):
    return [arg for key, value in settings.items()
            for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def cli_run(tiny_model_dirs, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = ["prune", "--model", tiny_model_dirs["llama"], "--calib", calib_file, "--eval",
            calib_file, "--out", str(out), "--json", *_flags(SETTINGS)]
    assert main(argv) == 0
    return out


def test_prune_in_memory_finds_the_cli_mask(tiny_model_dirs, calib_file, cli_run, tmp_path):
    model, tokenizer = load_model(tiny_model_dirs["llama"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probprune.prune(model, tokenizer, calib=calib_file, eval=calib_file,
                             out=str(tmp_path / "py"), progress=False, **SETTINGS)
    cli_masks = load_file(str(cli_run / "masks.safetensors"))
    assert torch.equal(result.mask, cli_masks["mask"].bool())
    assert torch.equal(result.probs, load_file(str(cli_run / "scores.safetensors"))["probs"])
    for key, value in model.state_dict().items():  # the caller's model is read, not changed
        assert torch.equal(value, before[key]), key
    cli_ppl = __import__("json").load(open(cli_run / "report.json"))["perplexity"]
    assert result.report["perplexity"]["pruned"]["ppl"] == pytest.approx(
        cli_ppl["pruned"]["ppl"], rel=1e-6)
    # the pruned model in memory is the export: fewer parameters, the reported perplexity
    n = sum(p.numel() for p in result.model.parameters())
    assert n == result.report["params"]["pruned_model_total"] < sum(
        p.numel() for p in model.parameters())

    saved = result.save(str(tmp_path / "saved"))
    assert sorted(os.listdir(saved)) == sorted(os.listdir(cli_run))
    again = probprune.load_pruned(saved)
    ids = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(again(ids).logits, result.model(ids).logits)


def test_prune_takes_a_path_like_the_cli(tiny_model_dirs, calib_file, cli_run, tmp_path):
    result = probprune.prune(tiny_model_dirs["llama"], calib=calib_file, eval=calib_file,
                             progress=False, **SETTINGS)
    assert os.path.isdir(result.directory)
    assert torch.equal(result.mask, load_file(str(cli_run / "masks.safetensors"))["mask"].bool())


def test_unknown_settings_are_named_with_the_closest_flag(tiny_model_dirs):
    with pytest.raises(TypeError, match=r"batchsize \(did you mean batch_size"):
        probprune.prune(tiny_model_dirs["llama"], sparsity=0.3, batchsize=4)
