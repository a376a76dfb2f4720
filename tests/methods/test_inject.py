"""lorakit.methods.inject: which modules ``target_modules`` selects, and the swap for adapter layers."""

import pytest
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.methods.inject import find_targets, head_names, inject, replace_module
from lorakit.methods.layer import AdapterLayer
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama
from tests.methods import harness as H

CFG = {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def test_target_modules_by_name_regex_and_all_linear():
    _, m = H.make("llama", {**CFG, "target_modules": ["q_proj", "v_proj"]})
    assert sorted({n.split(".")[-1] for n in m.layers}) == ["q_proj", "v_proj"]
    _, m = H.make("llama", {**CFG, "target_modules": r".*layers\.0\.mlp\.(up|down)_proj"})
    assert sorted(m.layers) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    model, m = H.make("llama", {**CFG, "target_modules": "all-linear"})
    assert len(m.layers) == 14 and "lm_head" not in m.layers
    assert all(isinstance(model.get_submodule(n), AdapterLayer) for n in m.layers)


def test_target_that_matches_nothing_lists_names():
    with pytest.raises(LorakitError, match="matches no module.*q_proj"):
        H.make("llama", {**CFG, "target_modules": ["query"]})
    with pytest.raises(LorakitError, match="not a linear layer"):
        H.make("llama", {**CFG, "target_modules": ["self_attn"]})


def test_all_linear_leaves_out_every_head():
    assert "lm_head" in head_names(tiny_llama()) and "classifier" in head_names(tiny_bert())
    assert not {"lm_head", "classifier"} & set(find_targets(tiny_bert(), "all-linear"))
    assert "lm_head" not in find_targets(tiny_gpt2(), "all-linear")  # a tied head is found as the output embedding
    assert "transformer.h.0.attn.c_attn" in find_targets(tiny_gpt2(), "all-linear")  # Conv1D adapts


def test_inject_freezes_the_base_and_trains_a_classification_head():
    model, method = H.make("bert", {**CFG, "target_modules": ["query"]})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    assert {n for n in trainable if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}


def test_adapted_modules_are_not_targets_again():
    model, method = H.make("llama", {**CFG, "target_modules": ["q_proj"]})
    assert [n.split(".")[-1] for n in find_targets(model, ["q_proj", "k_proj"])] == ["k_proj", "k_proj"]
    with pytest.raises(LorakitError, match="matches no module"):
        inject(model, method)


def test_replace_module_by_dotted_path():
    model = tiny_llama()
    new = nn.Identity()
    replace_module(model, "model.layers.1.mlp", new)
    assert model.model.layers[1].mlp is new
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 96)
