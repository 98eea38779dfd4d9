"""Refit-scored masks: each mask's output after a least-squares refit of its reading projection,
against closed-form solves and against the Hugging Face forward of the compensated export."""
import pytest
import torch
from torch import nn

import probprune_kernels as pk
from probprune.compensate import compensate, input_grams
from probprune.settings import CompensationSettings
from probprune.config import ConfigError, PruneConfig
from probprune.preflight import check
from probprune.export import pruned_model
from probprune.forward import MaskedCausalLM
from probprune.models import load_model
from probprune_kernels.layers import MaskedLlamaAttention, MaskedSwiGLUMLP
from tests.test_forward import _masks
from tests.test_layers import BACKENDS

DAMPING = 0.01


def _closed_form(C, W, S, damping=DAMPING):
    """V_S^T = (C_SS + lam I)^-1 (C_S: W^T + lam W_S^T), lam = damping * mean diag(C_SS)."""
    C, W = C.double(), W.double()
    C_SS = C[S][:, S]
    lam = damping * C_SS.diagonal().mean()
    A = C_SS + lam * torch.eye(len(S), dtype=torch.float64)
    return torch.linalg.solve(A, C[S] @ W.T + lam * W[:, S].T)


def _second_moment(x):
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / x.shape[0]


def _mlp(d=16, F=24, seed=0, backend=None):
    torch.manual_seed(seed)
    return MaskedSwiGLUMLP(nn.Linear(d, F, bias=False), nn.Linear(d, F, bias=False),
                           nn.Linear(F, d, bias=False), backend=backend)


def _channels(mlp, x):
    every = pk.compact_masks(torch.ones(1, mlp.n_units, dtype=torch.bool))
    return mlp.channel_outputs(x.reshape(1, -1, x.shape[-1]), *every)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_mlp_output_is_each_masks_closed_form_refit(backend):
    mlp = _mlp(backend=backend)
    C = _second_moment(_channels(mlp, torch.randn(400, 16)))
    masks = torch.rand(3, 24, generator=torch.Generator().manual_seed(1)) < 0.6
    masks[2] = False  # a mask with no channels: only the residual is left
    x = torch.randn(3, 7, 16)
    bare = mlp(x, masks)
    mlp.refit = pk.LeastSquaresRefit(mlp.down_proj.weight, C, DAMPING)
    out = mlp(x, masks)
    for k in range(2):
        S = masks[k].nonzero().flatten()
        h = _channels(mlp, x[k]).double()
        ref = h[:, S] @ _closed_form(C, mlp.down_proj.weight, S)
        torch.testing.assert_close(out[k].double(), ref, atol=1e-5, rtol=1e-4)
        assert (bare[k].double() - ref).abs().max() > 1e-2  # the refit is not the slice
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@torch.no_grad()
def test_all_kept_refit_is_the_dense_layer():
    mlp = _mlp()
    C = _second_moment(_channels(mlp, torch.randn(400, 16)))
    x = torch.randn(2, 5, 16)
    every = torch.ones(2, 24, dtype=torch.bool)
    dense = mlp(x, every)
    mixed = every.clone()
    mixed[1, ::3] = False  # so that the first mask's refit goes through the solve
    mlp.refit = pk.LeastSquaresRefit(mlp.down_proj.weight, C, DAMPING)
    torch.testing.assert_close(mlp(x, every), dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mlp(x, mixed)[0], dense[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_pruned_channels_that_copy_kept_ones_are_restored():
    mlp = _mlp()
    mlp.gate_proj.weight[12:] = mlp.gate_proj.weight[:12]
    mlp.up_proj.weight[12:] = mlp.up_proj.weight[:12]
    C = _second_moment(_channels(mlp, torch.randn(400, 16)))
    x = torch.randn(1, 9, 16)
    dense = mlp(x, torch.ones(1, 24, dtype=torch.bool))
    half = torch.zeros(1, 24, dtype=torch.bool)
    half[0, :12] = True
    assert (mlp(x, half) - dense).abs().max() > 1e-2
    mlp.refit = pk.LeastSquaresRefit(mlp.down_proj.weight, C, 1e-7)
    torch.testing.assert_close(mlp(x, half), dense, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_attention_refit_solves_over_whole_heads(backend):
    torch.manual_seed(0)
    d, H, Hkv, D = 32, 4, 2, 8
    lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
    attn = MaskedLlamaAttention(lin(d, H * D), lin(d, Hkv * D), lin(d, Hkv * D), lin(H * D, d),
                                H, Hkv, D, units="query-head", backend=backend)
    T = 6
    cos, sin = torch.ones(T, D), torch.zeros(T, D)
    every = attn.head_lists(torch.ones(1, H, dtype=torch.bool))
    o_all = attn.head_outputs(torch.randn(1, 20, T, d), cos, sin, every)
    C = _second_moment(o_all)
    masks = torch.tensor([[True, False, True, True], [False, True, False, False]])
    x = torch.randn(2, 1, T, d)
    attn.refit = pk.LeastSquaresRefit(attn.o_proj.weight, C, DAMPING, group=D)
    out = attn(x, cos, sin, masks)
    o = attn.head_outputs(x, cos, sin, attn.head_lists(torch.ones(2, H, dtype=torch.bool)))
    for k in range(2):
        heads = masks[k].nonzero().flatten()
        S = (heads[:, None] * D + torch.arange(D)).flatten()
        ref = o[k].double()[:, S] @ _closed_form(C, attn.o_proj.weight, S)
        torch.testing.assert_close(out[k].reshape(-1, d).double(), ref, atol=1e-5, rtol=1e-4)


def test_bad_refits_are_named():
    W = torch.randn(4, 6)
    with pytest.raises(ValueError, match="damping > 0"):
        pk.LeastSquaresRefit(W, torch.eye(6), 0.0)
    with pytest.raises(ValueError, match=r"gram must be \[6, 6\]"):
        pk.LeastSquaresRefit(W, torch.eye(5), DAMPING)
    with pytest.raises(ValueError, match="units of 4"):
        pk.LeastSquaresRefit(W, torch.eye(6), DAMPING, group=4)
    with pytest.raises(ConfigError, match="--search-loss refit needs --compensate-damping > 0"):
        check(PruneConfig(model="smollm2-135m", sparsity=0.3, out="/tmp/x", search_loss="refit",
                    compensate_damping=0.0))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_losses_are_the_parallel_compensated_exports(tiny_model_dirs, arch):
    """With refits from the dense input statistics, the engine's loss of each mask is the
    Hugging Face loss of that mask's parallel-mode compensated export (same windows, same
    damping, no bias)."""
    model, _ = load_model(tiny_model_dirs[arch])
    engine = MaskedCausalLM(model, include_layers=True)
    units = engine.units
    V = model.config.vocab_size
    calib = torch.randint(0, V, (10, 16), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    masks = _masks(units, 3, seed=2)
    bare = engine.losses(ids, masks)
    engine.use_refits(input_grams(engine, calib, batch_size=4, progress=False), DAMPING)
    scored = engine.losses(ids, masks)
    for k in range(3):
        comp = compensate(engine, masks[k], calib,
                          CompensationSettings(compensate="parallel", compensate_damping=DAMPING,
                                               compensate_bias=False, compensate_select="mask"),
                          batch_size=4, progress=False)
        with torch.no_grad():
            expected = pruned_model(model, units, masks[k], comp.weights)(ids, labels=ids).loss
        torch.testing.assert_close(scored[k], expected, atol=2e-4, rtol=2e-4)
    assert (scored - bare).abs().max() > 1e-3
    engine.use_refits(None)
    torch.testing.assert_close(engine.losses(ids, masks), bare)
