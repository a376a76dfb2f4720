"""Ctrl-C and SIGTERM during training (lorakit.train.interrupt): one line, a checkpoint of the step reached,
exit 130 / 143, and --resume (here of the folder moved elsewhere) ends where an uninterrupted run ends."""

from __future__ import annotations

import shutil
import signal

import pytest
from safetensors.torch import load_file

from lorakit.train.interrupt import StopSignals, Stopped
from tests.helpers_cli import (invoke, lorakit_process, max_difference, reference_adapter,  # noqa: F401 (fixtures)
                               six_step_recipe)
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401


@pytest.mark.parametrize("name, code", [("INT", 130), ("TERM", 143)])
def test_a_signal_stops_with_a_checkpoint_and_resume_continues(tmp_path, tiny_world, reference_adapter, name, code):
    recipe = six_step_recipe(tiny_world, tmp_path / "a")
    proc = lorakit_process("train", recipe, kill_at=f"step:3={name}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run = tmp_path / "a" / "run"
    assert lines[-1] == (f"stopped (SIG{name}) at step 3; checkpoint {run}/checkpoints/step-000003; "
                         f"resume with: lorakit train {recipe} --resume")
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    moved = shutil.move(tmp_path / "a", tmp_path / "b")  # the folder moves; its recipe.yaml still names a/run
    result = invoke("train", moved / "recipe.yaml", f"output_dir={moved / 'run'}", "--resume")
    assert result.exit_code == 0, result.output
    assert f"started in {run} and continues in {moved / 'run'}" in result.stderr
    assert "Resuming from" in result.stderr and "at step 3" in result.stderr
    final = load_file(moved / "run" / "final" / "adapter.safetensors")
    assert max_difference(final, reference_adapter) <= 1e-6


def test_a_signal_inside_a_held_block_waits_for_its_end():
    stop = StopSignals()
    with stop.holding():
        stop._handle(signal.SIGINT, None)  # recorded, not raised: the step in flight finishes
        assert stop.requested == signal.SIGINT
        with pytest.raises(Stopped) as second:  # a second signal does not wait
            stop._handle(signal.SIGTERM, None)
        assert second.value.forced and second.value.exit_code == 143
    with pytest.raises(Stopped) as first:
        stop.check()
    assert first.value.exit_code == 130 and not first.value.forced
    stop.check()  # raised once
    with pytest.raises(Stopped) as outside:  # outside a held block (loading, evaluating): at once
        stop._handle(signal.SIGINT, None)
    assert not outside.value.forced


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) != before[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_after_the_ranks_voted_waits_for_the_next_vote(tmp_path, monkeypatch):
    """Several processes: a signal recorded on one rank after this step's vote (``_agree_on_stop``) is
    not acted on alone at this step (the other ranks, which voted to go on, would wait for it in the next
    step's collectives): it is taken at the next vote. Here rank 0 of a 2-process world with no peer."""
    import torch
    from rich.console import Console

    from lorakit.config import recipe_from_dict
    from lorakit.methods import build_method
    from lorakit.train.loop import Trainer
    from lorakit.world import World
    from tests.conftest import tiny_llama
    from tests.helpers import toy_data

    recipe = recipe_from_dict({"method": {"name": "lora", "r": 2}, "output_dir": str(tmp_path / "run"),
                               "train": {"batch_size": 2, "max_steps": 6, "save_every": None}})
    model = tiny_llama()
    method = build_method(recipe.method)
    method.attach(model, "causal_lm")
    trainer = Trainer(model, None, method, toy_data(), recipe, torch.device("cpu"), Console(quiet=True),
                      world=World(rank=0, size=2))
    vote = Trainer._agree_on_stop

    def signal_after_vote(self, stop):
        agreed = vote(self, stop)
        if self.step == 2:
            stop._handle(signal.SIGTERM, None)  # held: recorded only
        return agreed

    monkeypatch.setattr(Trainer, "_agree_on_stop", signal_after_vote)
    with StopSignals() as stop, pytest.raises(Stopped) as stopped:
        trainer.train(stop=stop)
    assert stopped.value.step == 3 and stopped.value.checkpoint.name == "step-000003"
