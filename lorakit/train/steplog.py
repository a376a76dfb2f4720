"""metrics.jsonl records and the progress line of training steps, tokens counted without padding."""

from __future__ import annotations

import time

from rich.progress import Progress

from lorakit.data.batches import Blank
from lorakit.train.stats import StepStats


def count_tokens(batch: dict) -> int:
    """Tokens of a batch, padding excluded where an attention mask marks it (a :class:`Blank`: none)."""
    if isinstance(batch, Blank):
        return 0
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class StepLog:
    """metrics.jsonl records and the progress line for steps read back from the device (one step late,
    see :mod:`lorakit.train.stats`); tokens/s over the steps since the last record, padding excluded."""

    def __init__(self, trainer, progress: Progress, bar):
        """``trainer``: the :class:`lorakit.train.loop.Trainer` whose steps these are (its recipe,
        ``steps_per_epoch``, ``total_steps`` and ``log``)."""
        self.trainer, self.progress, self.bar = trainer, progress, bar
        self.tokens, self.t0 = 0, None  # t0: start of the first step since the last record

    def record(self, stats: StepStats) -> None:
        """Read ``stats`` (raises LorakitError for a non-finite step) and log it every ``log_every`` steps."""
        trainer, cfg = self.trainer, self.trainer.recipe.train
        loss, grad_norm = stats.read()
        self.tokens += stats.tokens
        self.t0 = stats.started if self.t0 is None else self.t0
        if stats.step % cfg.log_every == 0 or stats.step == trainer.total_steps:
            elapsed = time.perf_counter() - self.t0
            record = {"step": stats.step, "epoch": round(stats.step / trainer.steps_per_epoch, 4), "loss": loss,
                      "lr": stats.lr, "grad_norm": grad_norm, "tokens_per_s": self.tokens / max(elapsed, 1e-9)}
            trainer.log(record)
            self.tokens, self.t0 = 0, None
            self.progress.update(self.bar, info=f"loss {loss:.4f}  lr {stats.lr:.2e}  {record['tokens_per_s']:,.0f} tok/s")
        self.progress.update(self.bar, completed=stats.step)
