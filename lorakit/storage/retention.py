"""Which checkpoint folders a run keeps (``train.save_total_limit``), and moving a whole run folder aside
(``lorakit train --overwrite``).

Only folders lorakit itself names are ever removed: ``step-NNNNNN`` (six or more digits), real folders
(not links) directly inside the run's ``checkpoints/``. A folder is first renamed to
``.step-NNNNNN.del-PID`` (one atomic rename) and only then deleted, so a crash midway never leaves a
half-deleted folder under a name that looks whole; what such a crash leaves is removed at the next start
(:func:`lorakit.storage.checkpoint.clean_stale`). The newest checkpoint (and the one ``checkpoints/latest``
names) is never removed, so ``--resume`` always finds the latest complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.storage.checkpoint import ADAPTER_FILE, alive
from lorakit.storage.runlock import LOCK_FILE
from lorakit.faults import kill_point
from lorakit.methods.lora_drop import SELECTION_FILE

STEP_FOLDER = re.compile(r"^step-(\d{6,})$")


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoints/step-NNNNNN`` folder of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir() or folder.is_symlink():
        return []
    found = []
    for entry in folder.iterdir():
        match = STEP_FOLDER.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match[1]), entry))
    return sorted(found)


def to_remove(run_dir: Path, limit: int, protect: list[Path]) -> list[Path]:
    """The checkpoint folders beyond ``limit``, oldest first: the newest folder, the one ``latest``
    names and those in ``protect`` (the best) are kept first, then the newest others until ``limit``
    are kept (so more than ``limit`` remain only when the protected ones alone exceed it)."""
    folders = [path for _, path in step_folders(run_dir)]
    if not folders:
        return []
    pointer = Path(run_dir) / "checkpoints" / "latest"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    names = {p.name for p in folders}
    keep = names & ({folders[-1].name, named, *(p.name for p in protect)})
    for path in reversed(folders):
        if len(keep) >= limit:
            break
        keep.add(path.name)
    return [path for path in folders if path.name not in keep]


def remove_folder(path: Path) -> None:
    """Rename ``path`` to ``.NAME.del-PID`` beside it, then delete it (see the module docstring)."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, doomed)
    kill_point(f"delete:{path.name}:renamed")
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(doomed)


def prune(run_dir: Path, limit: int | None, protect: list[Path] = ()) -> list[Path]:
    """Remove the checkpoint folders beyond ``limit`` (None: none); returns the removed ones."""
    if limit is None:
        return []
    removed = to_remove(run_dir, limit, list(protect))
    for path in removed:
        remove_folder(path)
    return removed


# ---- --overwrite ------------------------------------------------------------------------------------
FILES = {"metrics.jsonl", "summary.json", "curves.png", SELECTION_FILE, LOCK_FILE}  # must be files
TRACKERS = {"tensorboard", "wandb"}  # the trackers' own folders, taken as they are
RUN_MARKS = {"checkpoints", "final", "metrics.jsonl", "summary.json"}
STALE_ENTRY = re.compile(r"^\..+\.(tmp|old|del)-\d+$")


def check_links(run_dir: Path) -> None:
    """Refuse a run folder whose ``checkpoints/`` or ``final/`` is a link: lorakit writes, trims
    (``train.save_total_limit``) and resumes checkpoints only inside the run folder.

    Raises LorakitError naming the folder and the link."""
    for name in ("checkpoints", "final"):
        if (Path(run_dir) / name).is_symlink():
            raise LorakitError(f"output_dir {run_dir}: {name}/ is a link; lorakit writes {name}/ only inside the "
                               "run folder (set output_dir on the other disk instead)")


def _has_adapter(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / ADAPTER_FILE).is_file()


def foreign_entry(run_dir: Path) -> str | None:
    """The first entry of ``run_dir`` (relative path) that a lorakit run does not write, judged by content:
    ``checkpoints/`` holds only ``latest`` (a file), ``step-NNNNNN/`` folders with an adapter and leftovers
    of interrupted writes; ``final/`` holds an adapter; ``metrics.jsonl`` and the like are files. None: all
    are a run's."""
    for entry in sorted(Path(run_dir).iterdir()):
        name = entry.name
        if STALE_ENTRY.match(name) or (name in TRACKERS and entry.is_dir() and not entry.is_symlink()):
            continue
        if name in FILES and entry.is_file() and not entry.is_symlink():
            continue
        if name == "final" and _has_adapter(entry):
            continue
        if name != "checkpoints" or not entry.is_dir() or entry.is_symlink():
            return name
        for inner in sorted(entry.iterdir()):
            fits = (STALE_ENTRY.match(inner.name)
                    or (inner.name == "latest" and inner.is_file() and not inner.is_symlink())
                    or (STEP_FOLDER.match(inner.name) and _has_adapter(inner)))
            if not fits:
                return f"checkpoints/{inner.name}"
    return None


def check_overwritable(run_dir: Path) -> None:
    """Refuse to replace a folder that is not a lorakit run folder: it must hold only what a run writes
    (see :func:`foreign_entry`: ``checkpoints/``, ``final/``, ``metrics.jsonl``, ``summary.json``,
    ``curves.png``, tracker folders, LoRA-drop's selection, ``.lock``, leftovers of interrupted writes) and
    at least one of ``checkpoints/``, ``final/``, ``metrics.jsonl``, ``summary.json``; it must not be a
    link, nor this process's working folder or one above it.

    Raises LorakitError naming the folder and what makes it not a run folder."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise LorakitError(f"--overwrite: output_dir {run_dir} is a link; remove or replace it yourself")
    resolved, cwd = run_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise LorakitError(f"--overwrite: output_dir {run_dir} is the working folder or holds it; "
                           "choose another output_dir")
    foreign = foreign_entry(run_dir)
    if foreign or not {entry.name for entry in run_dir.iterdir()} & RUN_MARKS:
        what = f"it holds {foreign!r}" if foreign else "it has no checkpoints/, final/, metrics.jsonl or summary.json"
        raise LorakitError(f"--overwrite: output_dir {run_dir} does not look like a lorakit run folder ({what}); "
                           "nothing was changed: remove it yourself or choose another output_dir")


def move_aside(run_dir: Path) -> Path | None:
    """Rename a run folder to ``.NAME.overwritten-PID`` beside it (one atomic rename; checked with
    :func:`check_overwritable` first). Returns the new path; None when ``run_dir`` does not exist or is
    empty or holds only ``.lock`` (such a folder is simply reused)."""
    run_dir = Path(run_dir)
    if not run_dir.exists() and not run_dir.is_symlink():
        return None
    if run_dir.is_dir() and not run_dir.is_symlink() and not {e.name for e in run_dir.iterdir()} - {LOCK_FILE}:
        return None
    check_overwritable(run_dir)
    aside = run_dir.with_name(f".{run_dir.name}.overwritten-{os.getpid()}")
    os.replace(run_dir, aside)
    return aside


def put_back(aside: Path, run_dir: Path) -> bool:
    """Undo :func:`move_aside` while the new run has written nothing in ``run_dir`` (at most its
    ``.lock``): ``run_dir`` is removed and ``aside`` renamed back. Returns whether it was put back."""
    run_dir = Path(run_dir)
    if not Path(aside).is_dir() or {entry.name for entry in run_dir.iterdir()} - {LOCK_FILE}:
        return False
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    run_dir.rmdir()
    os.replace(aside, run_dir)
    return True


def clean_overwritten(run_dir: Path) -> list[Path]:
    """Remove the ``.NAME.overwritten-PID`` folders beside ``run_dir`` that an ``--overwrite`` killed before
    its cleanup left (its process gone; still a run folder by :func:`check_overwritable`; anything else is
    left alone). Returns the removed ones."""
    run_dir = Path(run_dir)
    pattern = re.compile(rf"^\.{re.escape(run_dir.name)}\.overwritten-(\d+)$")
    removed = []
    parent = run_dir.parent if run_dir.parent.is_dir() else None
    for entry in sorted(parent.iterdir()) if parent else []:
        match = pattern.match(entry.name)
        if match is None or alive(int(match[1])) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            check_overwritable(entry)
        except LorakitError:
            continue
        shutil.rmtree(entry)
        removed.append(entry)
    return removed
