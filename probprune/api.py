"""``probprune.prune``: the whole run from Python, on a model you already hold.

    import probprune
    result = probprune.prune(model, tokenizer, sparsity=0.3, steps=200)
    result.model          # the pruned model, in memory
    result.save("runs/smollm2-30")   # the directory `probprune-fast prune --out` writes

Its keywords are the command line's flags with underscores (``--batch-size`` is
``batch_size=``), with the same defaults (both come from :class:`probprune.config.PruneConfig`),
so the same settings and seed find the same mask as ``probprune-fast prune``.
"""
from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from typing import Optional

import torch
from safetensors.torch import load_file

from .config import PruneConfig


@dataclass
class PruneResult:
    """What a run gives back: the pruned model (the export, reloaded), its tokenizer, the
    model-unit mask it keeps and the keep-probabilities learnt for every unit (the order of
    :class:`probprune.units.UnitSpace`), the report (``report.json``), and the run directory."""
    model: torch.nn.Module
    tokenizer: object
    mask: torch.Tensor
    probs: torch.Tensor
    report: dict
    directory: str

    def save(self, out_dir: str) -> str:
        """Writes the run directory (the export, masks, scores, report, plots, checkpoint) to
        ``out_dir``: what ``probprune-fast prune --out out_dir`` writes."""
        if os.path.abspath(out_dir) != os.path.abspath(self.directory):
            shutil.copytree(self.directory, out_dir, dirs_exist_ok=True)
        return out_dir


# keyword -> PruneConfig field: each flag with underscores (``--max-windows``: max_windows), and
# each field's own name where its flag reads otherwise (max_eval_windows)
_SETTINGS = {f.name: f.name for f in fields(PruneConfig)}
_SETTINGS.update((PruneConfig.flag(f.name).lstrip("-").replace("-", "_"), f.name)
                 for f in fields(PruneConfig))


def prune(model, tokenizer=None, *, out: Optional[str] = None, **settings) -> PruneResult:
    """Prunes ``model``: a Hugging Face causal LM in memory (pruned on its device, in its dtype;
    never changed), or a name or path as ``--model`` takes it. ``tokenizer`` defaults to the
    model's own (``AutoTokenizer`` of its ``name_or_path``). ``out``: the run directory (default
    a new temporary one; :meth:`PruneResult.save` copies it). ``settings``: any ``prune`` flag
    as a keyword, ``sparsity=0.3, steps=200, batch_size=8, compensate="sequential"``..."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        hints = [f"{name} (did you mean {', '.join(close)}?)" if close else name
                 for name in unknown
                 for close in [difflib.get_close_matches(name, _SETTINGS, n=2)]]
        raise TypeError(f"prune() got unknown settings: {'; '.join(hints)}")
    settings = {_SETTINGS[key]: value for key, value in settings.items()}
    for reserved in ("model", "out"):
        settings.pop(reserved, None)
    in_memory = not isinstance(model, (str, os.PathLike))
    name = (getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
            or "in-memory model") if in_memory else os.fspath(model)
    out = out or tempfile.mkdtemp(prefix="probprune-")
    cfg = PruneConfig(model=name, out=out, **settings)

    from .models import load_pruned
    from .pipeline import prune as run

    report = run(cfg, model if in_memory else None, tokenizer if in_memory else None)
    pruned, tok = load_pruned(out, dtype=report["settings"]["dtype"],
                              device=report["settings"]["device"], with_tokenizer=True)
    masks = load_file(os.path.join(out, "masks.safetensors"))
    scores = load_file(os.path.join(out, "scores.safetensors"))
    return PruneResult(pruned, tok, masks["mask"].bool(), scores["probs"], report, out)
