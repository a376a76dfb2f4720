"""The lock a training run holds on its run folder: ``RUN/.lock``, an exclusive ``fcntl.flock`` held for
the whole run (rank 0 alone under several processes), so that a second ``lorakit train`` (plain,
``--resume`` or ``--overwrite``) on the same folder refuses instead of deleting or mixing into a live run.

The kernel releases a flock when its process ends, however it ends (error, signal, ``kill -9``), so a
``.lock`` file left behind is no sign of a live run: only a lock held now is. The file holds the holder's
PID, for the message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lorakit.errors import LorakitError

LOCK_FILE = ".lock"


def _lock(path: Path, flags: int) -> int:
    """Open ``path`` with ``flags`` and lock it exclusively without waiting; returns the descriptor.

    Raises LorakitError naming the run folder and the holder's PID when another process holds it."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        pid = f" (PID {holder})" if holder.isdigit() else ""
        raise LorakitError(f"output_dir {path.parent} is in use by another lorakit process{pid}; wait for it to "
                           "end or stop it, or choose another output_dir") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_free(run_dir: Path) -> None:
    """Refuse (LorakitError, as :meth:`RunLock.take`) when another process holds ``run_dir``'s lock now.
    Changes nothing: no ``.lock`` is created or written."""
    path = Path(run_dir) / LOCK_FILE
    if path.is_file() and not path.is_symlink():
        os.close(_lock(path, os.O_RDONLY))


class RunLock:
    """An exclusive lock on ``RUN/.lock``: :meth:`take` it, :meth:`release` it (a ``with`` block releases it
    on errors too; the process's end releases it in any case)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def take(self, run_dir: Path) -> None:
        """Lock ``run_dir`` (created if missing) and write this PID into its ``.lock``; a lock held on
        another folder is given up once this one is held.

        Raises LorakitError naming the folder and the holder's PID when another process holds it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _lock(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.release()
        self.fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file releases it); the ``.lock`` file stays."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
