"""Merged models that behave (lorakit.merge): the saved folder loads with a plain ``AutoModelFor…
from_pretrained`` and gives the adapter model's outputs — tied embeddings kept, an adapted LM head
untied, a resized vocabulary and a trained classification head saved, ``--dtype`` applied."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.config import recipe_from_dict
from lorakit.errors import LorakitError
from lorakit.merge import merged_dtype, save_merged
from lorakit.storage import checkpoint as ckpt
from tests.conftest import tiny_inputs
from tests.helpers_cli import invoke, tiny_recipe, tiny_world, write_recipe  # noqa: F401 (tiny_world: a fixture)
from tests.methods.harness import make, randomize_adapters
from tests.test_quant import save_tiny

LORA = {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def logits(model, inputs=None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


def merged_folder(kind, targets, tmp_path, before_attach=None, dtype=None, inputs=None):
    """(adapter-model logits, saved folder, untied flag) for a randomized LoRA merged and saved."""
    model, method = make(kind, {**LORA, "target_modules": targets})
    if before_attach:  # rebuild with the change made before the adapter is attached
        from tests.conftest import TINY_MODELS

        model = TINY_MODELS[kind](0)
        before_attach(model)
        method.attach(model, "seq_cls" if kind == "bert" else "causal_lm")
    randomize_adapters(model)
    expected = logits(model, inputs)
    untied = save_merged(method.merge(model), None, tmp_path / "merged", dtype)
    return expected, tmp_path / "merged", untied


def test_tied_embeddings_stay_tied(tmp_path):
    expected, folder, untied = merged_folder("llama", ["q_proj", "v_proj"], tmp_path)
    assert not untied and json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


def test_adapted_lm_head_is_saved_untied(tmp_path):
    expected, folder, untied = merged_folder("llama", ["q_proj", "lm_head"], tmp_path)
    assert untied and json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(str(folder / "model.safetensors"))
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


def test_resized_vocabulary_loads_with_its_size(tmp_path):
    ids = torch.tensor([[1, 5, 97, 101, 103], [100, 2, 3, 4, 98]])  # new tokens ≥ 96 included
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected, folder, _ = merged_folder("llama", ["q_proj", "v_proj"], tmp_path, inputs=inputs,
                                        before_attach=lambda m: m.resize_token_embeddings(104, mean_resizing=False))
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert plain.config.vocab_size == 104 and plain.get_input_embeddings().weight.shape == (104, 32)
    assert plain.lm_head.weight.shape == (104, 32)
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=0, atol=1e-5)


def test_trained_classification_head_is_saved(tmp_path):
    expected, folder, _ = merged_folder("bert", ["query", "value"], tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


def test_dtype_casts_every_tensor_once(tmp_path):
    expected, folder, _ = merged_folder("llama", ["q_proj", "v_proj"], tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(folder / "model.safetensors")).values()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert plain.dtype == torch.bfloat16 and plain.lm_head.weight is plain.model.embed_tokens.weight
    assert (logits(plain).float() - expected).abs().max() < 0.1  # bf16 rounding, not a wrong merge


def test_cli_merge_of_a_run_with_an_adapted_head(tmp_path):
    save_tiny(tmp_path, texts=30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(tmp_path)},
        "method": {**LORA, "target_modules": ["q_proj", "lm_head"]},
        "data": {"source": str(tmp_path / "data.jsonl"), "format": "text", "max_seq_length": 24},
        "train": {"learning_rate": 5e-2, "batch_size": 4, "max_steps": 2, "num_samples": 0, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["merge", str(tmp_path / "run"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "saved untied" in text
    assert float(text.split("vs the adapter model: ")[1].split()[0]) < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


# ---- the merged dtype follows the precision the run trained in ----------------------------------------
def fake_checkpoint(folder, precision=None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "lorakit", **({"precision": precision} if precision else {})}
    save_file({"x": torch.zeros(1)}, str(folder / "adapter.safetensors"), metadata=meta)
    return folder


@pytest.mark.parametrize("recorded, train, model_dtype, flag, expected, why", [
    ("bf16", "auto", "auto", "auto", torch.bfloat16, "trained in bf16"),  # auto resolved to bf16 (a GPU run)
    ("fp32", "auto", "auto", "auto", torch.float32, "trained in fp32"),
    (None, "bf16", "auto", "auto", torch.bfloat16, "trained in bf16"),  # written before the record: the recipe's
    (None, "auto", "auto", "auto", torch.float32, "not recorded"),
    ("bf16", "auto", "float16", "auto", torch.float16, "model.dtype float16"),
    ("bf16", "auto", "auto", "float32", torch.float32, "--dtype"),
])
def test_merged_dtype(tmp_path, recorded, train, model_dtype, flag, expected, why):
    recipe = recipe_from_dict({"model": {"dtype": model_dtype}, "train": {"precision": train}})
    dtype, reason = merged_dtype(flag, recipe, fake_checkpoint(tmp_path / "ck", recorded))
    assert dtype == expected and why in reason


def test_merged_dtype_refuses_a_bad_record(tmp_path):
    with pytest.raises(LorakitError, match="adapter.safetensors: not a valid lorakit checkpoint file"):
        merged_dtype("auto", recipe_from_dict({}), fake_checkpoint(tmp_path / "ck", "fp8"))


def test_cli_merge_of_a_bf16_run_saves_bfloat16(tiny_world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_world, tmp_path / "run", train={"precision": "bf16"}))
    assert invoke("train", recipe).exit_code == 0
    assert ckpt.read_precision(tmp_path / "run" / "final") == "bf16"
    assert ckpt.read_precision(tmp_path / "run" / "checkpoints" / "step-000004") == "bf16"
    result = invoke("merge", tmp_path / "run", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "in bfloat16 (trained in bf16)" in text
    exact = float(text.split("vs the adapter model: ")[1].split(" (")[1].split()[0])  # the merge before rounding
    assert exact < 1e-4 and "before the weights were rounded to bfloat16" in text
    assert {t.dtype for t in load_file(str(tmp_path / "merged" / "model.safetensors")).values()} == {torch.bfloat16}
    result = invoke("merge", tmp_path / "run", "-o", tmp_path / "merged32", "--dtype", "float32")
    assert result.exit_code == 0 and "in float32 (--dtype)" in " ".join(result.stdout.split())
    assert "before the weights were rounded" not in result.stdout  # nothing rounded
    assert {t.dtype for t in load_file(str(tmp_path / "merged32" / "model.safetensors")).values()} == {torch.float32}
