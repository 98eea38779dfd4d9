"""The dense-masked baseline (the paper code's way) computes the engine's losses."""
import pytest
import torch

from probprune.baseline import DenseMaskedLM
from probprune.forward import MaskedCausalLM
from probprune.models import load_model
from tests.test_forward import _masks
from tests.tiny_models import make_model_dir


def _all_hooks(model):
    return [h for mod in model.modules()
            for h in (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values())]


@pytest.mark.parametrize("include_layers", [False, True], ids=["units", "units+layers"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_dense_mask_equals_the_engine(tiny_model_dirs, arch, include_layers):
    model, _ = load_model(tiny_model_dirs[arch])
    engine = MaskedCausalLM(model, include_layers=include_layers)
    dense = DenseMaskedLM(model, include_layers=include_layers)
    assert dense.units.n_units == engine.units.n_units
    # Random masks; mask 0 has a layer without heads, mask 1 a layer without channels, mask 2
    # (with layer units) drops layer 1; mask 3 is all ones.
    masks = torch.cat([_masks(engine.units, 3, seed=4), engine.all_ones(1)])
    ids = torch.randint(0, model.config.vocab_size, (2, 15))
    expected = engine.losses(ids, masks)
    got = dense.losses(ids, masks)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(got[3], model(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    assert len(set(got.tolist())) == 4  # the masks really changed the forward
    assert not _all_hooks(model)


def test_o_proj_bias_and_dropped_layer(tmp_path):
    """Llama with attention_bias: a layer without heads still adds o_proj's bias; a dropped layer
    adds nothing (the pass-through replaces the whole layer output)."""
    model, _ = load_model(make_model_dir(str(tmp_path / "m"), "llama", attention_bias=True))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.5)
    engine = MaskedCausalLM(model, include_layers=True)
    dense = DenseMaskedLM(model, include_layers=True)
    masks = _masks(engine.units, 3, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    torch.testing.assert_close(dense.losses(ids, masks), engine.losses(ids, masks),
                               rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_after_an_error(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    dense = DenseMaskedLM(model)
    ids = torch.full((1, 5), model.config.vocab_size + 10)  # out of range: the embedding raises
    with pytest.raises(IndexError):
        dense.losses(ids, dense.all_ones(2))
    assert not _all_hooks(model)
    with pytest.raises(ValueError, match=r"masks must be bool \[K, "):
        dense.losses(ids, torch.ones(1, 3, dtype=torch.bool))
