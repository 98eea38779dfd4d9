"""Re-export of a run at another budget from its saved scores: the mask it takes (hand-computed
for hand-made scores), the export it writes, compensation, and scores that are not the run's."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from probprune.cli import main
from probprune.config import ConfigError, ExportConfig
from probprune.data import eval_text, tokenize_joined
from probprune.evaluate import masked_perplexity
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from probprune.pipeline import prune
from probprune.reexport import ScoresMismatch, reexport
from tests.test_cli import error_line
from tests.test_pipeline import settings

# tiny_config: hidden 48, 3 layers, 6 query heads in 2 KV groups of head_dim 8, 72 MLP channels
D, L, KV, G, HD, F = 48, 3, 2, 3, 8, 72
HEAD_COST = (2 * G + 2) * HD * D      # q rows, k and v rows, o columns of one KV group
CHANNEL_COST = 3 * D                  # gate row, up row, down column
PRUNABLE = L * (KV * HEAD_COST + F * CHANNEL_COST)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dirs, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    prune(settings(tiny_model_dirs["llama"], calib_file, out, steps=2, channel_block=1,
                   speed_tokens=0))
    return str(out)


def export_config(run, out, sparsity, **kw):
    return ExportConfig(run=run, out=str(out), sparsity=sparsity, progress=False,
                        **{"compensate": "none", **kw})


def copy_run(run_dir, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    return run


def test_hand_made_scores_give_the_hand_computed_mask(run_dir, tmp_path):
    """Every head at 1 and distinct channel scores: the mask keeps every head and the n
    best-scored channels that fit the budget, n = floor((kept budget - heads) / channel)."""
    run = copy_run(run_dir, tmp_path)
    g = torch.Generator().manual_seed(1)
    channels = torch.linspace(0.05, 0.85, L * F)[torch.randperm(L * F, generator=g)]
    probs = torch.cat([torch.ones(L * KV), channels])
    save_file({"probs": probs}, os.path.join(run, "scores.safetensors"))
    counts = {}
    for sparsity in (0.3, 0.5):
        out = tmp_path / f"s{sparsity}"
        record = reexport(export_config(run, out, sparsity))
        n = math.floor(((1 - sparsity) * PRUNABLE - L * KV * HEAD_COST) / CHANNEL_COST)
        mask = load_file(str(out / "masks.safetensors"))["mask"].bool()
        assert mask[: L * KV].all()
        expected = torch.zeros(L * F, dtype=torch.bool)
        expected[channels.argsort(descending=True)[:n]] = True
        assert torch.equal(mask[L * KV:], expected)
        kept = L * KV * HEAD_COST + n * CHANNEL_COST
        params = record["params"]
        assert params["kept_prunable"] == kept
        # The reloaded model holds the base model's parameters less those removed.
        assert params["total"] == params["base_total"] - PRUNABLE + kept
        assert params["total"] == sum(p.numel() for p in load_pruned(str(out)).parameters())
        manifest = json.load(open(out / "probprune.json"))
        assert manifest["reexport"]["sparsity"] == sparsity
        assert manifest["settings"]["sparsity"] == sparsity
        assert sum(len(c) for c in manifest["kept"]["channels"].values()) == n
        counts[sparsity] = n
    assert counts == {0.3: 112, 0.5: 44}


def test_bare_reexport_is_the_slice_of_its_mask(run_dir, tiny_model_dirs, calib_file, tmp_path):
    out = tmp_path / "re"
    record = reexport(export_config(run_dir, out, 0.5, perplexity=True))
    params = record["params"]
    assert params["kept_prunable"] <= params["target_prunable"] == 0.5 * PRUNABLE
    model, tok = load_model(tiny_model_dirs["llama"])
    mask = load_file(str(out / "masks.safetensors"))["mask"].bool()
    ids = tokenize_joined(tok, [eval_text(calib_file).text])
    masked = masked_perplexity(MaskedCausalLM(model), mask, ids, seqlen=24, max_windows=6,
                               progress=False)
    assert record["perplexity"]["pruned"]["ppl"] == pytest.approx(masked.ppl, rel=1e-5)
    assert record["perplexity"]["pruned"]["windows"] == 6  # the run's protocol
    card = (out / "README.md").read_text()
    assert f"| this model (the export, reloaded) | {masked.ppl:.3f} |" in card
    assert "Re-exported at sparsity 0.5" in card


def test_compensated_reexport_refits_the_same_mask(run_dir, tmp_path):
    bare = reexport(export_config(run_dir, tmp_path / "bare", 0.4))
    comp = reexport(export_config(run_dir, tmp_path / "comp", 0.4, compensate="sequential",
                                  compensate_windows=8, compensate_bias=True))
    assert comp["compensate"] == "sequential" and bare["compensate"] == "none"
    masks = [load_file(str(tmp_path / d / "masks.safetensors"))["mask"] for d in ("bare", "comp")]
    assert torch.equal(*masks)
    w = [load_file(str(tmp_path / d / "model.safetensors")) for d in ("bare", "comp")]
    key = "model.layers.0.mlp.down_proj.weight"
    assert w[0][key].shape == w[1][key].shape and not torch.allclose(w[0][key], w[1][key])
    assert "model.layers.0.mlp.down_proj.bias" in w[1]
    # the bias the compensation added is the one difference in size
    assert comp["params"]["total"] - bare["params"]["total"] == sum(
        t.numel() for k, t in w[1].items() if k.endswith("_proj.bias"))
    manifest = json.load(open(tmp_path / "comp" / "probprune.json"))
    assert manifest["reexport"]["compensate"] == "sequential"


def test_scores_of_another_model_are_refused(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    scores = os.path.join(run, "scores.safetensors")
    probs = load_file(scores)["probs"]
    save_file({"probs": probs}, scores, metadata={"model": "/elsewhere/other-model"})
    with pytest.raises(ScoresMismatch, match="holds the scores of a run of model "
                                             "'/elsewhere/other-model', but the run's settings"):
        reexport(export_config(run, tmp_path / "out", 0.5))


def test_scores_of_another_layout_are_refused(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    scores = os.path.join(run, "scores.safetensors")
    # what a run with --prune-layers writes: one more unit per layer (no metadata: an older run)
    save_file({"probs": torch.full((L * KV + L * F + L,), 0.5)}, scores)
    with pytest.raises(ScoresMismatch, match=r"has shape \(225,\); this model and unit setting "
                                             r"need \(222,\).*another model or unit layout"):
        reexport(export_config(run, tmp_path / "out", 0.5))
    save_file({"probs": torch.full((L * KV + L * F + L,), 0.5)}, scores,
              metadata={"n_units": "225"})
    with pytest.raises(ScoresMismatch, match="holds 225 unit scores; model .* without layer "
                                             "units has 222"):
        reexport(export_config(run, tmp_path / "out", 0.5))


def test_the_run_writes_scores_that_name_their_model(run_dir, tiny_model_dirs):
    from safetensors import safe_open

    with safe_open(os.path.join(run_dir, "scores.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"model": tiny_model_dirs["llama"], "n_units": str(L * KV + L * F),
                    "prune_layers": "False"}


def test_cli_export_prints_the_parameter_counts(run_dir, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["export", "--run", run_dir, "--sparsity", "0.5", "--out", out,
                 "--compensate", "none", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["params"]["total"] == sum(p.numel() for p in load_pruned(out).parameters())
    assert main(["export", "--run", run_dir, "--sparsity", "0.3", "--out", out + "30",
                 "--compensate", "none"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{out}30: ") and "parameters (base model 80,592)" in line
    assert "compensation none" in line


@pytest.mark.parametrize("run,out,extra,message", [
    ("{tmp}/missing", "{tmp}/o", [], "--run '{tmp}/missing' is not a directory"),
    ("{model}", "{tmp}/o", [], "--run '{model}' is not a prune run's directory (no "
                               "probprune.json)"),
    ("{run}", "{run}", [], "--out must not be the --run directory"),
    ("{run}", "{model}", [], "--out must not be the run's model directory"),
    ("{run}", "{tmp}/o", ["--sparsity", "1.5"], "--sparsity must lie strictly between 0 and 1"),
    ("{run}", "{tmp}/o", ["--compensate", "magic"], "argument --compensate: invalid choice"),
])
def test_cli_export_bad_input(run_dir, tiny_model_dirs, tmp_path, capsys, run, out, extra,
                              message):
    names = {"tmp": str(tmp_path), "model": tiny_model_dirs["llama"], "run": run_dir}
    argv = ["export", "--run", run.format(**names), "--out", out.format(**names)]
    argv += extra if "--sparsity" in extra else ["--sparsity", "0.5"] + extra
    assert main(argv) == 2
    assert message.format(**names) in error_line(capsys)


def test_cli_export_refuses_a_run_without_scores_or_settings(run_dir, tiny_model_dirs,
                                                             tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    os.remove(os.path.join(run, "scores.safetensors"))
    argv = ["export", "--run", run, "--out", str(tmp_path / "o"), "--sparsity", "0.5"]
    assert main(argv) == 2
    assert f"--run '{run}' holds no scores.safetensors" in error_line(capsys)
    manifest = os.path.join(run, "probprune.json")
    json.dump({"format": 1}, open(manifest, "w"))  # what export_pruned writes without settings
    assert main(argv) == 2
    assert "holds no run settings" in error_line(capsys)


def test_export_config_checks_its_flags_before_loading(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="--compensate-windows must be at least 1"):
        export_config(run_dir, tmp_path / "o", 0.5, compensate_windows=0).validate()
