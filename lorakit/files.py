"""Modes of the files lorakit writes: those of any normal file, 0666 & ~umask (0644 under the usual
umask 022), and 0777 & ~umask for folders.

Some writers create files 0600 (safetensors' ``save_file``, hence transformers' ``save_pretrained``;
``tempfile.mkstemp``) or folders 0700 (``tempfile.mkdtemp``); everything lorakit writes through them
(checkpoints, PEFT and merged folders, pictures, the built-in model cache) goes through
:func:`normal_modes` before it is renamed into place, so a run folder has one mode throughout.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """This process's umask (Linux: read from ``/proc/self/status``; elsewhere set and put back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the mode a normal file or folder gets
    under this process's umask: 0666 & ~umask, folders 0777 & ~umask. Symbolic links are left alone and
    not followed. Raises OSError when a mode cannot be set."""
    mask = current_umask()
    path = Path(path)

    def fix(item: Path, folder: bool) -> None:
        if not item.is_symlink():
            os.chmod(item, (0o777 if folder else 0o666) & ~mask)

    fix(path, path.is_dir())
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                fix(Path(root) / name, True)
            for name in files:
                fix(Path(root) / name, False)
