"""train.save_total_limit's folder side and --overwrite's checks (lorakit/storage/retention.py)."""

from __future__ import annotations

import os

import pytest

from lorakit.errors import LorakitError
from lorakit.storage import retention
from lorakit.storage.checkpoint import clean_stale, latest_checkpoint, mark_latest


def make_run(tmp_path, steps, latest=None):
    run = tmp_path / "run"
    for step in steps:
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "adapter.safetensors").write_bytes(b"x")
    if steps:
        mark_latest(run, run / "checkpoints" / f"step-{(latest or max(steps)):06d}")
    return run


def names(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_the_oldest_go_first_and_the_newest_stays(tmp_path):
    run = make_run(tmp_path, [2, 4, 6, 8, 10])
    removed = retention.prune(run, 2)
    assert [p.name for p in removed] == ["step-000002", "step-000004", "step-000006"]
    assert names(run) == ["latest", "step-000008", "step-000010"]
    assert retention.prune(run, None) == [] and retention.prune(run, 5) == []


def test_the_best_is_kept_within_the_limit_and_beside_the_newest_at_limit_1(tmp_path):
    run = make_run(tmp_path, [2, 4, 6, 8, 10])
    best = run / "checkpoints" / "step-000004"
    retention.prune(run, 3, [best])
    assert names(run) == ["latest", "step-000004", "step-000008", "step-000010"]
    retention.prune(run, 1, [best])
    assert names(run) == ["latest", "step-000004", "step-000010"]


def test_the_folder_latest_names_is_kept_and_steps_sort_by_number(tmp_path):
    run = make_run(tmp_path, [8, 10, 1000000], latest=8)  # seven digits sort after six
    retention.prune(run, 1)
    assert names(run) == ["latest", "step-000008", "step-1000000"]


def test_only_folders_lorakit_names_are_touched(tmp_path):
    run = make_run(tmp_path, [2, 4])
    checkpoints = run / "checkpoints"
    (checkpoints / "step-2").mkdir()  # not six digits
    (checkpoints / "step-000001-mine").mkdir()
    (checkpoints / "step-000000").write_text("a file")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", checkpoints / "step-000003")
    retention.prune(run, 1)
    assert names(run) == ["latest", "step-000000", "step-000001-mine", "step-000003", "step-000004", "step-2"]
    assert (tmp_path / "elsewhere").is_dir()


def test_a_deletion_cut_short_looks_unfinished_and_is_cleaned(tmp_path, monkeypatch):
    run = make_run(tmp_path, [2, 4])

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt  # killed after the rename, inside rmtree

    monkeypatch.setattr(retention.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        retention.prune(run, 1)
    monkeypatch.undo()
    leftover = f".step-000002.del-{os.getpid()}"
    assert names(run) == [leftover, "latest", "step-000004"]
    assert latest_checkpoint(run).name == "step-000004"
    assert clean_stale(run) == [f"removed {run / 'checkpoints' / leftover}"]
    assert names(run) == ["latest", "step-000004"]


# ---- --overwrite --------------------------------------------------------------------------------------
def test_a_run_folder_is_moved_aside_and_an_empty_one_reused(tmp_path):
    run = make_run(tmp_path, [2])
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoints" / ".step-000004.tmp-123").mkdir()
    aside = retention.move_aside(run)
    assert not run.exists() and aside.name == f".run.overwritten-{os.getpid()}" and (aside / "metrics.jsonl").is_file()
    (tmp_path / "empty").mkdir()
    assert retention.move_aside(tmp_path / "empty") is None and (tmp_path / "empty").is_dir()
    assert retention.move_aside(tmp_path / "absent") is None


@pytest.mark.parametrize("case", ["foreign-file", "no-run-files", "hidden-foreign-file", "a-link", "working-folder"])
def test_a_folder_that_is_no_run_is_refused(tmp_path, monkeypatch, case):
    run = make_run(tmp_path, [2])
    if case == "foreign-file":
        (run / "thesis.tex").write_text("years of work")
        expect = "holds 'thesis.tex'"
    elif case == "no-run-files":
        run = tmp_path / "home"
        run.mkdir()
        (run / "curves.png").write_text("")
        expect = "has no checkpoints/"
    elif case == "hidden-foreign-file":
        run.mkdir(exist_ok=True)
        (run / ".bashrc").write_text("alias ll=ls")
        (run / "summary.json").write_text("{}")
        expect = "holds '.bashrc'"
    elif case == "a-link":
        os.symlink(run, tmp_path / "link")
        run, expect = tmp_path / "link", "is a link"
    else:
        monkeypatch.chdir(run / "checkpoints")
        expect = "working folder"
    with pytest.raises(LorakitError, match=expect):
        retention.move_aside(run)
    assert run.exists()


def test_leftovers_of_a_killed_overwrite_are_removed_only_when_they_are_runs(tmp_path):
    make_run(tmp_path, [2])
    os.replace(tmp_path / "run", tmp_path / ".run.overwritten-999999999")  # a dead process's
    make_run(tmp_path, [2])
    os.replace(tmp_path / "run", tmp_path / f".run.overwritten-{os.getppid()}")  # a live one's: in use
    (tmp_path / ".run.overwritten-999999998").mkdir()
    (tmp_path / ".run.overwritten-999999998" / "mine.txt").write_text("not a run")
    (tmp_path / ".other.overwritten-999999999").mkdir()  # another run's name
    removed = retention.clean_overwritten(tmp_path / "run")
    assert [p.name for p in removed] == [".run.overwritten-999999999"]
    assert {p.name for p in tmp_path.iterdir()} == {".other.overwritten-999999999", ".run.overwritten-999999998",
                                                     f".run.overwritten-{os.getppid()}"}


@pytest.mark.parametrize("make, expect", [
    (lambda run: (run / "checkpoints" / "epoch=9.ckpt").write_text("weights"), "checkpoints/epoch=9.ckpt"),  # Lightning's
    (lambda run: (run / "checkpoints" / "step-000004").mkdir(), "checkpoints/step-000004"),  # no adapter in it
    (lambda run: (run / "checkpoints" / "step-000004").write_text("a file"), "checkpoints/step-000004"),
    (lambda run: (run / "final").mkdir(), "'final'"),
    (lambda run: (run / "metrics.jsonl").mkdir(), "'metrics.jsonl'"),
    (lambda run: (run / "summary.json").mkdir(), "'summary.json'"),
    (lambda run: (run / "curves.png").mkdir(), "'curves.png'"),
])
def test_entries_with_a_run_name_but_other_content_are_refused(tmp_path, make, expect):
    run = make_run(tmp_path, [2])
    make(run)
    with pytest.raises(LorakitError, match=f"does not look like a lorakit run folder .it holds .*{expect}"):
        retention.move_aside(run)
    assert run.is_dir() and (run / "checkpoints" / "step-000002" / "adapter.safetensors").is_file()


def test_a_folder_of_only_lightning_checkpoints_is_refused(tmp_path):
    run = tmp_path / "foreign"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "epoch=9.ckpt").write_text("weights")
    with pytest.raises(LorakitError, match="holds 'checkpoints/epoch=9.ckpt'"):
        retention.move_aside(run)
    assert (run / "checkpoints" / "epoch=9.ckpt").read_text() == "weights"


def test_what_a_run_writes_passes_the_content_check(tmp_path):
    run = make_run(tmp_path, [2, 4])
    (run / "final").mkdir()
    (run / "final" / "adapter.safetensors").write_bytes(b"x")
    for name in ("metrics.jsonl", "summary.json", "curves.png", ".lock", ".summary.json.tmp-12"):
        (run / name).write_text("")
    (run / "tensorboard" / "events").mkdir(parents=True)
    (run / "checkpoints" / ".step-000006.tmp-123").mkdir()
    assert retention.foreign_entry(run) is None
    retention.check_overwritable(run)
    only_lock = tmp_path / "fresh"
    only_lock.mkdir()
    (only_lock / ".lock").write_text("1\n")  # a run killed before its first file: reused as it is
    assert retention.move_aside(only_lock) is None and (only_lock / ".lock").is_file()


def test_a_linked_checkpoints_or_final_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    retention.check_links(run)
    (tmp_path / "bigdisk").mkdir()
    for name in ("checkpoints", "final"):
        os.symlink(tmp_path / "bigdisk", run / name)
        with pytest.raises(LorakitError, match=f"{name}/ is a link"):
            retention.check_links(run)
        (run / name).unlink()


def test_an_aside_goes_back_only_while_the_new_folder_holds_nothing_but_its_lock(tmp_path):
    run = make_run(tmp_path, [2])
    aside = retention.move_aside(run)
    run.mkdir()
    (run / ".lock").write_text("1\n")
    assert retention.put_back(aside, run) and not aside.exists()
    assert names(run) == ["latest", "step-000002"] and not (run / ".lock").exists()
    aside = retention.move_aside(run)
    run.mkdir()
    (run / "summary.json").write_text("{}")  # the new run has written: the old one stays aside
    assert not retention.put_back(aside, run) and aside.is_dir() and (run / "summary.json").is_file()
