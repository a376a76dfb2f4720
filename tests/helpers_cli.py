"""The command line against a tiny model: one model folder and one trained run per test session, a clean
one-line-error check, and a hash of a folder to prove nothing already written changed."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli import app
from tests.test_quant import save_tiny

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


def recipe_dict(model: Path, output_dir: Path, **sections) -> dict:
    """A recipe for the tiny llama on its own word data: 4 steps of 4 rows, a checkpoint every 2."""
    data = {
        "model": {"name_or_path": str(model)},
        "method": {"name": "lora", "r": 4},
        "data": {"source": str(model / "data.jsonl"), "format": "text", "max_seq_length": 16},
        "train": {"max_steps": 4, "batch_size": 4, "num_samples": 0, "save_every": 2},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny llama folder (config.json, safetensors, tokenizer) with ``data.jsonl`` of 40 texts."""
    folder = tmp_path_factory.mktemp("tiny_model")
    save_tiny(folder, texts=40)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 4-step run of the tiny model (checkpoints at steps 2 and 4, final). Do not modify:
    copy it with :func:`copy_run` first."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(root / "recipe.yaml", recipe_dict(tiny_model_dir, root / "run"))
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    return root / "run"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest
