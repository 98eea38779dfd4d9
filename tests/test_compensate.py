"""Compensation: the refit against hand-built cases, the Hugging Face forward and the reload."""
import copy
import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from probprune.compensate import (CompensationError, Gram, compensate, refit,
                                  relative_error)
from probprune.config import ConfigError, PruneConfig
from probprune.export import export_pruned, pruned_model
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from tests.test_forward import _masks


def _gram(x):
    g = Gram(x.shape[1], x.device)
    for chunk in x.split(7):
        g.add(chunk)
    return g


def _direct_error(x, W, cols, V, c):
    y = x.double() @ W.double().T
    approx = x[:, cols].double() @ V.double().T + (0 if c is None else c)
    return float((y - approx).pow(2).sum() / y.pow(2).sum())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0, 100.0])
def test_refit_never_increases_the_reconstruction_error(bias, damping):
    torch.manual_seed(0)
    x = torch.randn(300, 12) @ torch.randn(12, 12) + torch.randn(12)  # correlated, not centred
    W = torch.randn(5, 12)
    cols = torch.tensor([0, 2, 3, 7, 8, 11])
    g = _gram(x)
    V, c = refit(g, W, cols, damping, bias)
    bare = _direct_error(x, W, cols, W[:, cols], None)
    fitted = _direct_error(x, W, cols, V, c)
    assert fitted <= bare + 1e-12
    # The error computed from the Gram alone is the error of the outputs.
    assert relative_error(g, W, cols, V, c) == pytest.approx(fitted, rel=1e-6, abs=1e-9)


def test_refit_without_damping_is_least_squares():
    torch.manual_seed(1)
    x, W, cols = torch.randn(200, 9), torch.randn(4, 9), torch.tensor([1, 4, 5, 8])
    V, c = refit(_gram(x), W, cols, 0.0, bias=True)
    design = torch.cat([x[:, cols], torch.ones(200, 1)], 1).double()
    sol = torch.linalg.lstsq(design, (x @ W.T).double()).solution
    torch.testing.assert_close(V, sol[:-1].T)
    torch.testing.assert_close(c, sol[-1])


def test_pruned_inputs_that_are_combinations_of_kept_ones_are_reproduced():
    torch.manual_seed(2)
    kept = torch.randn(100, 4)
    x = torch.cat([kept, kept @ torch.randn(4, 3)], 1)  # columns 4..6 depend on 0..3
    W = torch.randn(6, 7)
    cols = torch.arange(4)
    V, _ = refit(_gram(x), W, cols, 0.0, bias=False)
    torch.testing.assert_close(x[:, :4].double() @ V.T, x.double() @ W.double().T, atol=1e-5,
                               rtol=1e-5)  # fp32 Gram products


def test_gram_accumulation_error_is_small():
    torch.manual_seed(3)
    x = torch.randn(4096, 64) * 3 + 1
    g = _gram(x)
    exact = x.double().T @ x.double()
    assert float((g.xtx - exact).abs().max() / exact.abs().max()) < 1e-6


def _duplicate_units(model):
    """Layer 0's KV group 1 becomes a copy of group 0 and MLP channels 40.. copies of 0..; so a
    mask without them loses nothing a refit cannot restore."""
    cfg = model.config
    hd = cfg.head_dim
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        q = attn.q_proj.weight
        q[g * hd:2 * g * hd] = q[:g * hd]
        for lin in (attn.k_proj, attn.v_proj):
            lin.weight[hd:2 * hd] = lin.weight[:hd]
        n = cfg.intermediate_size - 40
        mlp.gate_proj.weight[40:] = mlp.gate_proj.weight[:n]
        mlp.up_proj.weight[40:] = mlp.up_proj.weight[:n]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_refit_restores_the_dense_model_when_pruned_units_are_copies(tiny_model_dirs, mode):
    model, _ = load_model(tiny_model_dirs["llama"])
    _duplicate_units(model)
    engine = MaskedCausalLM(model)
    units = engine.units
    mask = torch.ones(units.n_units, dtype=torch.bool)
    m = units.split(mask)
    m.heads[0, 1] = False
    m.mlp[0, 40:] = False
    mask = torch.cat([m.heads.flatten(), m.mlp.flatten()])
    assert mask.numel() == units.n_units
    ids = torch.randint(0, model.config.vocab_size, (12, 16))
    comp = compensate(engine, mask, ids, mode=mode, damping=0.0, progress=False)
    test = torch.randint(0, model.config.vocab_size, (3, 16))
    with torch.no_grad():
        dense = model(test).logits
        bare = pruned_model(model, units, mask)(test).logits
        fixed = pruned_model(model, units, mask, comp.weights)(test).logits
    assert (bare - dense).abs().max() > 1e-2  # the bare slice loses the copies' share
    torch.testing.assert_close(fixed, dense, atol=2e-4, rtol=2e-4)


def _hf_compensated(model, units, mask, weights):
    """The original HF model with pruned columns zeroed and the refit weights in place: an
    independent forward of the compensated model that still exposes every unit's output."""
    model = copy.deepcopy(model)
    shape = units.shape
    m = units.split(mask)
    for l, layer in enumerate(model.model.layers):
        for lin, cols, key in ((layer.self_attn.o_proj, shape.head_columns(m.heads[l].nonzero()
                                                                           .flatten()),
                                f"model.layers.{l}.self_attn.o_proj"),
                               (layer.mlp.down_proj, m.mlp[l].nonzero().flatten(),
                                f"model.layers.{l}.mlp.down_proj")):
            with torch.no_grad():
                w = torch.zeros_like(lin.weight)
                w[:, cols] = weights[key + ".weight"]
                lin.weight.copy_(w)
            if key + ".bias" in weights:
                lin.bias = nn.Parameter(weights[key + ".bias"].clone())
    return model


def test_sequential_statistics_come_from_the_pruned_and_refit_layers_before(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    units = engine.units
    mask = _masks(units, 3, seed=3)[2].clone()
    m = units.split(mask)
    mask = torch.cat([m.heads.flatten(), m.mlp.flatten()])  # every layer kept
    mask_m = units.split(mask)
    ids = torch.randint(0, model.config.vocab_size, (10, 16))
    comp = compensate(engine, mask, ids, mode="sequential", damping=0.01, bias=True,
                      progress=False)
    oracle = _hf_compensated(model, units, mask, comp.weights)
    last = units.n_layers - 1
    grams = {}
    hooks = [oracle.model.layers[last].self_attn.o_proj.register_forward_pre_hook(
                 lambda mod, inp: grams.setdefault("attn", Gram(inp[0].shape[-1], "cpu")).add(inp[0])),
             oracle.model.layers[last].mlp.down_proj.register_forward_pre_hook(
                 lambda mod, inp: grams.setdefault("mlp", Gram(inp[0].shape[-1], "cpu")).add(inp[0]))]
    with torch.no_grad():
        for batch in ids.split(8):
            oracle(batch)
    for h in hooks:
        h.remove()
    layer = model.model.layers[last]
    for name, lin, cols, key in (
            ("attn", layer.self_attn.o_proj,
             units.shape.head_columns(mask_m.heads[last].nonzero().flatten()), "self_attn.o_proj"),
            ("mlp", layer.mlp.down_proj, mask_m.mlp[last].nonzero().flatten(), "mlp.down_proj")):
        V, c = refit(grams[name], lin.weight, cols, 0.01, True)
        prefix = f"model.layers.{last}.{key}"
        torch.testing.assert_close(comp.weights[prefix + ".weight"], V.float(), atol=1e-4,
                                   rtol=1e-3)
        torch.testing.assert_close(comp.weights[prefix + ".bias"], c.float(), atol=1e-4,
                                   rtol=1e-3)
    for rec in comp.layers:  # and the refit never does worse than the slice, layer by layer
        assert rec["attn_refit"] <= rec["attn_bare"] + 1e-9
        assert rec["mlp_refit"] <= rec["mlp_bare"] + 1e-9


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_compensated_export_with_biases_reloads_both_ways(tiny_model_dirs, tmp_path, arch):
    model, tok = load_model(tiny_model_dirs[arch])
    engine = MaskedCausalLM(model, include_layers=True)
    mask = _masks(engine.units, 3, seed=0)[0]  # layer 0 keeps no heads
    ids = torch.randint(0, model.config.vocab_size, (8, 16))
    comp = compensate(engine, mask, ids, mode="sequential", bias=True, progress=False)
    out = export_pruned(model, tok, engine.units, mask, str(tmp_path), weights=comp.weights)
    layout = json.load(open(os.path.join(out, "config.json")))["probprune_layout"]
    assert any(s.get("down_bias") for s in layout) and any(s.get("o_bias") for s in layout)
    test = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        in_memory = pruned_model(model, engine.units, mask, comp.weights)(test).logits
        reloaded = load_pruned(out)(test).logits
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(test).logits
    torch.testing.assert_close(reloaded, in_memory)
    torch.testing.assert_close(remote, in_memory)


def test_bad_settings_are_named(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    mask = torch.ones(engine.units.n_units, dtype=torch.bool)
    ids = torch.randint(0, 100, (4, 8))
    with pytest.raises(CompensationError, match="damping must be >= 0"):
        compensate(engine, mask, ids, damping=-0.1)
    with pytest.raises(CompensationError, match="at least 1 calibration window"):
        compensate(engine, mask, ids[:0])
    with pytest.raises(CompensationError, match="one hard model-unit mask"):
        compensate(engine, mask[None], ids)
    base = dict(model="smollm2-135m", sparsity=0.3, out="/tmp/x")
    with pytest.raises(ConfigError, match="--compensate-damping"):
        PruneConfig(**base, compensate_damping=-1.0).validate()
    with pytest.raises(ConfigError, match="--compensate-windows"):
        PruneConfig(**base, compensate_windows=0).validate()
