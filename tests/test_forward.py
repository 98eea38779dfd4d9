"""Parity of the K-mask forward with the Hugging Face forward and with the sliced model."""
import pytest
import torch

from probprune.export import export_pruned
from probprune.models import load_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model
from tests.conftest import ARCHS


def _masks(layout, K, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(K, layout.n_units, generator=g) < 0.6
    sl = layout.type_slices()
    hkv, F = layout.shape.n_kv_heads, layout.shape.intermediate
    masks[0, sl["heads"].start: sl["heads"].start + hkv] = False  # layer 0: no heads
    masks[1, sl["mlp"].start + F: sl["mlp"].start + 2 * F] = False  # layer 1: no channels
    if "layers" in sl:
        masks[2, sl["layers"].start + 1] = False  # layer 1 dropped
    return masks


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_masks_give_the_hf_loss(tiny_model_dirs, arch):
    model, _ = load_model(tiny_model_dirs[arch])
    mm = MaskedCausalLM(model, include_layers=True)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        expected = model(ids, labels=ids).loss
    losses = mm.losses(ids, mm.all_ones(2))
    torch.testing.assert_close(losses, expected.expand(2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_any_mask_gives_the_sliced_models_loss(tiny_model_dirs, arch, tmp_path):
    model, tok = load_model(tiny_model_dirs[arch])
    mm = MaskedCausalLM(model, include_layers=True)
    masks = _masks(mm.units, 3, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    losses = mm.losses(ids, masks)
    for k in range(3):
        pruned = load_pruned(export_pruned(model, tok, mm.units, masks[k], str(tmp_path / str(k))))
        with torch.no_grad():
            expected = pruned(ids, labels=ids).loss
        torch.testing.assert_close(losses[k], expected, rtol=1e-5, atol=1e-6)
    assert len(pruned.model.layers) == 2  # the third mask dropped a layer


def test_llama3_rope_scaling_is_the_models_own(tiny_model_dirs):
    """The engine takes cos/sin from the model's rotary embedding: Llama-3's rescaled frequencies
    give HF's loss, which differs from the same weights under plain RoPE past the original 64
    positions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_dirs["llama3"]
    plain_config = AutoConfig.from_pretrained(path)
    plain_config.rope_parameters = {"rope_type": "default",
                                    "rope_theta": plain_config.rope_parameters["rope_theta"]}
    ids = torch.randint(0, plain_config.vocab_size, (2, 96))
    losses = {}
    for name, model in (("llama3", load_model(path)[0]),
                        ("plain", AutoModelForCausalLM.from_pretrained(path, config=plain_config))):
        with torch.no_grad():
            expected = model(ids, labels=ids).loss
        engine = MaskedCausalLM(model)
        losses[name] = engine.losses(ids, engine.all_ones())[0]
        torch.testing.assert_close(losses[name], expected, rtol=1e-5, atol=0)
    assert abs(losses["llama3"] - losses["plain"]) > 1e-3


def test_mask_shape_is_checked(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    mm = MaskedCausalLM(model)
    with pytest.raises(ValueError, match=r"masks must be bool \[K, "):
        mm.losses(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from probprune.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="Llama, Mistral, Qwen2, Qwen3, Gemma3$"):
        MaskedCausalLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
