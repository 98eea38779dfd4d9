import json
import os

import pytest
import torch

from probprune.models import UnsupportedModelError, load_model
from tests.conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_supported_architectures(tiny_model_dirs, arch):
    model, tok = load_model(tiny_model_dirs[arch])
    assert model.config.model_type == {"llama3": "llama", "gemma3": "gemma3_text"}.get(arch, arch)
    assert not model.training
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    attn = model.model.layers[0].self_attn
    if arch == "qwen2":  # the q/k/v bias is part of what the engine must support
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0
    if arch == "qwen3":  # and so are per-head q/k norms that are not all ones
        assert attn.q_norm.weight.shape == (model.config.head_dim,)
        assert not torch.equal(attn.q_norm.weight, torch.ones_like(attn.q_norm.weight))
    if arch == "llama3":
        assert model.config.rope_parameters["rope_type"] == "llama3"
        assert model.config.num_attention_heads == 4 * model.config.num_key_value_heads


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_option(tiny_model_dirs, dtype, expected):
    model, _ = load_model(tiny_model_dirs["llama"], dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_unknown_dtype(tiny_model_dirs):
    with pytest.raises(ValueError, match="unknown dtype 'int7'"):
        load_model(tiny_model_dirs["llama"], dtype="int7")


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*Llama, Mistral, Qwen2, Qwen3, Gemma3$"):
        load_model(str(tmp_path))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


@pytest.mark.slow
def test_embedded_smollm2_converts_once_then_loads_from_cache(smollm2_cache, monkeypatch):
    monkeypatch.setenv("PROBPRUNE_CACHE", smollm2_cache)
    model, tok = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    cached = os.path.join(smollm2_cache, "smollm2-135m")
    saved = json.load(open(os.path.join(cached, "config.json")))
    assert "quantization_config" not in saved  # the cache is plain floats, not GGUF again
    stamp = os.path.getmtime(os.path.join(cached, "model.safetensors"))

    again, _ = load_model("smollm2-135m")
    assert os.path.getmtime(os.path.join(cached, "model.safetensors")) == stamp  # not rewritten
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.isfinite(again(ids).logits).all()


def test_hub_names_go_to_the_hub_not_to_a_missing_directory(monkeypatch):
    """``org/name`` is a hub name: it reaches transformers (offline here), not our local check."""
    import transformers

    from probprune.models import load_model, looks_like_a_path

    seen = []

    def fake_config(name, *a, **kw):
        seen.append(name)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    with pytest.raises(OSError, match="offline"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    assert seen == ["HuggingFaceTB/SmolLM2-135M"]
    assert looks_like_a_path("./runs/x") and looks_like_a_path("/abs") and looks_like_a_path("a/b/c")
    assert not looks_like_a_path("meta-llama/Llama-3.1-8B") and not looks_like_a_path("gpt2")


@pytest.mark.parametrize("pruned", [False, True])
def test_corrupt_weights_name_the_directory(tiny_model_dirs, tmp_path, pruned):
    import shutil

    from probprune.export import export_pruned
    from probprune.forward import MaskedCausalLM
    from probprune.models import WeightsError, load_model

    src = tiny_model_dirs["llama"]
    if pruned:
        model, tok = load_model(src)
        engine = MaskedCausalLM(model)
        export_pruned(model, tok, engine.units, engine.all_ones(1)[0], str(tmp_path / "m"))
    else:
        shutil.copytree(src, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(WeightsError, match=f"cannot read the weights in '{tmp_path / 'm'}'"):
        load_model(str(tmp_path / "m"))
