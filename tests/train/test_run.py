import json

import pytest

from tests.tiny_run import tiny_world  # noqa: F401 (fixture)

from lorakit.config import recipe_from_dict, recipe_to_dict
from lorakit.errors import LorakitError
from lorakit.train.run import check_resumable, keep_metrics_until


def recipe(**train):
    return recipe_to_dict(recipe_from_dict({"train": {"max_steps": 10, **train}}))


def test_resume_may_extend_but_not_change_the_optimization(tmp_path):
    check_resumable(recipe(), recipe(max_steps=20, eval_every=5), tmp_path)
    with pytest.raises(LorakitError, match=r"train\.learning_rate is 0\.1 here but 0\.0002"):
        check_resumable(recipe(), recipe(learning_rate=0.1), tmp_path)
    with pytest.raises(LorakitError, match=r"train\.batch_size"):
        check_resumable(recipe(), recipe(batch_size=3), tmp_path)


def test_precision_is_fixed_and_old_checkpoints_count_as_what_they_ran(tmp_path):
    with pytest.raises(LorakitError, match=r"train\.precision is 'fp32' here but 'auto'"):
        check_resumable(recipe(), recipe(precision="fp32"), tmp_path)
    old = recipe()
    del old["train"]["precision"]  # saved before the field existed: what auto means now
    check_resumable(old, recipe(), tmp_path)
    with pytest.raises(LorakitError, match=r"train\.precision"):
        check_resumable(old, recipe(precision="bf16"), tmp_path)


def test_metrics_after_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    keep_metrics_until(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_stale_temporary_folders_are_cleaned_and_a_swapped_out_folder_put_back(tmp_path):
    import os

    from lorakit.storage.checkpoint import clean_stale

    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000002.tmp-999999999").mkdir(parents=True)  # a write killed midway
    (run / "checkpoints" / ".latest.tmp-999999999").write_text("step-000002")
    (run / ".final.old-999999999").mkdir()  # killed between moving final aside and renaming the new one
    (run / "checkpoints" / f".step-000004.tmp-{os.getppid()}").mkdir()  # a live process: not touched
    done = clean_stale(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f".step-000004.tmp-{os.getppid()}"]
    assert (run / "final").is_dir() and len(done) == 3


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, tiny_world):
    from tests.helpers_cli import invoke
    from tests.tiny_run import tiny_recipe, write_recipe

    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000002.tmp-999999999").mkdir(parents=True)
    (run / "summary.json").write_text('{"before": {"eval_loss": 1.0}}')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')  # cut by the kill
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 2}))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    assert "stopped before its first checkpoint: starting again from step 0" in result.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2] and not (run / "checkpoints" / ".step-000002.tmp-999999999").exists()
    again = invoke("train", recipe)  # now it holds a run with checkpoints: refused, nothing touched
    assert again.exit_code == 1 and "already holds a run" in again.stderr


def test_a_training_run_holds_its_folder_until_it_ends(tmp_path, tiny_world, monkeypatch):
    import os
    import subprocess
    import sys

    import lorakit.train.run as run_module
    from lorakit.storage.runlock import check_free
    from tests.helpers_cli import invoke
    from tests.tiny_run import tiny_recipe, write_recipe

    run, seen = tmp_path / "run", []
    probe = "import sys; from lorakit.storage.runlock import check_free; check_free(sys.argv[1])"

    def from_another_process(run_dir, console):  # at each checkpoint (plot.redraw's place)
        seen.append(subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True))

    monkeypatch.setattr(run_module.plot, "redraw", from_another_process)
    recipe = write_recipe(tmp_path / "a.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 2, "save_every": 1}))
    assert invoke("train", recipe).exit_code == 0
    assert len(seen) >= 2 and all(r.returncode == 1 for r in seen), seen
    assert f"is in use by another lorakit process (PID {os.getpid()})" in seen[0].stderr
    check_free(run)  # released when the run ended


def test_an_overwrite_stopped_before_its_first_file_puts_the_old_run_back(tmp_path, tiny_world, monkeypatch):
    import lorakit.train.run as run_module
    from lorakit.errors import LorakitError
    from tests.helpers_cli import invoke, tree_hash
    from tests.tiny_run import tiny_recipe, write_recipe

    run = tmp_path / "run"
    first = write_recipe(tmp_path / "a.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 2}))
    assert invoke("train", first).exit_code == 0
    before = tree_hash(run)

    def fail(self, *args, **kwargs):  # the evaluation before training fails (or is stopped)
        raise LorakitError("evaluation failed")

    monkeypatch.setattr(run_module.Trainer, "evaluate", fail)
    second = write_recipe(tmp_path / "b.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 3}))
    result = invoke("train", second, "--overwrite")
    assert result.exit_code == 1 and "the old run is back in" in result.stderr, result.output
    assert tree_hash(run) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing hidden beside it


def test_overwrite_replaces_a_run(tmp_path, tiny_world):
    from tests.helpers_cli import invoke
    from tests.tiny_run import tiny_recipe, write_recipe

    run = tmp_path / "run"
    first = write_recipe(tmp_path / "a.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 2}))
    assert invoke("train", first).exit_code == 0
    (run / "checkpoints" / ".step-000009.tmp-1").mkdir()  # leftovers of an interrupted write are run files too
    second = write_recipe(tmp_path / "b.yaml", tiny_recipe(tiny_world, run, train={"max_steps": 3}))
    result = invoke("train", second, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "--overwrite: the old run in" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000003"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the old run is gone
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3]  # 0: the evaluation before training
