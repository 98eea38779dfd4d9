"""``--shape uniform``: every layer keeps the same numbers of KV groups and MLP channels, and an
export whose kept layers all have one shape is the plain architecture, loaded without remote
code."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.budget import Budget, BudgetError
from probprune.cli import main
from probprune.export import export_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from probprune.units import ModelShape, UnitSpace
from tests.conftest import ARCHS
from tests.test_cli import error_line, prune_args

# 30 layers, 3 KV groups of 3 query heads, head_dim 64, d 576, 1536 channels: SmolLM2-135M
SMOLLM2 = ModelShape(30, 3, 3, 64, 576, 1536, False, False, False, 2)


@pytest.fixture()
def files(calib_file):
    """The text files :func:`tests.test_cli.prune_args` reads."""
    return {"text": calib_file}


def kept_counts(space: UnitSpace, keep: torch.Tensor):
    m = space.split(keep.double())
    return m.heads.sum(-1).tolist(), (m.mlp * space.block_sizes()).sum(-1).tolist()


@pytest.mark.parametrize("sparsity,attn", [(0.3, None), (0.5, None), (0.3, 0.34), (0.5, 0.5)])
def test_every_layer_keeps_the_same_counts_within_the_budget(sparsity, attn):
    space = UnitSpace(SMOLLM2, channel_block=64)
    budget = Budget.build(space, sparsity, attn_sparsity=attn, shape="uniform")
    g = torch.Generator().manual_seed(0)
    probs = budget.project(torch.rand(space.n_units, generator=g, dtype=torch.float64))
    heads, channels = kept_counts(space, budget.hard_mask(probs))
    expected_heads = 3 - round(3 * (attn or 0.0))
    assert heads == [expected_heads] * 30 and len(set(channels)) == 1
    # Within the budget, and short of it by less than one 64-channel block per layer.
    kept = SMOLLM2.n_layers * (expected_heads * SMOLLM2.head_cost
                               + channels[0] * SMOLLM2.channel_cost)
    target = (1 - sparsity) * space.prunable_params
    assert target - 30 * 64 * SMOLLM2.channel_cost < kept <= target
    # The projection meets each layer's two budgets in expectation.
    expected = budget.kept_by_group(probs)
    torch.testing.assert_close(expected, budget.targets, rtol=1e-6, atol=1.0)


@pytest.mark.parametrize("kw,message", [
    (dict(channel_block=100), "channel block 100 does not divide the 1536 MLP channels"),
    (dict(attn_sparsity=0.9), "leaves no KV group of the 3"),
    (dict(attn_units="query-head"), "neither layer units nor query-head units"),
    (dict(include_layers=True), "neither layer units nor query-head units"),
    (dict(sparsity=0.97), "leaves a layer's MLP less than one block"),
])
def test_budgets_a_uniform_shape_cannot_meet_are_refused(kw, message):
    space = UnitSpace(SMOLLM2, kw.pop("include_layers", False), kw.pop("channel_block", 64),
                      attn_units=kw.pop("attn_units", "kv-group"))
    with pytest.raises(BudgetError, match=message):
        Budget.build(space, kw.pop("sparsity", 0.3), shape="uniform", **kw)


def uniform_mask(units: UnitSpace, heads: int, channels: int, seed: int = 0) -> torch.Tensor:
    """A model-unit mask keeping ``heads`` KV groups and ``channels`` channels in every layer,
    which ones at random."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(units.n_layers):
        h = torch.zeros(units.heads_per_layer, dtype=torch.bool)
        h[torch.randperm(units.heads_per_layer, generator=g)[:heads]] = True
        c = torch.zeros(units.shape.intermediate, dtype=torch.bool)
        c[torch.randperm(units.shape.intermediate, generator=g)[:channels]] = True
        rows.append((h, c))
    return torch.cat([torch.cat([h for h, _ in rows]), torch.cat([c for _, c in rows])])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_uniform_export_is_the_plain_architecture(tiny_model_dirs, tmp_path, arch):
    model, tok = load_model(tiny_model_dirs[arch])
    model.config.architectures = None  # as a config converted from GGUF (the embedded models)
    engine = MaskedCausalLM(model)
    mask = uniform_mask(engine.units, 1, 40)
    out = export_pruned(model, tok, engine.units, mask, str(tmp_path / "plain"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" not in config and "probprune_layout" not in config
    assert not os.path.exists(os.path.join(out, "modeling_probprune.py"))
    assert config["architectures"] == [type(model).__name__]
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (1, 40)
    assert json.load(open(os.path.join(out, "probprune.json")))["architecture"] == "plain"
    plain = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    assert type(plain) is type(model)
    # The oracle: the masked forward of the dense model with the same mask.
    ids = torch.randint(1, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = engine.losses(ids, mask[None])[0]
        got = plain(ids, labels=ids).loss
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_pruned(out)(ids).logits, plain(ids).logits)
    card = open(os.path.join(out, "README.md")).read()
    assert "trust_remote_code" not in card and "custom_code" not in card
    assert f"MLP channels kept of {model.config.intermediate_size}" in card


@pytest.mark.parametrize("why,make", [
    ("layers of different sizes", lambda u: torch.cat([
        uniform_mask(u, 1, 40)[: u.n_heads], uniform_mask(u, 1, 40)[u.n_heads:].index_fill(
            0, torch.arange(3), True)])),
    ("the refit's biases", lambda u: uniform_mask(u, 1, 40)),
])
def test_other_exports_keep_their_per_layer_sizes(tiny_model_dirs, tmp_path, caplog, why, make):
    model, tok = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    mask = make(engine.units)
    weights = {}
    if why == "the refit's biases":
        weights = {f"model.layers.{l}.mlp.down_proj.bias": torch.zeros(48) for l in range(3)}
    with caplog.at_level("INFO", logger="probprune.export"):
        out = export_pruned(model, tok, engine.units, mask, str(tmp_path), weights=weights)
    assert f"per-layer sizes ({why})" in caplog.text
    config = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" in config and os.path.exists(os.path.join(out, "modeling_probprune.py"))
    ids = torch.randint(1, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(out)(ids, labels=ids).loss,
                                   engine.losses(ids, mask[None])[0], rtol=1e-5, atol=1e-5)


def test_a_uniform_run_exports_a_plain_model_and_reexports_one(tiny_model_dirs, files, tmp_path):
    out = str(tmp_path / "run")
    args = prune_args(tiny_model_dirs["llama"], files, out, "--shape", "uniform",
                      "--channel-block", "8")
    assert main(args) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["settings"]["shape"] == "uniform"
    assert report["compensation"]["bias"] is False  # unset: off with a uniform shape
    sizes = {(row["kv_heads"], row["channels"]) for row in report["layers"]}
    assert len(sizes) == 1 and all(row["kept"] for row in report["layers"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" not in config
    assert (config["num_key_value_heads"], config["intermediate_size"]) == sizes.pop()
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == report["params"][
        "pruned_model_total"]
    again = str(tmp_path / "half")
    assert main(["export", "--run", out, "--sparsity", "0.5", "--out", again]) == 0
    config = json.load(open(os.path.join(again, "config.json")))
    assert "auto_map" not in config and config["intermediate_size"] < 72


@pytest.mark.parametrize("extra,message", [
    (["--budget", "per-type"], "--shape uniform needs --budget global"),
    (["--attn-units", "query-head"], "--shape uniform needs --attn-units kv-group"),
    (["--prune-layers"], "--prune-layers does not apply with --shape uniform"),
    (["--protect-layers", "0"], "--protect-layers does not apply with --shape uniform"),
    (["--compensate-bias"], "--compensate-bias gives o_proj and down_proj a bias"),
])
def test_settings_a_uniform_shape_cannot_take_are_refused(tiny_model_dirs, files, tmp_path,
                                                          capsys, extra, message):
    args = prune_args(tiny_model_dirs["llama"], files, str(tmp_path / "run"), "--shape",
                      "uniform", *extra)
    assert main(args) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("sizes,why", [
    ([{"kv_heads": 2, "intermediate": 40}] * 3, None),
    ([{"kv_heads": 2, "intermediate": 40, "q_per_kv": [2, 2]}] * 3, None),
    ([], "no layer kept"),
    ([{"kv_heads": 2, "intermediate": 40, "down_bias": True}] * 3, "the refit's biases"),
    ([{"kv_heads": 0, "intermediate": 40}] * 3, "a layer without attention"),
    ([{"kv_heads": 2, "intermediate": 0}] * 3, "a layer without MLP channels"),
    ([{"kv_heads": 2, "intermediate": 40}, {"kv_heads": 1, "intermediate": 40}],
     "layers of different sizes"),
    ([{"kv_heads": 2, "intermediate": 40, "q_per_kv": [3, 1]}] * 3, "KV groups of different sizes"),
])
def test_one_rule_says_whether_an_export_is_plain_and_why_not(sizes, why):
    from probprune.export import not_plain
    assert not_plain(sizes) == why


def test_under_a_uniform_shape_obs_makes_the_export_independent_of_the_search(
        tiny_model_dirs, calib_file, tmp_path, caplog):
    """Every KV group kept and OBS choosing each layer's channels at a count the shape fixes:
    two searches that end on different masks export the same weights, and the run says so."""
    from safetensors.torch import load_file

    from probprune.pipeline import prune
    from tests.test_pipeline import settings

    def run(name, **kw):
        with caplog.at_level("WARNING", logger="probprune.pipeline"):
            prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path / name, shape="uniform",
                           channel_block=8, steps=6, compensate="sequential",
                           compensate_windows=8, **kw))
        return (load_file(str(tmp_path / name / "masks.safetensors")),
                load_file(str(tmp_path / name / "model.safetensors")))

    (masks_a, weights_a), (masks_b, weights_b) = run("a", lr=0.01), run("b", lr=2.0)
    assert "the export will not depend on the search" in caplog.text
    assert not torch.equal(masks_a["searched_mask"], masks_b["searched_mask"])
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0)
    caplog.clear()
    run("mask", compensate_select="mask")
    assert "the export will not depend on the search" not in caplog.text
