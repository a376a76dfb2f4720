"""lorakit.storage.checkpoint: what a checkpoint folder holds, atomic writes, and loading it back."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.config import recipe_from_dict, recipe_to_dict
from lorakit.errors import LorakitError
from lorakit.storage import checkpoint as ckpt
from tests.methods import harness as H

CFG = {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


BERT = {**CFG, "target_modules": ["query", "value"]}


def _save(tmp_path, kind="llama", name="step-000001"):
    model, method = H.make(kind, BERT if kind == "bert" else CFG)
    H.randomize_adapters(model)
    path = tmp_path / "run" / "checkpoints" / name
    ckpt.save_checkpoint(path, model, method, recipe_to_dict(recipe_from_dict({"method": method.cfg.model_dump()})))
    return model, method, path


def test_a_checkpoint_holds_the_adapter_and_nothing_of_the_base(tmp_path):
    model, _, path = _save(tmp_path)
    tensors = load_file(str(path / ckpt.ADAPTER_FILE))
    assert sorted({k.rsplit(".", 2)[-2] for k in tensors}) == ["lora_A", "lora_B"] and len(tensors) == 8
    assert json.loads((path / "method.json").read_text()) == {}
    assert not (path / "trainer_state.pt").exists() and not list(path.parent.glob(".*"))  # no temp left


def test_loading_gives_the_saved_model_and_restores_trainable_extras(tmp_path):
    model, _, path = _save(tmp_path, kind="bert")  # the classification head is stored and trains
    fresh, _ = H.make("bert", BERT, seed=0, adapter_seed=7)
    fresh.classifier.requires_grad_(False)
    ckpt.load_adapter_weights(fresh, path / ckpt.ADAPTER_FILE)
    torch.testing.assert_close(H.logits(fresh), H.logits(model), rtol=0, atol=0)
    assert fresh.classifier.weight.requires_grad and fresh.classifier.bias.requires_grad
    assert not fresh.bert.embeddings.word_embeddings.weight.requires_grad


def test_a_missing_or_misshapen_tensor_is_one_error(tmp_path):
    _, _, path = _save(tmp_path)
    other, _ = H.make("llama", {**CFG, "target_modules": ["q_proj", "k_proj", "v_proj"]})
    with pytest.raises(LorakitError, match="no tensor for .*k_proj.*other target_modules"):
        ckpt.load_adapter_weights(other, path / ckpt.ADAPTER_FILE)
    tensors = load_file(str(path / ckpt.ADAPTER_FILE))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path / ckpt.ADAPTER_FILE))
    model, _ = H.make("llama", CFG)
    with pytest.raises(LorakitError, match=f"tensor {key} has shape \\(3, 3\\)"):
        ckpt.load_adapter_weights(model, path / ckpt.ADAPTER_FILE)


def test_latest_and_resolve(tmp_path):
    _save(tmp_path, name="step-000001")
    _, _, second = _save(tmp_path, name="step-000002")
    run = tmp_path / "run"
    assert ckpt.latest_checkpoint(run) == second  # no pointer: the highest step
    ckpt.mark_latest(run, run / "checkpoints" / "step-000001")
    assert ckpt.latest_checkpoint(run).name == "step-000001" and ckpt.resolve_checkpoint(run).name == "step-000001"
    assert ckpt.resolve_checkpoint(second) == second
    with pytest.raises(ckpt.NoCheckpoint, match="no such folder: "):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.NoCheckpoint, match="not a lorakit run folder or checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_rewriting_a_checkpoint_replaces_it_whole(tmp_path):
    _, _, path = _save(tmp_path)
    (path / "stray.txt").write_text("old")
    model, method = H.make("llama", CFG)
    ckpt.save_checkpoint(path, model, method, recipe_to_dict(recipe_from_dict({"method": CFG})))
    assert not (path / "stray.txt").exists() and not list(path.parent.glob(".*"))
    ckpt.load_adapter_weights(model, path / ckpt.ADAPTER_FILE)


def test_without_a_pointer_the_highest_step_number_wins_past_six_digits(tmp_path):
    for name in ("step-999999", "step-1000000", "step-notanumber"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / ckpt.ADAPTER_FILE).write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1000000"
