"""The best-evaluation tracker and early stopping (lorakit/train/keep.py): fed numbers, then whole runs whose
evaluations return a sequence the test controls."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.train.keep import BestTracker
from tests.helpers_cli import invoke
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401 (tiny_world: a fixture)


def feed(tracker: BestTracker, values: dict[int, float]) -> list[int]:
    """Feed ``{step: value}``; returns the steps at which the tracker said stop."""
    stops = []
    for step, value in values.items():
        tracker.update(step, {"eval_loss": value, "accuracy": value})
        if tracker.should_stop:
            stops.append(step)
    return stops


def test_lower_is_better_with_patience():
    tracker = BestTracker("eval_loss", greater_is_better=False, patience=2)
    assert feed(tracker, {2: 3.0, 4: 2.0, 6: 2.5}) == []
    assert (tracker.best_step, tracker.best_value, tracker.bad_evals) == (4, 2.0, 1)
    assert feed(tracker, {8: 2.0}) == [8]  # equal is no improvement
    assert "did not improve on 2 (step 4)" in tracker.stop_reason()


def test_an_improvement_resets_the_count_and_greater_is_better():
    tracker = BestTracker("accuracy", greater_is_better=True, patience=2)
    assert feed(tracker, {1: 0.5, 2: 0.4, 3: 0.6, 4: 0.6, 5: 0.59}) == [5]
    assert tracker.best_step == 3


def test_threshold_needs_a_larger_step_and_nan_never_improves():
    tracker = BestTracker("eval_loss", greater_is_better=False, patience=3, threshold=0.1)
    assert feed(tracker, {1: 2.0, 2: 1.95, 3: float("nan"), 4: 1.85}) == []
    assert (tracker.best_step, tracker.bad_evals) == (4, 0)  # 1.85 < 2.0 - 0.1
    assert feed(tracker, {5: 1.80, 6: 1.76, 7: 1.751}) == [7]


def test_no_patience_never_stops():
    tracker = BestTracker("eval_loss", greater_is_better=False)
    assert feed(tracker, {s: 1.0 + s for s in range(1, 20)}) == []
    assert tracker.best_step == 1


def test_state_round_trip_and_a_damaged_state():
    tracker = BestTracker("eval_loss", greater_is_better=False, patience=2)
    feed(tracker, {2: 3.0, 4: 3.5})
    again = BestTracker("eval_loss", greater_is_better=False, patience=2)
    again.load_state_dict(json.loads(json.dumps(tracker.state_dict())), "trainer.json")
    assert (again.best_value, again.best_step, again.bad_evals, again.last_step) == (3.0, 2, 1, 4)
    other = BestTracker("accuracy", greater_is_better=True)  # another metric: not continued
    other.load_state_dict(tracker.state_dict(), "trainer.json")
    assert other.best_step is None
    for bad in ({**tracker.state_dict(), "bad_evals": -1}, {**tracker.state_dict(), "best_value": "x"},
                {**tracker.state_dict(), "best_step": None}, [1, 2]):
        with pytest.raises(LorakitError, match="trainer.json: not a valid lorakit checkpoint file"):
            again.load_state_dict(bad, "trainer.json")


def test_a_metric_the_evaluation_lacks_is_named():
    with pytest.raises(LorakitError, match="metric_for_best accuracy.*eval_loss"):
        BestTracker("accuracy", True).update(1, {"eval_loss": 1.0})


# ---- whole runs with evaluations the test controls ----------------------------------------------------
def fake_evaluations(monkeypatch, losses: dict[int, float]) -> None:
    """Every evaluation at step s returns eval_loss ``losses[s]`` (9.0 where not given)."""
    from lorakit.train.loop import Trainer

    def evaluate(self, **options):
        return {"eval_loss": losses.get(self.step, 9.0), "perplexity": 1.0, "eval_tokens": 1}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


LOSSES = {2: 5.0, 4: 4.0, 6: 4.5, 8: 4.2, 10: 4.3, 12: 4.4}


def train(tmp_path, world, *args, **train_fields):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(world, tmp_path / "run", train={
        "max_steps": 12, "eval_every": 2, **train_fields}))
    result = invoke("train", recipe, *args)
    assert result.exit_code == 0, result.output
    return result, json.loads((tmp_path / "run" / "summary.json").read_text())


def test_early_stopping_keeps_the_best_and_loads_it(tmp_path, tiny_world, monkeypatch):
    fake_evaluations(monkeypatch, LOSSES)
    result, summary = train(tmp_path, tiny_world, early_stopping_patience=2, load_best_at_end=True,
                            save_total_limit=1)
    run = tmp_path / "run"
    assert "stopped early at step 8: eval_loss did not improve on 4 (step 4)" in result.stderr
    assert "best checkpoint step-000004 (eval_loss 4) loaded at the end" in result.stderr
    assert summary["steps"] == 8 and summary["stopped_early"]["step"] == 8
    assert summary["best"] == {"step": 4, "metric": "eval_loss", "value": 4.0,
                               "checkpoint": str(run / "checkpoints" / "step-000004"), "loaded_at_end": True}
    # limit 1, but the best is kept beside the newest; step 2 (a new best then) is gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000004", "step-000008"]
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 8
    final = load_file(run / "final" / "adapter.safetensors")
    best = load_file(run / "checkpoints" / "step-000004" / "adapter.safetensors")
    last = load_file(run / "checkpoints" / "step-000008" / "adapter.safetensors")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)  # the test could fail
    state = json.loads((run / "checkpoints" / "step-000008" / "trainer.json").read_text())["best"]
    assert (state["best_step"], state["bad_evals"]) == (4, 2)


def test_without_load_best_the_last_adapter_stays(tmp_path, tiny_world, monkeypatch):
    fake_evaluations(monkeypatch, LOSSES)
    result, summary = train(tmp_path, tiny_world, save_every=4, save_total_limit=2)
    run = tmp_path / "run"
    assert "stopped early" not in result.stderr and summary["steps"] == 12 and "stopped_early" not in summary
    assert summary["best"] == {"step": 4, "metric": "eval_loss", "value": 4.0, "loaded_at_end": False}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000008", "step-000012"]
    final = load_file(run / "final" / "adapter.safetensors")
    last = load_file(run / "checkpoints" / "step-000012" / "adapter.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_resume_continues_the_patience_count(tmp_path, tiny_world, monkeypatch):
    """6 steps (evaluations 5, 4, 4.5: one without improvement), then resumed to 12: the evaluation at 8
    is the second without improvement, so it stops at 8, as an uninterrupted run does."""
    fake_evaluations(monkeypatch, LOSSES)
    train(tmp_path, tiny_world, max_steps=6, early_stopping_patience=2)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000006" / "trainer.json").read_text())["best"]
    assert (state["best_step"], state["bad_evals"], state["last_step"]) == (4, 1, 6)
    result, summary = train(tmp_path, tiny_world, "--resume", early_stopping_patience=2)
    assert "stopped early at step 8" in result.stderr and summary["stopped_early"]["step"] == 8
    uninterrupted = tmp_path / "whole"
    uninterrupted.mkdir()
    _, whole = train(uninterrupted, tiny_world, early_stopping_patience=2)
    assert whole["stopped_early"] == summary["stopped_early"]
