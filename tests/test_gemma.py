"""Gemma 3 through its adapter: BOS windows, the sandwich-norm layer under any mask against the
physically sliced model, generation of the export, compensation through the out norms, and a
whole run. The parity of the forward with Hugging Face's (all-ones masks), the export and the
reload run for Gemma 3 with every family (``tests.conftest.ARCHS``)."""
import json

import pytest
import torch

from probprune.compensate import CompensationError, compensate
from probprune.data import eval_text, random_windows, tokenize_joined, with_bos
from probprune.evaluate import eval_windows, perplexity
from probprune.export import export_pruned, pruned_model
from probprune.families import family_of
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from probprune.settings import CompensationSettings


@pytest.fixture(scope="module")
def gemma(tiny_model_dirs):
    return load_model(tiny_model_dirs["gemma3"])


def _mask(units, seed, drop_layer=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(units.n_units, generator=g) > 0.35
    layers = slice(units.n_units - units.n_layers, units.n_units)
    mask[layers] = True
    if drop_layer is not None:
        mask[layers.start + drop_layer] = False
    return mask


def test_windows_start_with_bos_for_gemma_only(gemma, tiny_model_dirs):
    model, tok = gemma
    bos = family_of(model.config).window_bos(tok)
    assert bos == tok.bos_token_id is not None
    llama, llama_tok = load_model(tiny_model_dirs["llama"])
    assert family_of(llama.config).window_bos(llama_tok) is None
    ids = torch.arange(100, 200)
    w = random_windows(ids, 5, 16, seed=0, bos=bos)
    assert w.shape == (5, 16) and bool((w[:, 0] == bos).all())
    assert bool((w[:, 2:] - w[:, 1:-1] == 1).all())  # 15 consecutive text tokens after BOS
    e = eval_windows(ids, 16, stride=2, bos=bos)
    # the same 15 text tokens per window as without BOS at seqlen 15, every second window
    torch.testing.assert_close(e, with_bos(eval_windows(ids, 15, stride=2), bos))
    # without a BOS the windows are the LLaMA protocol's, unchanged
    torch.testing.assert_close(random_windows(ids, 5, 16, seed=0),
                               random_windows(ids, 5, 16, seed=0, bos=None))


@pytest.mark.parametrize("attn_units", ["kv-group", "query-head"])
def test_any_mask_gives_the_sliced_models_loss(gemma, tmp_path, attn_units):
    model, tok = gemma
    engine = MaskedCausalLM(model, include_layers=True, attn_units=attn_units)
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    for k, drop in enumerate((None, 1)):
        mask = _mask(engine.units, seed=k, drop_layer=drop)
        loss = engine.losses(ids, mask[None])[0]
        exported = load_pruned(export_pruned(model, tok, engine.units, mask, str(tmp_path / str(k))))
        with torch.no_grad():
            expected = exported(ids, labels=ids).loss
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_greedy_generation_of_the_export_is_the_masked_models(gemma, tmp_path):
    model, tok = gemma
    engine = MaskedCausalLM(model, include_layers=True)
    mask = _mask(engine.units, seed=4)
    in_memory = pruned_model(model, engine.units, mask)
    exported = load_pruned(export_pruned(model, tok, engine.units, mask, str(tmp_path / "e")))
    prompt = torch.tensor([[tok.bos_token_id, 5, 17, 42, 9]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        a = exported.generate(prompt, **kw)
        b = in_memory.generate(prompt, **kw)
    torch.testing.assert_close(a, b)
    # and every generated token is the masked forward's argmax: its loss on the generated text
    # equals the export's
    with torch.no_grad():
        expected = exported(a, labels=a).loss
    torch.testing.assert_close(engine.losses(a, mask[None])[0], expected, rtol=1e-5, atol=1e-6)


def test_compensation_refits_through_the_out_norms(gemma):
    """The refit matches each block's output before its out norm; the stream then moves on
    through the norm, so the sequential refit's own error (attn/mlp _refit) is below the bare
    slice's on every layer."""
    model, _ = gemma
    engine = MaskedCausalLM(model, include_layers=True)
    windows = torch.randint(0, model.config.vocab_size, (8, 24))
    mask = _mask(engine.units, seed=2)
    result = compensate(engine, mask, windows, CompensationSettings(), batch_size=4,
                        progress=False)
    for record in result.layers:
        assert record["attn_refit"] <= record["attn_bare"] + 1e-9
        assert record["mlp_refit"] <= record["mlp_bare"] + 1e-9
    with pytest.raises(CompensationError, match="Gemma3 norms it first"):
        compensate(engine, mask, windows, CompensationSettings(compensate_target="dense"),
                   progress=False)


@pytest.mark.parametrize("attn_units", ["kv-group", "query-head"])
def test_a_whole_run_records_bos_windows(tiny_model_dirs, calib_file, tmp_path, attn_units):
    from probprune.config import PruneConfig
    from probprune.pipeline import prune

    out = tmp_path / "run"
    report = prune(PruneConfig(model=tiny_model_dirs["gemma3"], sparsity=0.3, out=str(out),
                               attn_units=attn_units,
                               steps=4, k=2, batch_size=2, seqlen=24, calib=calib_file,
                               nsamples=12, val_windows=3, select_windows=3, eval=calib_file,
                               max_eval_windows=6, eval_every=2, progress=False, seed=1,
                               speed_tokens=0,
                               compensate_windows=8))
    assert all(record["bos"] for record in report["perplexity"].values())
    saved = json.loads((out / "report.json").read_text())
    assert saved["perplexity"]["pruned"]["bos"] is True
    # the reloaded export, evaluated by the same protocol, gives the report's figure
    model, tok = load_model(str(out))
    ids = tokenize_joined(tok, [eval_text(calib_file).text])
    again = perplexity(model, ids, seqlen=24, max_windows=6, progress=False,
                       bos=tok.bos_token_id)
    assert again.ppl == pytest.approx(report["perplexity"]["pruned"]["ppl"], rel=1e-4)


@pytest.mark.parametrize("backend", [b for b in ("reference", "triton")
                                     if b in __import__("probprune_kernels").backends()])
def test_every_backend_gives_the_references_losses(gemma, backend):
    """head_dim 16 here; the Triton attention pads the head to its block as for 256."""
    model, _ = gemma
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    reference = MaskedCausalLM(model, include_layers=True, backend="reference")
    engine = MaskedCausalLM(model, include_layers=True, backend=backend)
    masks = torch.stack([_mask(reference.units, seed=s, drop_layer=d)
                         for s, d in ((5, None), (6, 2))])
    torch.testing.assert_close(engine.losses(ids, masks), reference.losses(ids, masks),
                               rtol=1e-4, atol=1e-5)


def test_windows_beyond_the_sliding_window_are_refused_before_any_work(
        tiny_model_dirs, calib_file, tmp_path, gemma):
    from probprune.config import PruneConfig
    from probprune.pipeline import prune

    model, _ = gemma
    window = model.config.sliding_window  # 64 in the tiny config
    engine = MaskedCausalLM(model)
    engine.check_seqlen(window)  # within the window: plain causal attention, as the model does
    with pytest.raises(ValueError, match=f"--seqlen {window + 1} exceeds the model's sliding "
                                         f"window of {window} tokens"):
        engine.losses(torch.zeros(1, window + 1, dtype=torch.long), engine.all_ones())
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="sliding window"):
        prune(PruneConfig(model=tiny_model_dirs["gemma3"], sparsity=0.3, out=str(out), steps=2,
                          seqlen=window + 1, calib=calib_file, nsamples=4, val_windows=2,
                          select_windows=2, eval=calib_file, progress=False))
    assert not (out / "checkpoint.safetensors").exists()  # refused before the init
