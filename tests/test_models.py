import json
import os
import time

import pytest
import torch

from probprune.models import UnsupportedModelError, load_model
from tests.conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_supported_architectures(tiny_model_dirs, arch):
    model, tok = load_model(tiny_model_dirs[arch])
    assert model.config.model_type == arch
    assert not model.training
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    if arch == "qwen2":  # the q/k/v bias is part of what the engine must support
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0


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
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*Llama, Mistral, Qwen2"):
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
