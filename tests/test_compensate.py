"""Compensation: the refit against hand-built cases, the Hugging Face forward and the reload."""
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from probprune.compensate import (CompensationError, Gram, compensate, input_map, refit,
                                  relative_error)
from probprune.settings import CompensationSettings
from probprune.config import ConfigError, PruneConfig
from probprune.preflight import check
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


@pytest.mark.parametrize("mode,target", [("parallel", "local"), ("sequential", "local"),
                                         ("sequential", "dense")])
def test_refit_restores_the_dense_model_when_pruned_units_are_copies(tiny_model_dirs, mode,
                                                                     target):
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
    comp = compensate(engine, mask, ids,
                      CompensationSettings(compensate=mode, compensate_damping=0.0,
                                           compensate_target=target, compensate_bias=False,
                                           compensate_select="mask"),
                      progress=False)
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


def _assert_last_layer_refit_is(comp, model, units, mask_m, grams):
    """The compensation's last-layer o_proj / down_proj (damping 0.01, bias) equal a refit on the
    oracle's statistics ``grams`` ("attn", "mlp")."""
    last = units.n_layers - 1
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


def test_sequential_statistics_come_from_the_pruned_and_refit_layers_before(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    units = engine.units
    mask = _masks(units, 3, seed=3)[2].clone()
    m = units.split(mask)
    mask = torch.cat([m.heads.flatten(), m.mlp.flatten()])  # every layer kept
    mask_m = units.split(mask)
    ids = torch.randint(0, model.config.vocab_size, (10, 16))
    comp = compensate(engine, mask, ids,
                      CompensationSettings(compensate="sequential", compensate_damping=0.01,
                                           compensate_bias=True, compensate_select="mask"),
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
    _assert_last_layer_refit_is(comp, model, units, mask_m, grams)
    for rec in comp.layers:  # and the refit never does worse than the slice, layer by layer
        assert rec["attn_refit"] <= rec["attn_bare"] + 1e-9
        assert rec["mlp_refit"] <= rec["mlp_bare"] + 1e-9


def _explicit_gram(x, t):
    g = Gram(x.shape[1], x.device, t.shape[1])
    for xc, tc in zip(x.split(7), t.split(7)):
        g.add(xc, tc)
    return g


@pytest.mark.parametrize("bias", [False, True])
def test_refit_on_explicit_targets_is_least_squares_and_never_worse_than_the_slice(bias):
    torch.manual_seed(4)
    x = torch.randn(250, 10) @ torch.randn(10, 10) + torch.randn(10)
    W = torch.randn(3, 10)
    t = x @ W.T + torch.randn(250, 3) + 0.5  # a target the dense layer does not produce
    cols = torch.tensor([0, 1, 4, 6, 9])
    g = _explicit_gram(x, t)
    V, c = refit(g, W, cols, 0.0, bias)
    design = x[:, cols].double()
    if bias:
        design = torch.cat([design, torch.ones(250, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, t.double()).solution
    tol = dict(atol=1e-5, rtol=1e-5)  # the Gram's float32 products
    torch.testing.assert_close(V, sol[:cols.numel()].T, **tol)
    if bias:
        torch.testing.assert_close(c, sol[-1], **tol)

    def direct(V, c):
        approx = x[:, cols].double() @ V.double().T + (0 if c is None else c)
        return float((t.double() - approx).pow(2).sum() / t.double().pow(2).sum())

    assert relative_error(g, W, cols, V, c) == pytest.approx(direct(V, c), rel=1e-6)
    assert relative_error(g, W, cols, W[:, cols].double(), None) == pytest.approx(
        direct(W[:, cols], None), rel=1e-6)
    for damping in (0.01, 1.0, 100.0):
        Vd, cd = refit(g, W, cols, damping, bias)
        assert direct(Vd, cd) <= direct(W[:, cols], None) + 1e-12


def test_explicit_local_targets_give_the_implicit_refit():
    torch.manual_seed(5)
    x, W, cols = torch.randn(120, 8), torch.randn(4, 8), torch.tensor([0, 3, 5])
    for bias in (False, True):
        implicit = refit(_gram(x), W, cols, 0.01, bias)
        explicit = refit(_explicit_gram(x, x @ W.T), W, cols, 0.01, bias)
        for a, b in zip(implicit, explicit):
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_dense_target_is_the_dense_models_residual_stream(tiny_model_dirs):
    """Last layer's refit with the dense target = a refit on hook-captured statistics of two
    independent HF forwards: the compensated model's sublayer inputs and residual stream, and the
    dense model's residual stream."""
    model, _ = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    units = engine.units
    m = units.split(_masks(units, 3, seed=3)[2].clone())
    mask = torch.cat([m.heads.flatten(), m.mlp.flatten()])
    mask_m = units.split(mask)
    ids = torch.randint(0, model.config.vocab_size, (10, 16))
    comp = compensate(engine, mask, ids,
                      CompensationSettings(compensate="sequential", compensate_damping=0.01,
                                           compensate_bias=True, compensate_target="dense",
                                           compensate_select="mask"),
                      progress=False)
    oracle = _hf_compensated(model, units, mask, comp.weights)
    last = units.n_layers - 1
    seen = {"dense": {}, "pruned": {}}

    def capture(net, store):
        layer = net.model.layers[last]
        put = lambda key: (lambda mod, inp, out: store.setdefault(key, []).append(  # noqa: E731
            (inp[0].detach(), out.detach())))
        return [layer.self_attn.o_proj.register_forward_hook(put("o")),
                layer.mlp.down_proj.register_forward_hook(put("down")),
                layer.register_forward_pre_hook(lambda mod, args, kwargs: store.setdefault(
                    "h", []).append((args[0] if args else kwargs["hidden_states"]).detach()),
                    with_kwargs=True)]

    hooks = capture(model, seen["dense"]) + capture(oracle, seen["pruned"])
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
            oracle(batch)
    for h in hooks:
        h.remove()
    grams = {}
    d, p = seen["dense"], seen["pruned"]
    for i in range(len(d["h"])):
        hd, hp = d["h"][i], p["h"][i]
        (_, ya_d), (xa_p, ya_p) = d["o"][i], p["o"][i]
        (_, ym_d), (xm_p, _) = d["down"][i], p["down"][i]
        targets = {"attn": (xa_p, hd + ya_d - hp), "mlp": (xm_p, hd + ya_d + ym_d - (hp + ya_p))}
        for name, (x, t) in targets.items():
            grams.setdefault(name, Gram(x.shape[-1], "cpu", t.shape[-1])).add(x, t)
    _assert_last_layer_refit_is(comp, model, units, mask_m, grams)


@pytest.mark.parametrize("correct_inputs", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_compensated_export_with_biases_reloads_both_ways(tiny_model_dirs, tmp_path, arch,
                                                            correct_inputs):
    model, tok = load_model(tiny_model_dirs[arch])
    engine = MaskedCausalLM(model, include_layers=True)
    mask = _masks(engine.units, 3, seed=0)[0]  # layer 0 keeps no heads
    ids = torch.randint(0, model.config.vocab_size, (8, 16))
    comp = compensate(engine, mask, ids,
                      CompensationSettings(compensate="sequential", compensate_bias=True,
                                           compensate_inputs=correct_inputs,
                                           compensate_select="mask"),
                      progress=False)
    assert any(k.endswith("up_proj.weight") for k in comp.weights) == correct_inputs
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


def _fake_stream(xp, xd):
    return SimpleNamespace(batches=list(xp.split(50)), dense=list(xd.split(50)))


def test_the_input_map_recovers_a_linear_drift():
    g = torch.Generator().manual_seed(0)
    xp = torch.randn(300, 8, generator=g)
    A = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g)
    record = {}
    M = input_map(_fake_stream(xp, xp @ A), lambda x: x, 1e-9, record, "mlp")
    torch.testing.assert_close(M, A, atol=1e-4, rtol=1e-4)
    assert record["mlp_drift_left"] < 1e-8
    # Damping pulls towards the identity, which leaves all the drift; no damping leaves more.
    for damping in (0.0, 0.1, 10.0, 1e6):
        unrelated = torch.randn(300, 8, generator=g)
        input_map(_fake_stream(xp, unrelated), lambda x: x, damping, record, "attn")
        assert 0 <= record["attn_drift_left"] <= 1 + 1e-9
    input_map(_fake_stream(xp, xp @ A), lambda x: x, 1e9, record, "attn")
    assert record["attn_drift_left"] == pytest.approx(1, abs=1e-6)


def test_input_correction_maps_the_pruned_inputs_onto_the_dense_ones(tiny_model_dirs):
    """Layer 0 reads the embeddings in both models, so its q/k/v are unchanged; the last layer's
    gate/up become W M^T with M fitted on the post-attention norm outputs of two independent HF
    forwards (the compensated export's and the dense model's)."""
    model, _ = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    units = engine.units
    mask = _masks(units, 3, seed=3)[2].clone()
    m = units.split(mask)
    mask = torch.cat([m.heads.flatten(), m.mlp.flatten()])  # every layer kept
    ids = torch.randint(0, model.config.vocab_size, (10, 16))
    comp = compensate(engine, mask, ids,
                      CompensationSettings(compensate="sequential", compensate_damping=0.01,
                                           compensate_inputs=True, compensate_bias=False,
                                           compensate_select="mask"),
                      progress=False)
    hd = units.shape.head_dim
    kv = units.kv_kept(units.split(comp.mask).heads[0]).nonzero().flatten()
    kv_rows = (kv[:, None] * hd + torch.arange(hd)).flatten()
    attn0 = model.model.layers[0].self_attn
    torch.testing.assert_close(comp.weights["model.layers.0.self_attn.k_proj.weight"],
                               attn0.k_proj.weight[kv_rows], atol=1e-6, rtol=1e-5)
    assert comp.layers[0]["attn_drift_left"] == 0
    last = units.n_layers - 1
    assert 0 < comp.layers[last]["mlp_drift_left"] < 1
    inputs = {}

    def keep(name):
        return lambda mod, inp, out: inputs.setdefault(name, []).append(out.reshape(-1, out.shape[-1]))
    pruned = pruned_model(model, units, comp.mask, comp.weights)
    hooks = [pruned.model.layers[last].post_attention_layernorm.register_forward_hook(keep("p")),
             model.model.layers[last].post_attention_layernorm.register_forward_hook(keep("d"))]
    with torch.no_grad():
        for batch in ids.split(8):
            pruned(batch)
            model(batch)
    for h in hooks:
        h.remove()
    xp, xd = torch.cat(inputs["p"]).double(), torch.cat(inputs["d"]).double()
    pp, eye = xp.T @ xp / len(xp), torch.eye(xp.shape[1], dtype=torch.float64)
    lam = 0.01 * pp.diagonal().mean()
    M = torch.linalg.solve(pp + lam * eye, xp.T @ xd / len(xp) + lam * eye)
    chans = units.split(comp.mask).mlp[last].nonzero().flatten()
    gate = model.model.layers[last].mlp.gate_proj.weight[chans].double()
    torch.testing.assert_close(comp.weights[f"model.layers.{last}.mlp.gate_proj.weight"].double(),
                               gate @ M.T, atol=2e-4, rtol=2e-3)


def test_bad_settings_are_named(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    mask = torch.ones(engine.units.n_units, dtype=torch.bool)
    ids = torch.randint(0, 100, (4, 8))
    with pytest.raises(CompensationError, match="damping must be >= 0"):
        compensate(engine, mask, ids, CompensationSettings(compensate_damping=-0.1))
    with pytest.raises(CompensationError, match="at least 1 calibration window"):
        compensate(engine, mask, ids[:0])
    with pytest.raises(CompensationError, match="one hard model-unit mask"):
        compensate(engine, mask[None], ids)
    with pytest.raises(CompensationError, match="target must be one of"):
        compensate(engine, mask, ids, CompensationSettings(compensate_target="global"))
    with pytest.raises(CompensationError, match="dense compensation target needs the sequential"):
        compensate(engine, mask, ids,
                   CompensationSettings(compensate="parallel", compensate_target="dense"))
    with pytest.raises(CompensationError, match="input correction needs the sequential mode"):
        compensate(engine, mask, ids,
                   CompensationSettings(compensate="parallel", compensate_inputs=True))
    base = dict(model="smollm2-135m", sparsity=0.3, out="/tmp/x")
    with pytest.raises(ConfigError, match="--compensate-damping"):
        check(PruneConfig(**base, compensate_damping=-1.0))
    with pytest.raises(ConfigError, match="--compensate-windows"):
        check(PruneConfig(**base, compensate_windows=0))
    with pytest.raises(ConfigError, match="--compensate-target dense needs --compensate seq"):
        check(PruneConfig(**base, compensate="parallel", compensate_target="dense"))
    with pytest.raises(ConfigError, match="--compensate-inputs needs --compensate sequential"):
        check(PruneConfig(**base, compensate="parallel", compensate_inputs=True))


# --------------------------------------------------------------------------- OBS channel selection

def _gram_of(X):
    from probprune.compensate import Gram

    g = Gram(X.shape[1], X.device)
    g.add(X)
    return g


def _refit_error(gram, W, cols):
    from probprune.compensate import refit, relative_error

    V, _ = refit(gram, W, cols, 0.0, False)
    return relative_error(gram, W, cols, V, None)


def test_obs_drops_the_column_whose_loss_the_others_refit_best():
    """One removal is exact OBS: the column dropped is the one whose least-squares refit on the
    others leaves the smallest error (brute force over every single removal)."""
    from probprune.compensate import obs_keep

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        X = torch.randn(200, 7, generator=g, dtype=torch.float64)
        X[:, 3] = X[:, 0] * 0.8 + 0.3 * X[:, 3]   # correlated columns: not the smallest norm wins
        W = torch.randn(5, 7, generator=g, dtype=torch.float64)
        gram = _gram_of(X)
        kept = obs_keep(gram, W, 6, 1e-9)
        errors = [_refit_error(gram, W, torch.tensor([c for c in range(7) if c != j]))
                  for j in range(7)]
        dropped = sorted(set(range(7)) - set(kept.tolist()))
        assert dropped == [min(range(7), key=errors.__getitem__)], (trial, errors)


def test_obs_keeps_a_set_that_reproduces_dependent_columns():
    """Three columns are exact linear combinations of five others: keeping five, OBS finds a set
    whose refit reproduces the dense output (magnitude would not: the combinations are large)."""
    from probprune.compensate import obs_keep

    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 5, generator=g, dtype=torch.float64)
    mix = torch.randn(5, 3, generator=g, dtype=torch.float64) * 3
    X = torch.cat([base, base @ mix], dim=1)
    W = torch.randn(4, 8, generator=g, dtype=torch.float64)
    gram = _gram_of(X)
    kept = obs_keep(gram, W, 5, 1e-10)
    assert kept.numel() == 5 and torch.equal(kept, kept.sort().values)
    assert _refit_error(gram, W, kept) < 1e-8


def test_centred_obs_drops_a_constant_column_that_the_bias_carries():
    """A column whose input is constant (the largest, by far, in the uncentred Gram) costs
    nothing when the refit fits a bias: centred OBS drops it and the refit with a bias is then
    exact; uncentred OBS keeps it."""
    from probprune.compensate import obs_keep

    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 6, generator=g, dtype=torch.float64)
    X[:, 2] = 5.0
    X[:, 5] = X[:, 0] - 0.5 * X[:, 1]  # so that one more column can go exactly
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    gram = _gram_of(X)
    kept = obs_keep(gram, W, 4, 1e-10, centred=True)
    assert 2 not in kept.tolist()
    V, c = refit(gram, W, kept, 0.0, True)
    assert relative_error(gram, W, kept, V, c) < 1e-10
    assert _direct_error(X, W, kept, V, c) < 1e-10
    assert 2 in obs_keep(gram, W, 4, 1e-10, centred=False).tolist()


def test_obs_selection_keeps_each_layers_count_and_the_export_is_its_mask(tiny_model_dirs,
                                                                           tmp_path):
    from probprune.compensate import compensate
    from probprune.export import export_pruned, pruned_model
    from probprune.forward import MaskedCausalLM
    from probprune.models import load_model, load_pruned

    model, tok = load_model(tiny_model_dirs["llama"])
    engine = MaskedCausalLM(model)
    units = engine.units
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(units.n_units, generator=g) < 0.6
    windows = torch.randint(0, model.config.vocab_size, (8, 16), generator=g)
    before = mask.clone()
    obs = compensate(engine, mask, windows,
                     CompensationSettings(compensate="sequential", compensate_select="obs",
                                          compensate_bias=False),
                     progress=False)
    plain = compensate(engine, mask, windows,
                       CompensationSettings(compensate="sequential", compensate_select="mask",
                                            compensate_bias=False),
                       progress=False)
    assert torch.equal(mask, before)  # the caller's mask is not edited
    assert torch.equal(plain.mask, mask)
    a, b = units.split(obs.mask), units.split(mask)
    assert torch.equal(a.heads, b.heads)
    assert torch.equal(a.mlp.sum(-1), b.mlp.sum(-1))  # the same count per layer
    assert not torch.equal(a.mlp, b.mlp)              # but other channels
    assert float(units.kept_params(obs.mask)) == float(units.kept_params(mask))
    out = export_pruned(model, tok, units, obs.mask, str(tmp_path), weights=obs.weights)
    ids = windows[:2]
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(out)(ids).logits,
                                   pruned_model(model, units, obs.mask, obs.weights)(ids).logits)


def test_a_run_with_obs_selection_exports_the_chosen_channels(tiny_model_dirs, calib_file,
                                                             tmp_path):
    import json

    from safetensors.torch import load_file

    from probprune.pipeline import prune
    from tests.test_pipeline import settings

    out = tmp_path / "run"
    report = prune(settings(tiny_model_dirs["qwen2"], calib_file, out, compensate="sequential",
                            compensate_select="obs", compensate_windows=6, speed_tokens=0))
    masks = load_file(str(out / "masks.safetensors"))
    exported, searched = masks["mask"].bool(), masks["searched_mask"].bool()
    assert not torch.equal(exported, searched)
    kept = json.load(open(out / "probprune.json"))["kept"]
    L, F = 3, 72
    channels = exported[-L * F:].view(L, F)
    for l in kept["layers"]:
        assert kept["channels"][str(l)] == channels[l].nonzero().flatten().tolist()
        assert len(kept["channels"][str(l)]) == int(searched[-L * F:].view(L, F)[l].sum())
    assert report["compensation"]["select"] == "obs"
    assert report["params"]["kept_prunable"] <= report["params"]["target_prunable"]
