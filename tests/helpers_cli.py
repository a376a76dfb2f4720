"""The command line against the tiny model of tests/tiny_run.py: one trained run per test session, a clean
one-line-error check, and a hash of a folder to prove nothing already written changed."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401 (tiny_world: a fixture)

runner = CliRunner()


def invoke(*args, input: str | None = None):
    """``lorakit ARGS`` in this process; ``result.stderr`` holds what went to stderr."""
    return runner.invoke(app, [str(a) for a in args], input=input)


def clean_error(result, code: int) -> str:
    """Assert a clean failure: exit ``code``, exactly one line on stderr, no traceback. Returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.stderr[-2000:], result.exception)
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def tree_hash(path: Path) -> str:
    """SHA-256 over every file, folder and link under ``path`` (names, bytes, link targets)."""
    digest = hashlib.sha256()
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "absent"
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(dirs + files):
            item = Path(root) / name
            digest.update(str(item.relative_to(path)).encode())
            if item.is_symlink():
                digest.update(b"->" + os.readlink(item).encode())
            elif item.is_file():
                digest.update(item.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_world) -> Path:
    """A finished 4-step run of the tiny model (tests/tiny_run.py; checkpoints at steps 2 and 4, final).
    Do not modify: copy it with :func:`copy_run` first."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(root / "recipe.yaml", tiny_recipe(tiny_world, root / "run", train={"save_every": 2}))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    return root / "run"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


# ---- interrupted runs: a 6-step run with a checkpoint every 2 steps, in a subprocess -------------------
def six_step_recipe(world: dict, folder: Path) -> Path:
    """``folder/recipe.yaml`` training the tiny model 6 steps into ``folder/run`` (checkpoints at 2, 4, 6)."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe(world, folder / "run", train={"max_steps": 6, "save_every": 2})
    return write_recipe(folder / "recipe.yaml", recipe)


@pytest.fixture(scope="session")
def reference_adapter(tmp_path_factory, tiny_world) -> dict:
    """The final adapter tensors of the 6-step run trained without interruption."""
    from safetensors.torch import load_file

    recipe = six_step_recipe(tiny_world, tmp_path_factory.mktemp("reference"))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    return load_file(recipe.parent / "run" / "final" / "adapter.safetensors")


def lorakit_process(*args, kill_at: str | None = None):
    """``python -m lorakit ARGS`` in a subprocess with one torch thread (as the tests run in-process),
    stopped at ``kill_at`` (:mod:`lorakit.faults`) when given. Returns the CompletedProcess."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_KILL_AT": kill_at or ""}
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent.parent)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
