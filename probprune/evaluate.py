"""Perplexity by the protocol of the pruning literature.

The evaluation text is joined and tokenised once, cut into non-overlapping windows of ``seqlen``
tokens (the tail shorter than a window is dropped), and the perplexity is exp of the mean NLL over
every predicted token (``seqlen - 1`` per window: the first token of a window has no context).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import probprune_kernels as pk

from .data import DataError, with_bos
from .families import UnsupportedModelError, family_of
from .forward import LOGIT_CHUNK_VALUES


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # predicted tokens that were scored
    windows: int
    seqlen: int
    stride: int = 1  # every stride-th non-overlapping window, from the first
    bos: bool = False  # each window a BOS token and seqlen - 1 tokens of text

    def as_dict(self):
        return asdict(self)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None,
                 stride: int = 1, bos: Optional[int] = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of a 1-D token tensor: every ``stride``-th one from
    the first, then the first ``max_windows`` of those. ``bos``: each window is that token and
    ``seqlen - 1`` tokens of text (:func:`probprune.data.with_bos`)."""
    if stride < 1:
        raise DataError(f"window stride must be at least 1, got {stride}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    text = seqlen - (bos is not None)
    n = ids.numel() // text
    if n == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                        f"of {seqlen}")
    windows = with_bos(ids[: n * text].view(n, text)[::stride], bos)
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be at least 1, got {max_windows}")
        windows = windows[:max_windows]
    return windows


def mean_nll(batch_nll: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
             batch_size: int = 8, progress: bool = True, desc: str = "evaluate") -> float:
    """The one evaluation loop: the mean next-token NLL over every predicted token of
    ``windows`` [N, T], from ``batch_nll(batch)``, the summed NLL of a batch (a 0-dim tensor).
    The total stays on the device (float64): one host sync at the end."""
    total = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        batch = windows[start:start + batch_size]
        n = batch[:, 1:].numel()
        nll = batch_nll(batch).double()
        total = nll if n_tokens == 0 else total + nll
        n_tokens += n
    return float(total) / n_tokens


def _as_perplexity(nll: float, windows: torch.Tensor, stride: int,
                   bos: Optional[int]) -> Perplexity:
    return Perplexity(ppl=math.exp(nll), nll=nll, tokens=windows[:, 1:].numel(),
                      windows=windows.shape[0], seqlen=windows.shape[1], stride=stride,
                      bos=bos is not None)


def _family_or_none(model):
    try:
        return family_of(model.config)
    except (AttributeError, UnsupportedModelError):  # no config, or a family of no adapter
        return None


def _model_batch_nll(model, device):
    """The summed NLL of a batch. A causal LM of a supported family (:mod:`probprune.families`)
    goes through the chunked lm_head cross-entropy: the [B, T, vocab] logits (200 MB for a batch
    of 8 windows of 128 with a 49k vocabulary, and as much again for their log-softmax) are never
    built. Any other module must return ``.logits``."""
    family = _family_or_none(model)
    inner = family.decoder(model) if family else None
    head = family.head(model) if family else None
    chunked = isinstance(head, torch.nn.Linear) and head.bias is None

    def batch_nll(batch):
        batch = batch.to(device)
        labels = batch[:, 1:].flatten()
        if chunked:
            h = inner(batch).last_hidden_state[:, :-1].reshape(1, labels.numel(), -1)
            chunk = max(1, LOGIT_CHUNK_VALUES // head.weight.shape[0])
            h = h.to(head.weight.device)  # a model spread over devices ends on lm_head's
            return pk.lm_head_ce(h, head.weight, labels.to(h.device), chunk_size=chunk,
                                 validate=False)[0] * labels.numel()
        logits = model(batch).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device), reduction="sum")
    return batch_nll


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 128, batch_size: int = 8,
               max_windows: Optional[int] = None, device=None, progress: bool = True,
               desc: str = "perplexity", stride: int = 1,
               bos: Optional[int] = None) -> Perplexity:
    """Perplexity of ``model`` (any module whose output has ``.logits``) on token ids ``ids``
    (windows of :func:`eval_windows`)."""
    windows = eval_windows(ids, seqlen, max_windows, stride, bos)
    device = device or next(model.parameters()).device
    nll = mean_nll(_model_batch_nll(model, device), windows, batch_size, progress, desc)
    return _as_perplexity(nll, windows, stride, bos)


@torch.no_grad()
def model_nll(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False,
              desc: str = "held-out loss") -> float:
    """Mean NLL of ``model`` on windows [N, T]: a pruned model's held-out loss, comparable with
    :func:`masked_nll`'s."""
    device = next(model.parameters()).device
    return mean_nll(_model_batch_nll(model, device), windows, batch_size, progress, desc)


@torch.no_grad()
def masked_perplexity(masked_model, mask: torch.Tensor, ids: torch.Tensor, seqlen: int = 128,
                      batch_size: int = 8, max_windows: Optional[int] = None,
                      progress: bool = True, desc: str = "masked perplexity",
                      stride: int = 1, bos: Optional[int] = None) -> Perplexity:
    """Perplexity of the model under one hard model-unit mask, through the masked forward (the
    same windows and token count as :func:`perplexity`)."""
    windows = eval_windows(ids, seqlen, max_windows, stride, bos)
    nll = masked_nll(masked_model, mask, windows, batch_size, progress, desc)
    return _as_perplexity(nll, windows, stride, bos)


@torch.no_grad()
def masked_nll(masked_model, mask: torch.Tensor, windows: torch.Tensor, batch_size: int = 8,
               progress: bool = False, desc: str = "held-out loss") -> float:
    """Mean NLL of the model under one hard model-unit mask on windows [N, T] (the search's
    held-out loss, and :func:`masked_perplexity`)."""
    masks = mask.to(masked_model.device)[None]

    def batch_nll(batch):  # the forward gives the mean over the batch's predicted tokens
        return masked_model.losses(batch, masks)[0].double() * batch[:, 1:].numel()

    return mean_nll(batch_nll, windows, batch_size, progress, desc)
