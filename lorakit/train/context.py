"""What a method's ``prepare`` hook sees of the training run (:class:`TrainContext`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console

from lorakit.data.batches import iterate_batches, shared_batches
from lorakit.loss import count_loss_items
from lorakit.world import World


@dataclass
class TrainContext:
    """What the ``prepare`` hook may use: the model, data, devices, a loss function and the world.

    ``batches`` yields this rank's share of each global batch of ``batch_size`` × world size rows (None
    for an empty share); ``global_items`` is the loss-item count of the whole global batch (every rank
    must call it, also for None), to pass to ``loss_fn(batch, items)``."""

    model: torch.nn.Module
    tokenizer: Any
    data: Any
    recipe: Any
    device: torch.device
    console: Console
    run_dir: Path
    loss_fn: Callable[..., torch.Tensor] = field(repr=False, default=None)
    world: World = field(default_factory=World)

    def batches(self, dataset, batch_size: int, seed: int = 0) -> Iterator[dict | None]:
        if self.world.size == 1:
            return iterate_batches(dataset, self.data.collate, batch_size, seed)
        return shared_batches(dataset, self.data.collate, batch_size, self.world.rank, self.world.size,
                              seed, blank=False)

    def global_items(self, batch: dict | None) -> int:
        items = 0 if batch is None else count_loss_items(batch, self.recipe.model.task)
        return int(self.world.all_reduce_sum(torch.tensor(items)).item()) if self.world.size > 1 else items
