"""Export: a physically smaller directory that reloads in one call, with or without probprune."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.export import export_pruned
from probprune.models import load_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model
from tests.test_forward import _masks


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "qwen3"])
def test_parameter_accounting_and_remote_code_reload(tiny_model_dirs, tmp_path, arch):
    model, tok = load_model(tiny_model_dirs[arch])
    mm = MaskedCausalLM(model, include_layers=True)
    lay = mm.units
    mask = _masks(lay, 3, seed=3)[2]
    out = export_pruned(model, tok, lay, mask, str(tmp_path))
    total = sum(p.numel() for p in model.parameters())
    pruned = load_pruned(out)
    # Everything not prunable survives; of the prunable parameters exactly the kept ones do.
    assert sum(p.numel() for p in pruned.parameters()) == total - lay.prunable_params + int(
        lay.kept_params(mask))
    no_heads = _masks(lay, 3, seed=3)[0]  # layer 0 keeps no heads (Qwen3: but its q/k norms)
    headless = load_pruned(export_pruned(model, tok, lay, no_heads, str(tmp_path / "no_heads")))
    assert sum(p.numel() for p in headless.parameters()) == total - lay.prunable_params + int(
        lay.kept_params(no_heads))
    manifest = json.load(open(os.path.join(out, "probprune.json")))
    assert manifest["kept"]["layers"] == [0, 2]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == type(pruned).__name__
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, pruned(ids).logits)


def test_generate_through_a_layer_without_heads(tiny_model_dirs, tmp_path):
    model, tok = load_model(tiny_model_dirs["llama"])
    mm = MaskedCausalLM(model)
    mask = _masks(mm.units, 3, seed=0)[0]  # layer 0 keeps no heads
    pruned, ptok = load_pruned(export_pruned(model, tok, mm.units, mask, str(tmp_path)),
                               with_tokenizer=True)
    ids = ptok("The quick brown fox", return_tensors="pt").input_ids
    assert generate_matches_recomputation(pruned, ids).shape == (1, ids.shape[1] + 6)


def generate_matches_recomputation(model, ids, new_tokens: int = 6):
    """Greedy ``generate`` with the KV cache equals greedy decoding by full re-computation;
    returns the sequence."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    return seq


def test_load_pruned_rejects_a_plain_model(tiny_model_dirs):
    with pytest.raises(FileNotFoundError, match="not a probprune export"):
        load_pruned(tiny_model_dirs["llama"])
