"""Fault injection: a tiny training run killed with SIGKILL (a real ``kill -9`` of the subprocess, at the
exact points of :mod:`lorakit.faults`) restarts with the same command, no manual step, and ends with the
same final adapter as a run never interrupted."""

from __future__ import annotations

import signal

from safetensors.torch import load_file

from tests.helpers_cli import (invoke, lorakit_process, max_difference, reference_adapter,  # noqa: F401 (fixtures)
                               six_step_recipe)
from tests.tiny_run import tiny_world  # noqa: F401

# Each run of the same command in the same folder is killed further on: before the first checkpoint
# (after summary.json), inside a checkpoint write (files written, not renamed), after the rename but
# before `latest`, between checkpoints, inside the write of final/. With each: what that run says first.
KILLS = [("step:1", "has no checkpoint yet: starting from step 0"),
         ("save:step-000002:written", "stopped before its first checkpoint: starting again from step 0"),
         ("save:step-000002:renamed", "interrupted write cleaned up: removed"),
         ("step:3", "Resuming from"),
         ("save:final:written", "Resuming from")]


def test_kill_9_anywhere_then_the_same_command_finishes_the_same_run(tmp_path, tiny_world, reference_adapter):
    recipe = six_step_recipe(tiny_world, tmp_path)
    run = tmp_path / "run"
    for point, said in KILLS:
        proc = lorakit_process("train", recipe, "--resume", kill_at=point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
        assert said in proc.stderr and "Traceback" not in proc.stderr, (point, proc.stderr[-3000:])
    assert list(run.rglob(".*.tmp-*")), "the last kill was inside a write"
    result = invoke("train", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "interrupted write cleaned up" in result.stderr and "Resuming from" in result.stderr
    assert not list(run.rglob(".*.tmp-*")) and not list(run.rglob(".*.old-*"))
    final = load_file(run / "final" / "adapter.safetensors")
    assert max_difference(final, reference_adapter) <= 1e-6


def test_a_deletion_is_held_against_ctrl_c_and_a_kill_inside_it_is_cleaned_up(tmp_path, tiny_world, reference_adapter):
    """train.save_total_limit 1: a SIGINT while step-000002 is being deleted waits for the deletion; a
    SIGKILL inside it leaves a folder named as unfinished, removed at the next start; the run ends as one
    never interrupted."""
    recipe = six_step_recipe(tiny_world, tmp_path)
    run, limit = tmp_path / "run", "train.save_total_limit=1"
    proc = lorakit_process("train", recipe, limit, kill_at="delete:step-000002:renamed=INT")
    assert proc.returncode == 130 and "stopped (SIGINT) at step 4" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000004"]
    proc = lorakit_process("train", recipe, limit, "--resume", kill_at="delete:step-000004:renamed")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")][0].startswith(".step-000004.del-")
    result = invoke("train", recipe, limit, "--resume")
    assert result.exit_code == 0, result.output
    assert "interrupted write cleaned up: removed" in result.stderr and "at step 6" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000006"]
    assert max_difference(load_file(run / "final" / "adapter.safetensors"), reference_adapter) <= 1e-6
