"""Perplexity by the protocol of the pruning literature.

The evaluation text is joined and tokenised once, cut into non-overlapping windows of ``seqlen``
tokens (the tail shorter than a window is dropped), and the perplexity is exp of the mean NLL over
every predicted token (``seqlen - 1`` per window: the first token of a window has no context).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DataError


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # predicted tokens that were scored
    windows: int
    seqlen: int

    def as_dict(self):
        return asdict(self)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of a 1-D token tensor."""
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                        f"of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 128, batch_size: int = 8,
               max_windows: Optional[int] = None, device=None, progress: bool = True,
               desc: str = "perplexity") -> Perplexity:
    """Perplexity of ``model`` (any module whose output has ``.logits``) on token ids ``ids``."""
    windows = eval_windows(ids, seqlen, max_windows)
    device = device or next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens,
                      windows=windows.shape[0], seqlen=seqlen)


@torch.no_grad()
def masked_perplexity(masked_model, mask: torch.Tensor, ids: torch.Tensor, seqlen: int = 128,
                      batch_size: int = 8, max_windows: Optional[int] = None,
                      progress: bool = True, desc: str = "masked perplexity") -> Perplexity:
    """Perplexity of the model under one hard mask [n_units], through the masked forward (the
    same windows and token count as :func:`perplexity`)."""
    windows = eval_windows(ids, seqlen, max_windows)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress,
                      unit="batch", leave=False):
        batch = windows[start:start + batch_size]
        n = batch[:, 1:].numel()
        total_nll += float(masked_model.losses(batch, mask[None])[0]) * n
        total_tokens += n
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens,
                      windows=windows.shape[0], seqlen=seqlen)
