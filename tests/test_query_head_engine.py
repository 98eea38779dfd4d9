"""Query-head units end to end: the K-mask forward against the Hugging Face forward and against
the physically sliced export (reloaded with and without trust_remote_code), generation with the
KV cache, and compensation."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.export import export_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from tests.conftest import ARCHS
from tests.test_export import generate_matches_recomputation


def _engine(path, **kw):
    model, tok = load_model(path)
    return model, tok, MaskedCausalLM(model, attn_units="query-head", **kw)


def _masks(units, seed):
    """Three masks: random query heads with layer 0 headless; a KV group left with one query
    head next to a whole one; every group of layer 1 at a different size."""
    G, hkv, hq = units.shape.q_per_kv, units.shape.n_kv_heads, units.shape.n_query_heads
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(3, units.n_units, generator=g) < 0.6
    heads = units.type_slices()["heads"]
    masks[:, heads] = masks[:, heads].clone()
    m = masks[:, heads].view(3, units.n_layers, hq)
    m[0, 0] = False                          # layer 0: no heads at all
    m[1, 0] = False
    m[1, 0, 0] = True                        # group 0 keeps only its first query head
    m[1, 0, G:2 * G] = True                  # group 1 keeps all of its query heads
    m[2, 1] = False
    for j in range(hkv):                     # layer 1: group j keeps j + 1 query heads
        m[2, 1, j * G: j * G + min(j + 1, G)] = True
    masks[:, heads] = m.reshape(3, -1)
    return masks


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_masks_give_the_hf_loss(tiny_model_dirs, arch):
    model, _, mm = _engine(tiny_model_dirs[arch], include_layers=True)
    assert mm.units.heads_per_layer == model.config.num_attention_heads
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        expected = model(ids, labels=ids).loss
    torch.testing.assert_close(mm.losses(ids, mm.all_ones(2)), expected.expand(2), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_any_mask_gives_the_sliced_models_loss(tiny_model_dirs, arch, tmp_path):
    model, tok, mm = _engine(tiny_model_dirs[arch])
    masks = _masks(mm.units, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    losses = mm.losses(ids, masks)
    for k in range(3):
        out = export_pruned(model, tok, mm.units, masks[k], str(tmp_path / str(k)))
        pruned = load_pruned(out)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        with torch.no_grad():
            expected = pruned(ids, labels=ids).loss
            torch.testing.assert_close(remote(ids).logits, pruned(ids).logits)
        torch.testing.assert_close(losses[k], expected, rtol=1e-5, atol=1e-6)
        # exactly the kept parameters survive, the shared K/V of a group counted once
        total = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in pruned.parameters()) == (
            total - mm.units.prunable_params + int(mm.units.kept_params(masks[k])))


def test_group_masks_agree_with_kv_group_units(tiny_model_dirs):
    """A query-head mask that keeps whole groups is the KV-group mask of those groups."""
    model, _, qh = _engine(tiny_model_dirs["llama3"])
    kv = MaskedCausalLM(model)
    groups = torch.rand(2, kv.units.n_units, generator=torch.Generator().manual_seed(4)) < 0.5
    gm = kv.units.split(groups)
    q_masks = torch.cat([kv.units.query_kept(gm.heads).flatten(1), gm.mlp.flatten(1)], dim=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    torch.testing.assert_close(qh.losses(ids, q_masks), kv.losses(ids, groups), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_generate_with_the_kv_cache_through_uneven_groups(tiny_model_dirs, tmp_path,
                                                          attn_implementation):
    model, tok, mm = _engine(tiny_model_dirs["llama3"])
    mask = _masks(mm.units, seed=2)[2]
    out = export_pruned(model, tok, mm.units, mask, str(tmp_path))
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                  attn_implementation=attn_implementation)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    seq = generate_matches_recomputation(pruned, ids)
    # and the uneven layer reads each query head's own KV head: the engine's loss
    with torch.no_grad():
        expected = pruned(seq, labels=seq).loss
    torch.testing.assert_close(mm.losses(seq, mask[None])[0], expected, rtol=1e-5, atol=1e-6)


def test_compensated_export_reloads_with_its_refit(tiny_model_dirs, tmp_path):
    from probprune.compensate import compensate
    from probprune.settings import CompensationSettings

    model, tok, mm = _engine(tiny_model_dirs["qwen2"])
    mask = _masks(mm.units, seed=3)[1]
    windows = torch.randint(0, model.config.vocab_size, (8, 16),
                            generator=torch.Generator().manual_seed(0))
    comp = compensate(mm, mask, windows,
                      CompensationSettings(compensate="sequential", compensate_damping=0.01,
                                           compensate_bias=False, compensate_select="mask"))
    for rec in comp.layers:  # the refit never reconstructs worse than the bare slice
        for part in ("attn", "mlp"):
            assert rec[f"{part}_refit"] <= rec[f"{part}_bare"] * (1 + 1e-6) + 1e-9
    out = export_pruned(model, tok, mm.units, mask, str(tmp_path), weights=comp.weights)
    pruned = load_pruned(out)
    ids = windows[:2]
    key = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(pruned.state_dict()[key], comp.weights[key])
    with torch.no_grad():
        assert torch.isfinite(pruned(ids, labels=ids).loss)


def test_a_whole_run_with_query_head_units(tiny_model_dirs, calib_file, tmp_path):
    """--attn-units query-head: the run searches query heads, meets the budget, and its export
    reloads to the reported perplexity."""
    from probprune.evaluate import model_nll
    from probprune.pipeline import calibration, prune
    from tests.test_pipeline import settings

    cfg = settings(tiny_model_dirs["llama3"], calib_file, tmp_path / "run", attn_units="query-head",
                   sparsity=0.4, init_attn_sparsity=0.3)
    report = prune(cfg)
    params = report["params"]
    assert params["kept_prunable"] <= params["target_prunable"]
    layers = report["layers"]
    assert any(l["q_heads"] % 4 for l in layers)  # some group lost single query heads
    pruned, tok = load_pruned(str(tmp_path / "run"), with_tokenizer=True)
    data = calibration(tok, cfg)
    assert model_nll(pruned, data.val, cfg.batch_size) == pytest.approx(
        report["val_loss"]["best"], rel=1e-5)


def test_init_metric_per_query_head_sums_to_the_groups(tiny_model_dirs):
    from probprune.importance import unit_metric

    model, _, qh = _engine(tiny_model_dirs["llama3"])
    kv = MaskedCausalLM(model)
    per_query = unit_metric(model, qh.units, "magnitude")
    per_group = unit_metric(model, kv.units, "magnitude")
    G, n_q = qh.units.shape.q_per_kv, qh.units.n_heads
    torch.testing.assert_close(per_query[:n_q].view(-1, G).sum(1), per_group[:kv.units.n_heads])
    w_o = model.model.layers[1].self_attn.o_proj.weight.detach().double().abs()
    hd = qh.units.shape.head_dim  # query head 5 of layer 1 by hand: its o_proj columns
    assert float(per_query[qh.units.heads_per_layer + 5]) == pytest.approx(
        float(w_o.mean(0)[5 * hd:6 * hd].sum()))
