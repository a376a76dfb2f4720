"""The processes of one run (``torch.distributed``, launched by ``torchrun``), as the trainer and the
method hooks see them: a :class:`World` with this process's rank, the world size, and the reductions
they need. One process gets ``World()``: no process group, every reduction a no-op, so a
single-process run takes the same code path as before. Only :func:`start` reads the launcher's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); the wrapping (DDP, FSDP2) is
:mod:`lorakit.train.distributed`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800  # a collective waiting longer than this for a peer fails (never hangs)


def share_of(indices: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous part of ``indices`` split over ``size`` ranks (sizes differ by at most
    one; empty when there are fewer rows than ranks)."""
    return indices if size == 1 else torch.tensor_split(indices, size)[rank]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a ``DTensor``; a collective: every rank must call it), else
    ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class World:
    """The processes of one run: this one's ``rank`` (0 .. ``size`` − 1), its ``local_rank`` on its node
    (its GPU), and ``mode``: ``single`` (no process group), ``ddp`` or ``fsdp``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group exists (more than one process, or FSDP on one)."""
        return self.mode != "single" and dist.is_available() and dist.is_initialized()

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ---- collectives (no-ops on one process) -------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if self.active and self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (e.g. DyLoRA's rank drawn for a step)."""
        if not (self.active and self.size > 1):
            return value
        box = torch.tensor([value], dtype=torch.long)
        dist.broadcast(box, src=0)
        return int(box.item())

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite each tensor, in place, with rank 0's values."""
        if self.active and self.size > 1:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum ``.grad`` over ranks for parameters outside any DDP/FSDP wrapper (a missing gradient
        counts as zeros), so every rank steps with the gradient of the whole batch."""
        if not (self.active and self.size > 1):
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.active and self.size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (downloads, conversions into shared caches), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # ---- data -------------------------------------------------------------------------------------
    def share(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch's row ``indices`` (sizes differ by at most one;
        empty when the batch has fewer rows than ranks)."""
        return share_of(indices, self.rank, self.size)

    def gather_rng(self) -> dict[str, torch.Tensor] | None:
        """Every rank's torch RNG states in rank order, for a checkpoint (a collective: every rank calls
        it): ``{"torch": uint8 [size, n]}``, plus ``"cuda"`` (each rank's own GPU) when CUDA is
        available. None on one process."""
        if not (self.active and self.size > 1):
            return None
        mine = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            mine["cuda"] = torch.cuda.get_rng_state()
        out = {}
        for key, state in mine.items():
            parts = [torch.empty_like(state) for _ in range(self.size)]
            dist.all_gather(parts, state)  # CPU tensors: gloo (also beside NCCL, see start)
            out[key] = torch.stack(parts)
        return out

    def decorrelate_rng(self, seed: int, step: int, saved: dict[str, torch.Tensor] | None = None) -> None:
        """Give ranks other than 0 their own torch RNG stream (dropout masks differ per rank, as each
        rank's rows differ); rank 0 keeps its stream, which is the single-process one. ``saved``: the
        :meth:`gather_rng` of the checkpoint resumed from; when it has a row per rank of this world, each
        rank continues its own stream (a resumed run draws what the uninterrupted one would), otherwise
        the stream starts from ``seed`` and ``step``."""
        if self.rank == 0:
            return
        if saved is not None and saved["torch"].shape[0] == self.size:
            torch.set_rng_state(saved["torch"][self.rank].clone())
            if "cuda" in saved and torch.cuda.is_available() and saved["cuda"].shape[0] == self.size:
                torch.cuda.set_rng_state(saved["cuda"][self.rank].clone())
            return
        torch.manual_seed(seed + 7919 * self.rank + 104_729 * step)


def start(timeout_s: int = DEFAULT_TIMEOUT_S) -> World:
    """The world of this process: under ``torchrun`` (``WORLD_SIZE`` set) join the process group
    (gloo on CPU, NCCL for CUDA tensors, gloo for CPU ones), pin this process to GPU ``LOCAL_RANK``;
    otherwise ``World()``. The mode is settled later by :func:`resolve_mode`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or size == 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local, mode="ddp")


def close(world: World) -> None:
    if world.active:
        dist.destroy_process_group()
