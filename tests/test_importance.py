"""Initial probabilities: the Wanda-sp metric by hand, the sigmoid around the budget, score files."""
import pytest
import torch
from safetensors.torch import save_file

from probprune.budget import Budget
from probprune.importance import activation_stats, initial_probs, unit_metric
from probprune.families import units_of
from probprune.models import load_model


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    return model, units_of(model.config)


def test_wanda_sp_metric_by_hand(llama):
    model, layout = llama
    windows = torch.randint(0, model.config.vocab_size, (3, 10))
    norms, _ = activation_stats(model, windows, batch_size=2, progress=False)
    # Independent computation for layer 1: capture the inputs of o_proj and down_proj directly.
    seen = {}
    layer = model.model.layers[1]
    h1 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("o", a[0]))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("d", a[0]))
    with torch.no_grad():
        model(windows)
    h1.remove(), h2.remove()
    x_o, x_d = seen["o"].flatten(0, 1).double(), seen["d"].flatten(0, 1).double()
    w_o = layer.self_attn.o_proj.weight.double().abs()
    w_d = layer.mlp.down_proj.weight.double().abs()
    col = (w_o * x_o.norm(dim=0) / 30 ** 0.5).mean(0)  # 30 tokens: the norm is a root mean square
    heads = col.view(layout.shape.n_kv_heads, -1).sum(1)
    chans = (w_d * x_d.norm(dim=0) / 30 ** 0.5).mean(0)
    metric = unit_metric(model, layout, "wanda-sp", norms)
    lay = layout.split(metric)
    torch.testing.assert_close(lay.heads[1], heads)
    torch.testing.assert_close(lay.mlp[1], chans)


@pytest.mark.parametrize("method", ["wanda-sp", "magnitude", "constant"])
def test_initial_probs_are_on_the_budget(llama, method):
    model, layout = llama
    budget = Budget.build(layout, 0.3)
    windows = torch.randint(0, model.config.vocab_size, (4, 12))
    space, probs = initial_probs(model, budget, method, windows, progress=False)
    assert probs.shape == (layout.n_units,) and space.n_units == layout.n_units
    assert probs.min() >= 0 and probs.max() <= 1
    torch.testing.assert_close(budget.kept_by_group(probs), budget.targets, rtol=1e-5, atol=1)
    if method != "constant":  # informative: not all equal
        assert probs.std() > 0.05


def test_scores_file_round_trip_and_errors(llama, tmp_path):
    model, layout = llama
    budget = Budget.build(layout, 0.3)
    probs = torch.rand(layout.n_units)
    save_file({"probs": probs}, str(tmp_path / "scores.safetensors"))
    space, loaded = initial_probs(model, budget, str(tmp_path / "scores.safetensors"))
    torch.testing.assert_close(space.expand(loaded), budget.project(probs.double()).float())
    save_file({"probs": torch.rand(5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \(5,\)"):
        initial_probs(model, budget, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="wanda-sp, magnitude, constant"):
        initial_probs(model, budget, "wanda")


def test_sigmoid_around_ratio_by_hand():
    from probprune.importance import sigmoid_around_ratio

    z = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    # Ratio 0.5: the threshold lies between the 2nd and 3rd value.
    torch.testing.assert_close(sigmoid_around_ratio(z, 0.5, 0.5),
                               torch.sigmoid((z - 1.5) / 0.5))
    # Ratio 0: nothing is pruned, the least important unit starts at 0.99; ratio 1: at most 0.01.
    assert float(sigmoid_around_ratio(z, 0.0, 0.1).min()) == pytest.approx(0.99)
    assert float(sigmoid_around_ratio(z, 1.0, 0.1).max()) == pytest.approx(0.01)
