"""Merged models that behave (lorakit.merge): the saved folder loads with a plain ``AutoModelFor…
from_pretrained`` and gives the adapter model's outputs — tied embeddings kept, an adapted LM head
untied, a resized vocabulary and a trained classification head saved, ``--dtype`` applied."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.merge import save_merged
from tests.conftest import tiny_inputs
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
