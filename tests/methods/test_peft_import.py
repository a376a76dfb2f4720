"""lorakit.methods.peft_import (``model.adapter``): a PEFT LoRA / DoRA folder saved by peft itself, with random
weights, loaded into lorakit's model gives PEFT's logits; mismatches are clear errors."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console

from lorakit.config import recipe_from_dict
from lorakit.errors import LorakitError
from lorakit.methods import build_method
from lorakit.methods.peft_import import load_peft_weights
from lorakit.session import apply_adapter_config
from tests.conftest import TINY_MODELS, tiny_inputs

QUIET = Console(quiet=True)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny_inputs()).logits


def peft_adapter(folder, kind="llama", **config):
    """Save a PEFT adapter with random weights (all of its trainable tensors moved) to ``folder``;
    returns PEFT's logits."""
    model = get_peft_model(TINY_MODELS[kind](0), LoraConfig(lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return logits(model)


def lorakit_model(folder, kind="llama", method=None, task="causal_lm"):
    recipe = recipe_from_dict({"model": {"adapter": str(folder), "task": task}, "method": method or {"name": "lora"}})
    apply_adapter_config(recipe, folder)
    model = TINY_MODELS[kind](0)
    m = build_method(recipe.method)
    m.attach(model, task)
    load_peft_weights(model, m, folder)
    return model, recipe


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_gives_peft_logits(tmp_path, use_dora, use_rslora):
    expected = peft_adapter(tmp_path, r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"],
                            use_dora=use_dora, use_rslora=use_rslora)
    model, recipe = lorakit_model(tmp_path, method={"name": "dora" if use_dora else "lora"})
    assert (recipe.method.r, recipe.method.lora_alpha, recipe.method.use_rslora) == (4, 12.0, use_rslora)
    assert sorted(recipe.method.target_modules) == ["q_proj", "up_proj", "v_proj"]
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=2e-5)


def test_seq_cls_head_is_loaded_and_trainable(tmp_path):
    expected = peft_adapter(tmp_path, kind="bert", r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model, _ = lorakit_model(tmp_path, kind="bert", task="seq_cls")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=2e-5)
    assert model.classifier.weight.requires_grad


def test_gpt2_conv1d(tmp_path):
    expected = peft_adapter(tmp_path, kind="gpt2", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model, _ = lorakit_model(tmp_path, kind="gpt2")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=2e-5)


def test_mismatches_name_model_adapter(tmp_path):
    peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(LorakitError, match=r"method.r = 8 but model.adapter .* has r = 4"):
        lorakit_model(tmp_path, method={"name": "lora", "r": 8})
    with pytest.raises(LorakitError, match=r"model.adapter .* is a LoRA adapter; method.name must be .*not dora"):
        lorakit_model(tmp_path, method={"name": "dora"})
    with pytest.raises(LorakitError, match="method.target_modules"):
        lorakit_model(tmp_path, method={"name": "lora", "target_modules": ["q_proj"]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the file now holds tensors the config does not target
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorakitError, match=r"model.adapter .* does not adapt model.layers.0.self_attn.v_proj"):
        lorakit_model(tmp_path)
    with pytest.raises(LorakitError, match="not a PEFT adapter folder"):
        lorakit_model(tmp_path / "nowhere")
