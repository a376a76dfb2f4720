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
