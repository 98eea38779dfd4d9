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
from probprune.preflight import check
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


def test_scaled_allocation_keeps_the_runs_shares(run_dir, tmp_path):
    """The run kept heads (2, 2, 1) and channels (60, 36, 12) per layer: at 0.5 each group keeps
    its share times one factor, its best-scored units, and the slack goes to the best-scored
    units left out."""
    run = copy_run(run_dir, tmp_path)
    g = torch.Generator().manual_seed(2)
    heads = torch.linspace(0.1, 0.2, L * KV)[torch.randperm(L * KV, generator=g)]
    channels = torch.linspace(0.3, 0.9, L * F)[torch.randperm(L * F, generator=g)]
    save_file({"probs": torch.cat([heads, channels])}, os.path.join(run, "scores.safetensors"))
    run_mask = torch.zeros(L * KV + L * F, dtype=torch.uint8)
    for l, (h, c) in enumerate([(2, 60), (2, 36), (1, 12)]):
        run_mask[l * KV: l * KV + h] = 1
        run_mask[L * KV + l * F: L * KV + l * F + c] = 1
    save_file({"mask": run_mask}, os.path.join(run, "masks.safetensors"))
    out = tmp_path / "scaled"
    record = reexport(export_config(run, out, 0.5))
    # by hand: the run kept 5 heads and 108 channels = 30,912; the new budget is 24,768
    factor = 24768 / 30912
    keep_heads = [math.floor(factor * n) for n in (2, 2, 1)]  # units of one cost per group
    keep_channels = [math.floor(factor * n) for n in (60, 36, 12)]
    assert keep_heads == [1, 1, 0] and keep_channels == [48, 28, 9]
    slack = 24768 - sum(keep_heads) * HEAD_COST - sum(keep_channels) * CHANNEL_COST
    expected = torch.zeros(L * KV + L * F, dtype=torch.bool)
    for l in range(L):
        best_head = heads[l * KV:(l + 1) * KV].argsort(descending=True)[: keep_heads[l]]
        expected[l * KV + best_head] = True
        best = channels[l * F:(l + 1) * F].argsort(descending=True)[: keep_channels[l]]
        expected[L * KV + l * F + best] = True
    # the slack (6,384 = 44 channels and 48 parameters) buys the best channels left out; every
    # head scores below every channel
    left = [i for i in channels.argsort(descending=True).tolist()
            if not expected[L * KV + i]][: slack // CHANNEL_COST]
    expected[L * KV + torch.tensor(left)] = True
    mask = load_file(str(out / "masks.safetensors"))["mask"].bool()
    assert torch.equal(mask, expected)
    assert record["params"]["kept_prunable"] == 24768 - slack % CHANNEL_COST
    assert record["allocation"] == "scaled"


def test_scaled_allocation_keeps_dropped_layers_dropped_and_protected_ones_whole(run_dir,
                                                                                  tmp_path):
    """A run with layer units that dropped layer 2 and protected layer 0: at 0.5, layer 0 stays
    whole, layer 2 dropped, and layer 1 gets the rest in the run's head / channel shares."""
    run = copy_run(run_dir, tmp_path)
    manifest_path = os.path.join(run, "probprune.json")
    manifest = json.load(open(manifest_path))
    manifest["settings"].update(prune_layers=True, protect_layers=[0])
    json.dump(manifest, open(manifest_path, "w"))
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(L * KV + L * F + L, generator=g)
    save_file({"probs": probs}, os.path.join(run, "scores.safetensors"))
    run_mask = torch.zeros(L * KV + L * F + L, dtype=torch.uint8)
    run_mask[:KV] = 1                                   # layer 0: everything
    run_mask[L * KV: L * KV + F] = 1
    run_mask[KV: 2 * KV] = 1                            # layer 1: 2 heads, 36 channels
    run_mask[L * KV + F: L * KV + F + 36] = 1
    run_mask[L * KV + L * F:] = torch.tensor([1, 1, 0], dtype=torch.uint8)  # layer 2 dropped
    save_file({"mask": run_mask}, os.path.join(run, "masks.safetensors"))
    out = tmp_path / "layers"
    reexport(export_config(run, out, 0.5))
    mask = load_file(str(out / "masks.safetensors"))["mask"].bool()
    # by hand: 0.5 of 49,824 prunable (norms 96 a layer), less the norms of layers 0 and 1,
    # less layer 0 whole (16,512), leaves 8,208 for layer 1, whose run share was 6,144 heads
    # + 5,184 channels: times 8,208 / 11,328 -> 1 head and 26 channels, and the 1,392 left buy
    # 9 more channels (a head costs 3,072)
    assert mask[:KV].all() and mask[L * KV: L * KV + F].all()
    assert not mask[2 * KV: 3 * KV].any() and not mask[L * KV + 2 * F: L * KV + 3 * F].any()
    assert mask[L * KV + L * F:].tolist() == [True, True, False]
    assert int(mask[KV: 2 * KV].sum()) == 1 and int(mask[L * KV + F: L * KV + 2 * F].sum()) == 35
    heads1 = probs[KV: 2 * KV]
    assert bool(mask[KV + heads1.argmax()])
    manifest = json.load(open(out / "probprune.json"))
    assert manifest["kept"]["layers"] == [0, 1]


def test_global_allocation_gives_the_hand_computed_mask(run_dir, tmp_path):
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
        record = reexport(export_config(run, out, sparsity, allocation="global"))
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
                                  compensate_windows=8, compensate_bias=True,
                                  compensate_select="mask"))
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
    assert "allocation scaled, compensation none)" in line


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
    argv = ["export", "--run", run, "--out", str(tmp_path / "o"), "--sparsity", "0.5"]
    os.remove(os.path.join(run, "masks.safetensors"))
    assert main(argv) == 2
    assert (f"'{run}' holds no masks.safetensors: --allocation scaled needs the run's exported "
            f"mask") in error_line(capsys)
    assert main(argv + ["--allocation", "global", "--compensate", "none", "--json"]) == 0
    capsys.readouterr()
    os.remove(os.path.join(run, "scores.safetensors"))
    assert main(argv) == 2
    assert f"--run '{run}' holds no scores.safetensors" in error_line(capsys)
    manifest = os.path.join(run, "probprune.json")
    json.dump({"format": 1}, open(manifest, "w"))  # what export_pruned writes without settings
    assert main(argv) == 2
    assert "holds no run settings" in error_line(capsys)


def test_export_config_checks_its_flags_before_loading(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="--compensate-windows must be at least 1"):
        check(export_config(run_dir, tmp_path / "o", 0.5, compensate_windows=0))


def test_a_query_head_run_reexports_at_another_budget(tiny_model_dirs, calib_file, tmp_path):
    """Global allocation over query-head units: the re-export meets the new budget, keeps the
    sum of its parts, and reloads to its mask's masked loss; the scaled allocation, linear in
    the heads, is refused."""
    from probprune.evaluate import masked_nll, model_nll

    run = str(tmp_path / "run")
    prune(settings(tiny_model_dirs["llama"], calib_file, run, steps=2, speed_tokens=0,
                   attn_units="query-head", init_attn_sparsity=0.3))
    out = tmp_path / "at50"
    record = reexport(export_config(run, out, 0.5, allocation="global"))
    params = record["params"]
    assert params["kept_prunable"] <= params["target_prunable"] == 0.5 * PRUNABLE
    assert params["total"] == sum(p.numel() for p in load_pruned(str(out)).parameters())
    model, tok = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model, attn_units="query-head")
    mask = load_file(str(out / "masks.safetensors"))["mask"].bool()
    assert mask.numel() == engine.units.n_units  # over query heads
    windows = torch.randint(0, model.config.vocab_size, (4, 16),
                            generator=torch.Generator().manual_seed(0))
    assert model_nll(load_pruned(str(out)), windows, 2) == pytest.approx(
        masked_nll(engine, mask, windows, 2), rel=1e-5)
    with pytest.raises(ValueError, match="--allocation scaled .* use --allocation global"):
        reexport(export_config(run, tmp_path / "scaled", 0.5, allocation="scaled"))
