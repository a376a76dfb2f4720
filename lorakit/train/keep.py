"""Which evaluation is the best so far, and when to stop early (``train.metric_for_best``,
``greater_is_better``, ``load_best_at_end``, ``early_stopping_patience``, ``early_stopping_threshold``).

The rule, as HF Trainer's ``EarlyStoppingCallback`` and ``load_best_model_at_end``:

- an evaluation *improves* when its metric beats the best so far by more than the threshold
  (``value < best − threshold``, or ``value > best + threshold`` when greater is better); the first
  evaluation during training always improves. The evaluation before training does not count: it is
  no checkpoint of this run.
- with ``load_best_at_end``, an improving evaluation also writes a checkpoint at its step (when one
  is not written there anyway), so the best evaluation always has its checkpoint, whatever
  ``save_every`` is; :mod:`lorakit.storage.retention` never removes it. At the end the best
  checkpoint's adapter becomes ``final/``.
- with ``early_stopping_patience`` = p, training stops after p evaluations in a row that did not
  improve; the step reached gets a checkpoint and the summary says why.

The state (best value and step, evaluations without improvement) is stored in every training
checkpoint's ``trainer.json`` under ``"best"``, so ``--resume`` continues the count. Every rank of a
distributed run sees the same (all-reduced) metrics and so makes the same decisions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.markup import escape
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.storage import checkpoint as ckpt, retention
from lorakit.train import distributed as dist_


class BestTracker:
    """The best evaluation so far and the count of evaluations without improvement.

    ``metric``: a key of the evaluation dicts (``eval_loss``, ``accuracy``...); ``patience``: None for
    no early stopping; ``threshold`` ≥ 0, in the metric's units."""

    def __init__(self, metric: str, greater_is_better: bool, patience: int | None = None,
                 threshold: float = 0.0, save_best: bool = False):
        self.metric, self.greater = metric, greater_is_better
        self.patience, self.threshold, self.save_best = patience, threshold, save_best
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0  # evaluations in a row without improvement
        self.last_step: int | None = None  # the last evaluation taken, and its metrics
        self.last_metrics: dict = {}

    @classmethod
    def from_recipe(cls, train) -> "BestTracker":
        return cls(train.metric_for_best, bool(train.greater_is_better), train.early_stopping_patience,
                   train.early_stopping_threshold, train.load_best_at_end)

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than the threshold (a NaN never does)."""
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        if self.greater:
            return value > self.best_value + self.threshold
        return value < self.best_value - self.threshold

    def update(self, step: int, metrics: dict) -> bool:
        """Take the evaluation at ``step``; returns whether it is the new best.

        Raises LorakitError: ``metrics`` has no number for the metric (a method whose evaluation
        returns other keys)."""
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise LorakitError(f"train.metric_for_best {self.metric}: the evaluation has no such number "
                               f"(it has {', '.join(sorted(metrics))})")
        self.last_step, self.last_metrics = step, metrics
        if self.improves(float(value)):
            self.best_value, self.best_step, self.bad_evals = float(value), step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether the patience is used up (never without ``patience``)."""
        return self.patience is not None and self.bad_evals >= self.patience

    def stop_reason(self) -> str:
        """Why training stopped early, one phrase (after :attr:`should_stop`)."""
        return (f"{self.metric} did not improve on {self.best_value:.4g} (step {self.best_step}) by more than "
                f"{self.threshold:g} for {self.bad_evals} evaluations")

    def best_checkpoint(self, run_dir: Path) -> Path | None:
        """The checkpoint folder of the best evaluation (with ``save_best``; else None)."""
        if not self.save_best or self.best_step is None:
            return None
        return Path(run_dir) / "checkpoints" / f"step-{self.best_step:06d}"

    # ---- trainer.json -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"metric", "greater_is_better", "best_value", "best_step", "bad_evals", "last_step"}`` (JSON)."""
        return {"metric": self.metric, "greater_is_better": self.greater, "best_value": self.best_value,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "last_step": self.last_step}

    def load_state_dict(self, state: dict | None, origin: str) -> None:
        """Continue from a checkpoint's state (None: a checkpoint written before this existed: start
        afresh). A state for another metric or direction is not continued (the recipe check refuses
        that change; an old checkpoint may have none).

        Raises LorakitError naming ``origin`` when the state is not what lorakit writes."""
        if state is None:
            return
        value, step, bad, last = (state.get(k) if isinstance(state, dict) else None
                                  for k in ("best_value", "best_step", "bad_evals", "last_step"))
        ok = (isinstance(state, dict)
              and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                     and math.isfinite(value)))
              and all(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 0) for n in (step, last))
              and (value is None) == (step is None)
              and isinstance(bad, int) and not isinstance(bad, bool) and bad >= 0)
        if not ok:
            raise LorakitError(f"{origin}: not a valid lorakit checkpoint file (best)")
        if state.get("metric") != self.metric or state.get("greater_is_better") != self.greater:
            return
        self.best_value = None if value is None else float(value)
        self.best_step, self.bad_evals, self.last_step = step, bad, last


# ---- what the trainer does with it ----------------------------------------------------------------------
def take(trainer, metrics: dict) -> bool:
    """Update the trainer's tracker with an evaluation at its step; returns whether it is the new best.
    On several processes rank 0's tracker state is then copied to every rank, so all ranks decide alike
    (they see the same all-reduced metrics anyway)."""
    tracker = trainer.best
    improved = tracker.update(trainer.step, metrics)
    if trainer.world.size > 1:
        value = math.nan if tracker.best_value is None else tracker.best_value
        step = -1 if tracker.best_step is None else tracker.best_step
        box = torch.tensor([value, step, tracker.bad_evals, improved], dtype=torch.float64)
        trainer.world.broadcast_tensors([box])
        value, step, bad, improved = box.tolist()
        tracker.best_value = None if math.isnan(value) else value
        tracker.best_step, tracker.bad_evals = (None if step < 0 else int(step)), int(bad)
        improved = bool(improved)
    return improved


def judge(trainer, metrics: dict) -> tuple[bool, bool]:
    """Take an evaluation during training (:func:`take`): (write a checkpoint for a new best, stop early
    now); stopping prints one line."""
    tracker = trainer.best
    improved = take(trainer, metrics)
    stop = tracker.should_stop
    if stop:
        reason = tracker.stop_reason()
        trainer.ending["stopped_early"] = {"step": trainer.step, "reason": reason}
        trainer.console.print(f"stopped early at step {trainer.step}: {reason} (train.early_stopping_patience)",
                              markup=False, highlight=False, soft_wrap=True)
    return improved and tracker.save_best, stop


def prune(trainer) -> None:
    """Remove the checkpoint folders beyond ``train.save_total_limit`` (the best one kept with
    ``load_best_at_end``; :mod:`lorakit.storage.retention`), one dim line each. Rank 0 calls it."""
    best = trainer.best.best_checkpoint(trainer.run_dir)
    for gone in retention.prune(trainer.run_dir, trainer.recipe.train.save_total_limit, [best] if best else []):
        trainer.console.print(f"[dim]removed {escape(str(gone))} (train.save_total_limit)[/dim]", soft_wrap=True)


def load_best(trainer, metrics: dict) -> dict:
    """With ``load_best_at_end``: load the best checkpoint's adapter and method state into the model (so
    ``final/`` is it) and return its held-out metrics (evaluated again); one line says so. A best
    evaluation without its checkpoint (load_best_at_end turned on at a resume) leaves the model as it
    is, with a warning. Otherwise returns ``metrics``."""
    tracker = trainer.best
    path = tracker.best_checkpoint(trainer.run_dir)
    if path is None:
        return metrics
    said = f"best checkpoint {path.name} ({tracker.metric} {tracker.best_value:.4g})"
    if tracker.best_step == trainer.step:
        line = f"{said} is the last one: final/ holds it"
    elif not (path / ckpt.ADAPTER_FILE).is_file():
        trainer.console.print(f"[yellow]warning:[/] {escape(said)} is missing; final/ holds the last step's adapter",
                              highlight=False, soft_wrap=True)
        return metrics
    else:
        trainer.method.load_state_dict(ckpt.read_checkpoint_meta(path)[1])
        if trainer.world.mode == "fsdp":
            dist_.load_full_state(trainer.model, load_file(str(path / ckpt.ADAPTER_FILE)))
        else:
            ckpt.load_adapter_weights(trainer.model, path / ckpt.ADAPTER_FILE)
        metrics = trainer.evaluate()
        line = f"{said} loaded at the end"
    trainer.ending["best"] = {"step": tracker.best_step, "metric": tracker.metric, "value": tracker.best_value,
                              "checkpoint": str(path), "loaded_at_end": True}
    trainer.console.print(line, markup=False, highlight=False, soft_wrap=True)
    return metrics


def summary_record(trainer) -> dict:
    """``best`` (the best evaluation during training, when there was one) and ``stopped_early`` for
    summary.json."""
    tracker, out = trainer.best, dict(trainer.ending)
    if "best" not in out and tracker.best_step is not None:
        out["best"] = {"step": tracker.best_step, "metric": tracker.metric, "value": tracker.best_value,
                       "loaded_at_end": False}
    return out
