"""The run folder's lock (lorakit/storage/runlock.py), held by a real second process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from lorakit.errors import LorakitError
from lorakit.storage.runlock import LOCK_FILE, RunLock, check_free

HOLDER = ("import sys; from lorakit.storage.runlock import RunLock; lock = RunLock(); lock.take(sys.argv[1]); "
          "print('held', flush=True); sys.stdin.read()")


@contextlib.contextmanager
def held_by_another_process(run_dir):
    """A second Python process holding ``run_dir``'s lock until the block ends; yields its PID."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"  # waits for the lock, no sleep
        yield child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def test_a_folder_held_by_another_process_is_refused_until_it_ends(tmp_path):
    run = tmp_path / "run"
    with held_by_another_process(run) as pid:
        before = (run / LOCK_FILE).read_text()
        assert before == f"{pid}\n"
        for attempt in (lambda: check_free(run), lambda: RunLock().take(run)):
            with pytest.raises(LorakitError, match=rf"output_dir {run} is in use by another lorakit process \(PID {pid}\)"):
                attempt()
        assert (run / LOCK_FILE).read_text() == before and os.listdir(run) == [LOCK_FILE]
    check_free(run)  # its process ended: the lock went with it, the file stays
    with RunLock() as lock:
        lock.take(run)
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    check_free(run)


def test_a_lock_moves_to_the_new_folder_and_a_missing_file_is_free(tmp_path):
    check_free(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()  # checking creates nothing
    lock = RunLock()
    lock.take(tmp_path / "old")
    os.replace(tmp_path / "old", tmp_path / "aside")  # what --overwrite does
    lock.take(tmp_path / "old")
    check_free(tmp_path / "aside")  # given up once the new one was held
    lock.release()
    check_free(tmp_path / "old")
