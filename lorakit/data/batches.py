"""Collated batches of a dataset in a seeded order that depends only on (seed, epoch).

So a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


def iterate_batches(dataset, collate, batch_size: int, seed: int | None) -> Iterator[dict]:
    """Collated batches of ``dataset``; shuffled by ``seed`` (None keeps the order)."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield collate([dataset[int(i)] for i in order[start : start + batch_size]])


class MicroBatches:
    """Micro-batch number k (counting from 0 across epochs) in a fixed order: epoch e uses seed + e."""

    def __init__(self, dataset, collate, batch_size: int, seed: int):
        self.dataset, self.collate, self.batch_size, self.seed = dataset, collate, batch_size, seed
        self.per_epoch = math.ceil(len(dataset) / batch_size)
        self._epoch, self._order = -1, None

    def __getitem__(self, k: int) -> dict:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=gen)
        idx = self._order[pos * self.batch_size : (pos + 1) * self.batch_size]
        return self.collate([self.dataset[int(i)] for i in idx])
