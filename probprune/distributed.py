"""Mask-parallel search on torch.distributed (gloo on CPUs, NCCL on GPUs), launched by torchrun.

Every rank holds the model and the same random streams, so every rank draws the same batch and
the same K masks; rank r evaluates masks [r K/W, (r+1) K/W) and the K losses are all-gathered.
The update is then the same computation on the same numbers on every rank, so the probabilities
stay identical without being broadcast each step (the starting state is broadcast once from
rank 0, so a rank can never start from a different init). Rank 0 alone writes checkpoints, the
export and the report; the checkpoint holds no per-rank state, so a run resumes under any
world size.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective with the other ranks failed: another rank died or stopped answering."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {size}")
    return size


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, k: int) -> slice:
        """This rank's masks among the K of a step."""
        per = k // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (the first ``n % size`` ranks get one more),
        e.g. the held-out windows each rank scores."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a tensor of the same shape on each."""
        if self.size == 1:
            return local
        total = local.clone()
        self._collective("summing with the other ranks",
                         lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM))
        return total

    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, dist.DistError) as e:
            raise PeerFailure(f"rank {self.rank} of {self.size}: {what} with the other ranks "
                              f"failed ({' '.join(str(e).split())[:300]}); another rank has "
                              f"probably died: see its log") from e

    def gather_losses(self, local: torch.Tensor) -> torch.Tensor:
        """[K/W] losses of this rank's masks -> [K] losses of all masks, in mask order."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._collective("gathering the step's losses",
                         lambda: dist.all_gather(parts, local.contiguous()))
        return torch.cat(parts)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object; tensors travel on the CPU, so
        no rank receives a tensor on another rank's GPU)."""
        if self.size == 1:
            return obj
        box = [_on_cpu(obj) if self.is_main else None]
        self._collective("receiving rank 0's state", lambda: dist.broadcast_object_list(box, 0))
        return box[0]


SINGLE = World()


def _on_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def local_device(device: str) -> str:
    """A rank's device: cuda:LOCAL_RANK for a CUDA run under torchrun, else ``device``."""
    if device.startswith("cuda") and world_size_from_env() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def local_world_size_from_env() -> int:
    """The ranks on this machine (torchrun's LOCAL_WORLD_SIZE; WORLD_SIZE when unset)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size_from_env()))


def local_devices(devices: List[str]) -> List[str]:
    """A rank's share of this machine's ``--devices`` (all of them without torchrun): the list
    cut into LOCAL_WORLD_SIZE equal contiguous groups, group LOCAL_RANK
    (``cuda:0,cuda:1,cuda:2,cuda:3`` on 2 ranks: rank 1 gets cuda:2,cuda:3)."""
    size = local_world_size_from_env()
    if not devices or size == 1:
        return list(devices)
    n = len(devices) // size  # the config's check: the count is a multiple of the ranks here
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    return list(devices[rank * n:(rank + 1) * n])


def init_world(device: str, timeout_s: float) -> World:
    """The process group torchrun's environment describes (SINGLE without one). ``timeout_s``
    bounds every collective, so a rank that stops answering ends the others' wait."""
    size = world_size_from_env()
    if size == 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size())


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
