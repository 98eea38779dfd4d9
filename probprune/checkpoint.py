"""A run's checkpoint (:class:`RunCheckpoint`) as one safetensors file: its tensors in the file,
everything else (the settings, the history, scalars, the nesting) as JSON in the file's metadata.

No pickle: reading a checkpoint runs no code, any safetensors reader opens it, and the JSON says
what it holds. One file, written atomically (:func:`probprune.files.atomic_write`), so a run
killed while writing keeps its previous checkpoint whole.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_write
from .search import SearchState

if TYPE_CHECKING:
    from .search import Search

log = logging.getLogger(__name__)

FORMAT = "probprune-checkpoint/1"
CHECKPOINT = "checkpoint.safetensors"  # in the run directory
LEGACY_CHECKPOINT = "checkpoint.pt"  # a pickle of probprune before this format
RNG_STREAMS = ("data_rng", "mask_rng")  # the search's batch and mask random streams
_TENSOR = "__tensor__"  # {"__tensor__": key}: the tensor stored under key


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back."""


def _encode(value: Any, tensors: Dict[str, torch.Tensor], where: str):
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # contiguous host copies: safetensors refuses views and tensors that share storage
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or _TENSOR in value:
            raise TypeError(f"checkpoint entry {where or '/'}: keys must be strings (JSON)")
        return {k: _encode(v, tensors, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint entry {where or '/'} is a {type(value).__name__}: only tensors, "
                    f"numbers, strings, None, lists and dicts are stored")


def _decode(value: Any, tensors: Dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_checkpoint(path: str, ckpt: Dict[str, Any]) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(ckpt, tensors, "")
    metadata = {"format": FORMAT, "tree": json.dumps(tree)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The dict :func:`save_checkpoint` wrote (tuples come back as lists), tensors on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors' own errors say little of which file
        raise CheckpointError(f"cannot read the checkpoint {path!r}: {e}") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a probprune checkpoint of format {FORMAT} "
                              f"(its metadata says {metadata.get('format')!r})")
    return _decode(json.loads(metadata["tree"]), tensors)


@dataclass
class RunCheckpoint:
    """What a killed run resumes from: the records fixed before the search started, and the
    search's progress. A resumed run ends exactly as the uninterrupted one would."""
    settings: dict                        # PruneConfig.as_dict(): a resume must match them
    dense: dict                           # the dense model's Perplexity.as_dict()
    init: dict                            # the init mask's (bare slice)
    channel_order: Optional[torch.Tensor]  # the search space's, ranked by the init metric
    policy: dict                          # PolicyState.state_dict(): host tensors
    search: SearchState
    # the search's random streams (RNG_STREAMS); None at a fresh start, whose are the seed's
    rng: Optional[Dict[str, torch.Tensor]] = None

    def at_step_of(self, search: Search) -> "RunCheckpoint":
        """This run's checkpoint at ``search``'s current step."""
        state = search.checkpoint()
        return dataclasses.replace(self, policy=state["policy"], search=search.state,
                                   rng={k: state[k] for k in RNG_STREAMS})

    def to_tree(self) -> dict:
        """The file's nesting: the search state's entries at the top level, beside the rest."""
        return {"settings": self.settings, "dense": self.dense, "init": self.init,
                "channel_order": self.channel_order, **self.search.to_dict(),
                "policy": self.policy, **(self.rng or {})}

    @classmethod
    def from_tree(cls, tree: dict) -> "RunCheckpoint":
        rng = {k: tree[k] for k in RNG_STREAMS} if RNG_STREAMS[0] in tree else None
        return cls(tree["settings"], tree["dense"], tree["init"], tree["channel_order"],
                   tree["policy"], SearchState.from_dict(tree), rng)

    def save(self, path: str) -> None:
        save_checkpoint(path, self.to_tree())

    @classmethod
    def load(cls, path: str) -> "RunCheckpoint":
        return cls.from_tree(load_checkpoint(path))


def read_checkpoint(cfg) -> Optional[RunCheckpoint]:
    """The checkpoint of the run directory ``cfg.out`` when resuming (None when there is none),
    after checking that the settings a resume must match are those of the checkpoint."""
    path = os.path.join(cfg.out, CHECKPOINT)
    if not cfg.resume:
        if os.path.exists(path):
            log.warning("%s holds a checkpoint; starting over (pass --resume to continue it)",
                        cfg.out)
        return None
    if not os.path.exists(path):
        if os.path.exists(os.path.join(cfg.out, LEGACY_CHECKPOINT)):
            raise ValueError(f"{cfg.out} holds a {LEGACY_CHECKPOINT} of an older probprune "
                             f"(a pickle, which this version does not read); start the run "
                             f"again without --resume")
        return None
    ckpt = RunCheckpoint.load(path)
    diff = cfg.resume_mismatch(ckpt.settings)
    if diff:
        raise ValueError(f"cannot resume {path}: settings differ from the checkpoint's in "
                         + ", ".join(diff))
    return ckpt
