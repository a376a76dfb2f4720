"""Collated batches of a dataset in a seeded order that depends only on (seed, epoch).

So a resumed run sees exactly the batches the uninterrupted run would have seen. On several processes
(:mod:`lorakit.train.distributed`) the order is that of the global batches (per-device rows × world
size), so it does not depend on the world size; each rank collates its contiguous share.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from lorakit.world import share_of


def batch_rows(n: int, batch_size: int, seed: int | None) -> Iterator[torch.Tensor]:
    """Row indices of each batch of ``batch_size`` over ``n`` rows, shuffled by ``seed`` (None: in order)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def iterate_batches(dataset, collate, batch_size: int, seed: int | None) -> Iterator[dict]:
    """Collated batches of ``dataset``; shuffled by ``seed`` (None keeps the order)."""
    for rows in batch_rows(len(dataset), batch_size, seed):
        yield collate([dataset[int(i)] for i in rows])


class Blank(dict):
    """A batch that carries no loss (labels all -100): what a rank whose share of a global batch is
    empty runs, so that every rank runs the same forwards and collectives."""


def blank_batch(dataset, collate, row: int) -> Blank:
    """Row ``row`` collated alone, its labels all -100."""
    batch = collate([dataset[row]])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    return Blank(batch)


def shared_batches(dataset, collate, batch_size: int, rank: int, size: int, seed: int | None = None,
                   blank: bool = True) -> Iterator[dict | None]:
    """Rank ``rank``'s share of each global batch of ``batch_size`` × ``size`` rows (in order, or shuffled
    by ``seed``); an empty share is a :class:`Blank` batch, or None when ``blank`` is off."""
    for rows in batch_rows(len(dataset), batch_size * size, seed):
        share = share_of(rows, rank, size)
        if len(share):
            yield collate([dataset[int(i)] for i in share])
        else:
            yield blank_batch(dataset, collate, int(rows[0])) if blank else None


class MicroBatches:
    """Micro-batch number k (counting from 0 across epochs) in a fixed order: epoch e uses seed + e.

    ``batch_size`` is the global micro-batch (per-device rows × ``size`` processes); rank ``rank`` gets
    its share, or a :class:`Blank` batch when its share is empty."""

    def __init__(self, dataset, collate, batch_size: int, seed: int, rank: int = 0, size: int = 1):
        self.dataset, self.collate, self.batch_size, self.seed = dataset, collate, batch_size, seed
        self.rank, self.size = rank, size
        self.per_epoch = math.ceil(len(dataset) / batch_size)
        self._epoch, self._order = -1, None

    def __getitem__(self, k: int) -> dict:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=gen)
        idx = self._order[pos * self.batch_size : (pos + 1) * self.batch_size]
        share = share_of(idx, self.rank, self.size)
        if len(share) == 0:
            return blank_batch(self.dataset, self.collate, int(idx[0]))
        return self.collate([self.dataset[int(i)] for i in share])
