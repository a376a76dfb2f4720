"""Bad model folders (model.name_or_path) and PEFT starting points (model.adapter): one line naming the folder
or file and what is wrong, exit 1, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from tests.bad_inputs.corpus import check_fails
from tests.tiny_run import tiny_recipe, tiny_world  # noqa: F401 (fixture)


def _weights(folder):
    return folder / "model.safetensors"


def no_config(folder):
    (folder / "config.json").unlink()


def empty_folder(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def garbage_weights(folder):
    _weights(folder).write_bytes(os.urandom(2048))


def truncated_weights(folder):
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(data[: len(data) // 2])


def no_weights(folder):
    _weights(folder).unlink()


def config_not_json(folder):
    (folder / "config.json").write_text("{model_type: llama")


def config_a_list(folder):
    (folder / "config.json").write_text("[1, 2]")


def unknown_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "not-a-model"
    (folder / "config.json").write_text(json.dumps(config))


def wrong_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))


def no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)


# (id, how the copy of the tiny model folder is damaged, what the line must name)
FOLDERS = [
    ("no-config", no_config, "config.json"),
    ("empty-folder", empty_folder, "config.json"),
    ("garbage-weights", garbage_weights, "model.safetensors"),
    ("truncated-weights", truncated_weights, "model.safetensors"),
    ("no-weights", no_weights, "weights"),
    ("config-not-json", config_not_json, "config.json"),
    ("config-a-list", config_a_list, "config.json"),
    ("unknown-model-type", unknown_model_type, "not-a-model"),
    ("wrong-shapes", wrong_shapes, "model"),
    ("no-tokenizer", no_tokenizer, "tokenizer"),
]


def _recipe(tmp_path, world, **model):
    recipe = tiny_recipe(world, tmp_path / "run")
    recipe["model"].update(model)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("case, damage, expect", FOLDERS, ids=[c[0] for c in FOLDERS])
def test_bad_model_folder(tmp_path, tiny_world, case, damage, expect):
    folder = shutil.copytree(tiny_world["model"], tmp_path / "model")
    damage(folder)
    recipe = _recipe(tmp_path, tiny_world, name_or_path=str(folder))
    check_fails(["train", recipe], 1, ("model.name_or_path", expect), [tmp_path])


@pytest.mark.parametrize("name", ["./no-such-model", "~/no/such/model", "/no/such/model"])
def test_a_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, tiny_world, name):
    recipe = _recipe(tmp_path, tiny_world, name_or_path=name)
    check_fails(["train", recipe], 1, ("model.name_or_path", "no such folder"), [tmp_path])


def test_model_path_that_is_a_file(tmp_path, tiny_world):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    recipe = _recipe(tmp_path, tiny_world, name_or_path=str(tmp_path / "model.bin"))
    check_fails(["train", recipe], 1, ("model.name_or_path", "not a folder"), [tmp_path])


def peft_folder(tmp_path, config) -> str:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    return str(folder)


ADAPTERS = [
    ("adapter-missing", lambda tmp: str(tmp / "nope"), "not a PEFT adapter folder"),
    ("adapter-config-not-json", lambda tmp: peft_folder(tmp, "{peft_type: LORA"), "adapter_config.json"),
    ("adapter-config-a-list", lambda tmp: peft_folder(tmp, "[]"), "adapter_config.json"),
    ("adapter-not-lora", lambda tmp: peft_folder(tmp, {"peft_type": "PREFIX_TUNING"}), "PREFIX_TUNING"),
    ("adapter-garbage-weights", lambda tmp: peft_folder(tmp, {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj", "v_proj"]}),
     "adapter_model.safetensors"),
]


@pytest.mark.parametrize("case, make, expect", ADAPTERS, ids=[c[0] for c in ADAPTERS])
def test_bad_peft_starting_point(tmp_path, tiny_world, case, make, expect):
    recipe = _recipe(tmp_path, tiny_world, adapter=make(tmp_path))
    check_fails(["train", recipe], 1, ("model.adapter", expect), [tmp_path])


@pytest.mark.parametrize("case", ["wrong-shapes", "ragged-csv"])
def test_one_line_from_the_real_command_line(tmp_path, tiny_world, case):
    """Libraries log to the process's own stderr (which an in-process runner does not see): run the real
    command line where transformers (a load report) and datasets (a reader error) would log."""
    from tests.helpers_cli import lorakit_process

    folder = shutil.copytree(tiny_world["model"], tmp_path / "model")
    if case == "wrong-shapes":
        wrong_shapes(folder)
        recipe = _recipe(tmp_path, tiny_world, name_or_path=str(folder))
    else:
        (tmp_path / "d.csv").write_text('text,label\n"w1 w2",a\n"w3",b,c,d\n')
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_world, tmp_path / "run",
                                                     data={"source": str(tmp_path / "d.csv"), "format": "text"})))
    proc = lorakit_process("train", recipe)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
