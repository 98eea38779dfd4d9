"""The streaming loader against ``from_pretrained`` (the oracle): same tensors, same logits, for
every architecture, dtype, sharded checkpoints, tied embeddings, and clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from probprune.loading import device_of, safetensors_files, stream_model
from probprune.models import WeightsError, load_model
from tests.conftest import ARCHS
from tests.tiny_models import make_model_dir

CPU = {"": torch.device("cpu")}


def _stream(path, dtype=torch.float32, mapping=CPU):
    return stream_model(AutoModelForCausalLM, path, AutoConfig.from_pretrained(path), dtype,
                        lambda meta: mapping)


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    for (na, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(ba, bb), na  # the rotary table, rebuilt after the meta construction
    ids = torch.randint(0, a.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_model_equals_from_pretrained(tiny_model_dirs, arch, dtype):
    path = tiny_model_dirs[arch]
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    got = _stream(path, dtype)
    assert type(got) is type(oracle) and not got.training
    assert all(p.device.type == "cpu" and not p.is_meta for p in got.parameters())
    _same_model(got, oracle)


def test_tied_embeddings_stay_one_tensor(tmp_path):
    path = make_model_dir(str(tmp_path / "tied"), "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    got = _stream(path)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    _same_model(got, AutoModelForCausalLM.from_pretrained(path).eval())


def test_tied_weight_stored_under_the_head_name(tmp_path):
    """The embedded SmolLM2 cache stores the tied matrix as ``lm_head.weight`` only."""
    path = make_model_dir(str(tmp_path / "tied"), "llama", tie_word_embeddings=True)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    got = _stream(path)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    torch.testing.assert_close(got.model.embed_tokens.weight, tensors["lm_head.weight"])


def test_sharded_checkpoint(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(safetensors_files(str(tmp_path / "sharded"))) > 2
    _same_model(_stream(str(tmp_path / "sharded")), model)


def test_each_tensor_goes_where_its_module_is_placed(tiny_model_dirs):
    """The routing by module prefix that the streaming uses, on the layer sharding's plan."""
    from probprune.placement import plan

    meta_cfg = AutoConfig.from_pretrained(tiny_model_dirs["llama"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(meta_cfg)
    placement = plan(model, ["cpu:0", "cpu:1"])
    mapping = placement.module_devices()
    owner = {f"model.layers.{l}.": placement.devices[j] for l, j in enumerate(placement.layers)}
    assert set(owner.values()) == set(placement.devices)  # both devices hold layers
    for name, _ in model.named_parameters():
        layer = next((d for prefix, d in owner.items() if name.startswith(prefix)), None)
        expected = layer if layer is not None else (
            placement.devices[0] if name.startswith("model.embed_tokens") else placement.devices[-1])
        assert device_of(name, mapping) == expected, name
    assert device_of("model.layers.10.mlp", {"": "x", "model.layers.1": "y"}) == "x"  # no prefix clash


def test_load_model_spreads_layers_over_devices(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"], devices=["cpu", "cpu"])
    oracle = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    _same_model(model, oracle)


def test_missing_tensor_is_named(tiny_model_dirs, tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(tiny_model_dirs["llama"], path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="lacks 1 tensors the model needs: "
                                           "model.layers.1.mlp.up_proj.weight"):
        load_model(path)


def test_wrong_shape_is_named(tiny_model_dirs, tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(tiny_model_dirs["llama"], path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="'model.norm.weight' has shape"):
        load_model(path)


def test_a_checkpoint_without_safetensors_goes_through_from_pretrained(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["llama"]
    oracle = AutoModelForCausalLM.from_pretrained(src).eval()
    shutil.copytree(src, tmp_path / "bin")
    os.remove(tmp_path / "bin" / "model.safetensors")
    torch.save(oracle.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert safetensors_files(str(tmp_path / "bin")) is None
    model, _ = load_model(str(tmp_path / "bin"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _same_model(model, AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval())


def test_index_lists_its_shards(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "b-00002.safetensors", "c": "b-00001.safetensors",
                        "d": "b-00002.safetensors"}}))
    assert safetensors_files(str(tmp_path)) == [str(tmp_path / "b-00001.safetensors"),
                                                str(tmp_path / "b-00002.safetensors")]
    assert safetensors_files(str(tmp_path / "nothing")) is None
