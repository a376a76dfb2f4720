"""lorakit.session: one loader for every command: a recipe plus a weight source (none, a lorakit
checkpoint, a PEFT folder), and a run folder's stored recipe."""

import json
import shutil

import pytest
import torch
from rich.console import Console

from lorakit.config import recipe_from_dict, recipe_to_dict
from lorakit.errors import LorakitError
from lorakit.session import (Checkpoint, PeftFolder, load_run, load_session, peft_folder_recipe,
                             recipe_weights)
from lorakit.storage import checkpoint as ckpt
from lorakit.train.loop import Trainer
from tests.methods.harness import randomize_adapters
from tests.methods.test_peft_import import logits, peft_adapter
from tests.test_quant import save_tiny

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_base")
    save_tiny(folder, texts=20)
    return folder


def recipe(base, tmp_path, **method):
    return recipe_from_dict({
        "model": {"name_or_path": str(base)},
        "method": {"name": "lora", "r": 2, "lora_dropout": 0.0, "target_modules": ["q_proj"], **method},
        "data": {"source": str(base / "data.jsonl"), "format": "text", "max_seq_length": 16},
        "train": {"max_steps": 1, "batch_size": 4, "num_samples": 0, "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    })


def test_no_weights_is_the_initial_adapter_a_no_op(base, tmp_path):
    session = load_session(recipe(base, tmp_path), None, QUIET)
    assert session.data is not None and len(session.data.train) > 0 and len(session.method.layers) == 2
    plain = load_session(recipe(base, tmp_path), None, with_data=False)
    assert plain.data is None
    with torch.no_grad():
        plain.method.merge(plain.model)
    torch.testing.assert_close(logits(session.model), logits(plain.model), rtol=0, atol=1e-6)


def test_a_checkpoint_gives_back_the_saved_model(base, tmp_path):
    saved = load_session(recipe(base, tmp_path, name="vera", r=4, target_modules=["q_proj", "v_proj"]), None)
    randomize_adapters(saved.model)
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(path, saved.model, saved.method, recipe_to_dict(saved.recipe))
    loaded = load_session(saved.recipe, Checkpoint(path), with_data=False)
    torch.testing.assert_close(logits(loaded.model), logits(saved.model), rtol=0, atol=0)


def test_a_run_folder_loads_with_its_stored_recipe_and_overrides(base, tmp_path):
    first = recipe(base, tmp_path)
    session = load_session(first, None, QUIET)
    Trainer(session.model, session.tokenizer, session.method, session.data, first, session.device, QUIET).train()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(30)))
    reloaded, path = load_run(tmp_path / "run", QUIET, {"data": {"source": str(other)}})
    assert path == tmp_path / "run" / "final" and reloaded.recipe.data.source == str(other)
    torch.testing.assert_close(logits(reloaded.model), logits(session.model), rtol=0, atol=0)


def test_train_session_starts_from_the_adapter(tmp_path):
    """A PEFT folder as the weight source: the model is PEFT's before any step, the recipe records the
    adapter's r, and a checkpoint session does not need the adapter folder."""
    save_tiny(tmp_path, texts=20)
    expected = peft_adapter(tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["k_proj"])
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tmp_path), "adapter": str(tmp_path / "adapter")},
        "method": {"name": "lora", "lora_dropout": 0.0},
        "data": {"source": str(tmp_path / "data.jsonl"), "format": "text", "max_seq_length": 16},
        "train": {"max_steps": 1, "batch_size": 4, "num_samples": 0, "precision": "fp32"},  # PEFT's fp32 at 2e-5
        "output_dir": str(tmp_path / "run"),
    })
    assert recipe_weights(recipe) == PeftFolder(tmp_path / "adapter")
    session = load_session(recipe, recipe_weights(recipe), QUIET)
    assert recipe.method.r == 2 and session.recipe.method.target_modules == ["k_proj"]
    torch.testing.assert_close(logits(session.model), expected, rtol=0, atol=2e-5)
    Trainer(session.model, session.tokenizer, session.method, session.data, recipe, session.device, QUIET).train()
    shutil.rmtree(tmp_path / "adapter")
    reloaded, _ = load_run(tmp_path / "run", QUIET)
    assert reloaded.method.cfg.r == 2
    torch.testing.assert_close(logits(reloaded.model), logits(session.model), rtol=0, atol=0)


def test_a_peft_folder_alone_names_its_base_and_method(tmp_path):
    peft_adapter(tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(config))
    recipe = peft_folder_recipe(tmp_path / "dora")
    assert recipe.method.name == "dora" and recipe.model.name_or_path == str(tmp_path / "base")
    config["base_model_name_or_path"] = None
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorakitError, match="names no base_model_name_or_path"):
        peft_folder_recipe(tmp_path / "dora")
