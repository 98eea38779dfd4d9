import math

import pytest
import torch

from probprune.data import DataError, tokenize_joined
from probprune.evaluate import eval_windows, perplexity
from probprune.models import load_model
from tests.conftest import ARCHS
from tests.tiny_models import CORPUS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_the_models_own_labels_loss(tiny_model_dirs, arch, batch_size):
    model, tok = load_model(tiny_model_dirs[arch])
    ids = tokenize_joined(tok, CORPUS * 4)
    seqlen = 16
    result = perplexity(model, ids, seqlen=seqlen, batch_size=batch_size, progress=False)
    n = ids.numel() // seqlen
    with torch.no_grad():  # the oracle: HF's own shifted loss, one window at a time
        losses = [model(w[None], labels=w[None]).loss for w in ids[: n * seqlen].view(n, seqlen)]
    expected = torch.stack(losses).double().mean().item()
    assert result.windows == n and result.tokens == n * (seqlen - 1)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_max_windows_and_tail(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    ids = torch.randint(0, 300, (100,))
    assert eval_windows(ids, 16).shape == (6, 16)  # the 4-token tail is dropped
    first = perplexity(model, ids, seqlen=16, max_windows=2, progress=False)
    direct = perplexity(model, ids[:32], seqlen=16, progress=False)
    assert first.windows == 2 and first.nll == pytest.approx(direct.nll, rel=1e-6)


def test_errors():
    with pytest.raises(DataError, match="fewer than one window of 128"):
        eval_windows(torch.arange(50), 128)
    with pytest.raises(DataError, match="seqlen must be at least 2"):
        eval_windows(torch.arange(50), 1)
    with pytest.raises(DataError, match="max_windows must be at least 1"):
        eval_windows(torch.arange(50), 8, max_windows=0)


def test_window_stride_takes_every_nth_window(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    ids = torch.randint(0, 300, (100,))  # 6 windows of 16: strides of 4 keep windows 0 and 4
    picked = eval_windows(ids, 16, stride=4)
    assert torch.equal(picked, torch.stack([ids[0:16], ids[64:80]]))
    strided = perplexity(model, ids, seqlen=16, stride=4, progress=False)
    joined = perplexity(model, torch.cat([ids[0:16], ids[64:80]]), seqlen=16, progress=False)
    assert strided.stride == 4 and strided.windows == 2
    assert strided.nll == pytest.approx(joined.nll, rel=1e-6)
    with pytest.raises(DataError, match="window stride must be at least 1"):
        eval_windows(ids, 16, stride=0)


def test_perplexity_never_builds_the_full_logits(tiny_model_dirs):
    """A causal LM is scored through its decoder and the chunked lm_head cross-entropy: the
    model's own forward (which builds [B, T, vocab] logits) is never called, and the result is
    still HF's loss."""
    model, tok = load_model(tiny_model_dirs["llama"])
    ids = tokenize_joined(tok, CORPUS * 4)
    expected = perplexity(_LogitsOnly(model), ids, seqlen=16, progress=False).nll

    def refuse(*args, **kwargs):
        raise AssertionError("the full-logits forward was called")

    model.forward = refuse
    assert perplexity(model, ids, seqlen=16, progress=False).nll == pytest.approx(expected, rel=1e-5)


class _LogitsOnly(torch.nn.Module):
    """A module that only returns ``.logits`` (no decoder/lm_head attributes): the generic path."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids)
