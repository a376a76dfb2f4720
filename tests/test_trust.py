"""A tampered run folder cannot make lorakit run code, leave the folder, or swap the base model
(lorakit.trust). The tampered base model is a folder whose config.json ``auto_map`` names Python code
that writes a marker file when imported: the marker must never appear without --trust-remote-code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers_cli import clean_error, copy_run, invoke, trained_run, tree_hash  # noqa: F401 (fixtures)
from tests.tiny_run import tiny_recipe, tiny_world, write_recipe  # noqa: F401

EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")  # on import
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "llama"

    def __init__(self, **kwargs):  # and on every use (this process may have imported it before)
        pathlib.Path({marker!r}).write_text("remote code ran")
        super().__init__(**kwargs)


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture
def evil(tmp_path, tiny_world) -> tuple[Path, Path]:
    """(model folder whose auto_map code writes the marker, marker path)."""
    folder, marker = tmp_path / "evil", tmp_path / "MARKER"
    shutil.copytree(tiny_world["model"], folder)
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def edit_recipe(checkpoint: Path, **model) -> None:
    path = checkpoint / "recipe.yaml"
    data = yaml.safe_load(path.read_text())
    data["model"].update(model)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


COMMANDS = [["eval"], ["generate", "--prompt", "Say hello.", "--max-new-tokens", "2"], ["chat"],
            ["merge", "--output", "{out}"], ["export", "--output", "{out}", "--no-check"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_stored_recipe_cannot_turn_on_remote_code(tmp_path, trained_run, evil, command):
    run = copy_run(trained_run, tmp_path / "run")
    edit_recipe(run / "final", name_or_path=str(evil[0]), trust_remote_code=True)
    before = tree_hash(run)
    args = [a.format(out=tmp_path / "out") for a in command[1:]]
    line = clean_error(invoke(command[0], run, *args, input="/exit\n"), 1)
    assert "--trust-remote-code" in line and "recipe.yaml" in line
    assert not evil[1].exists() and tree_hash(run) == before and not (tmp_path / "out").exists()


def test_stored_recipe_cannot_swap_the_base_even_with_the_flag(tmp_path, trained_run, evil, tiny_world):
    run = copy_run(trained_run, tmp_path / "run")
    edit_recipe(run / "final", name_or_path=str(evil[0]))
    for flag in ([], ["--trust-remote-code"]):
        line = clean_error(invoke("eval", run, *flag), 1)
        assert str(evil[0]) in line and f"trained on {tiny_world['model']!r}" in line
    assert not evil[1].exists()


def test_a_copy_of_the_same_base_is_loaded_and_reported(tmp_path, trained_run, tiny_world):
    run = copy_run(trained_run, tmp_path / "run")
    copy = shutil.copytree(tiny_world["model"], tmp_path / "moved-model")
    edit_recipe(run / "final", name_or_path=str(copy))
    result = invoke("eval", run, "--json")
    assert result.exit_code == 0, result.output
    assert f"names model.name_or_path {str(copy)!r}" in result.stderr and "same config.json" in result.stderr


def test_old_checkpoint_without_a_base_record_still_runs_no_code(tmp_path, trained_run, evil):
    """Checkpoints written before the base record: the name is not checked, but remote code stays off."""
    run = copy_run(trained_run, tmp_path / "run")
    adapter = run / "final" / "adapter.safetensors"
    save_file(load_file(adapter), adapter, metadata={"format": "lorakit"})
    edit_recipe(run / "final", name_or_path=str(evil[0]))
    invoke("eval", run)
    assert not evil[1].exists()


def test_the_flag_lets_the_users_own_choice_through(tmp_path, evil, tiny_world):
    """A run trained with --trust-remote-code (the user's choice) needs the flag again to be loaded."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe({"model": str(evil[0]), "chat": tiny_world["chat"]}, tmp_path / "run",
                                                                   train={"max_steps": 1}))
    assert invoke("train", recipe, "--trust-remote-code").exit_code == 0
    assert evil[1].exists()
    evil[1].unlink()
    assert "--trust-remote-code" in clean_error(invoke("eval", tmp_path / "run"), 1)
    assert not evil[1].exists()
    result = invoke("eval", tmp_path / "run", "--trust-remote-code", "--json")
    assert result.exit_code == 0, result.output
    assert evil[1].exists()


def _point_latest(run: Path, target: str) -> None:
    shutil.rmtree(run / "final")
    (run / "checkpoints" / "latest").write_text(target)


@pytest.mark.parametrize("tamper", ["latest-dotdot", "latest-absolute", "final-link", "adapter-link",
                                    "checkpoint-link"])
def test_every_path_read_from_a_run_stays_inside_it(tmp_path, trained_run, tamper):
    other = copy_run(trained_run, tmp_path / "other")
    run = copy_run(trained_run, tmp_path / "run")
    if tamper == "latest-dotdot":
        _point_latest(run, "../../other/final")
    elif tamper == "latest-absolute":
        _point_latest(run, str(other / "checkpoints" / "step-000004"))
    elif tamper == "final-link":
        shutil.rmtree(run / "final")
        os.symlink(other / "final", run / "final")
    elif tamper == "adapter-link":
        (run / "final" / "adapter.safetensors").unlink()
        os.symlink(other / "final" / "adapter.safetensors", run / "final" / "adapter.safetensors")
    else:
        shutil.rmtree(run / "final")
        shutil.rmtree(run / "checkpoints" / "step-000004")
        os.symlink(other / "checkpoints" / "step-000004", run / "checkpoints" / "step-000004")
    before = tree_hash(run)
    for args in (["eval", run], ["generate", run, "-p", "Say hello."]):
        line = clean_error(invoke(*args), 1)
        assert "points outside" in line
    assert tree_hash(run) == before
