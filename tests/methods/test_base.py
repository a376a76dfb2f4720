"""lorakit.methods.base / layer / registry: what every method gets without writing it, and what a
method class tells the rest of lorakit (rank, PEFT import, parameter groups, registration)."""

import pytest
import torch
from torch import nn

from lorakit.config import TrainConfig, recipe_from_dict
from lorakit.errors import LorakitError, RecipeError
from lorakit.methods import REGISTRY, Method, MethodConfig, get_method_class, methods_for_peft
from lorakit.methods.layer import AdapterLayer
from tests.methods import harness as H

CFG = {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


class ScaleLayer(AdapterLayer):
    """A non-LoRA adapter: y = base(x) · (1 + g), one trainable g per output."""

    def __init__(self, base_layer, cfg):
        super().__init__(base_layer)
        self.gain = nn.Parameter(torch.zeros(self.out_features))

    def adapter_forward(self, x, base_out):
        return base_out * (1 + self.gain)

    def merged_weight(self):
        return (1 + self.gain.detach().float()).unsqueeze(1) * self.base_layer.weight.detach().float()


class Scale(Method):
    name = "scale_test"
    paper = "-"
    layer_class = ScaleLayer


def test_defaults_of_a_method_without_hooks():
    model = H.TINY_MODELS["llama"](0)
    method = Scale(MethodConfig(name="scale_test", target_modules=["o_proj"]))
    method.attach(model)
    assert Scale.hooks_used() == [] and not Scale.imports_peft({"peft_type": "LORA"})
    assert method.export_peft(model) is None  # no LoRA math: no PEFT equivalent
    with pytest.raises(LorakitError, match="--rank: method scale_test has a fixed rank"):
        method.set_rank(2)
    with pytest.raises(LorakitError, match="--rank/--ranks: method scale_test has a fixed rank"):
        method.evaluate(lambda: {}, rank=2)
    assert method.evaluate(lambda: {"eval_loss": 1.0}) == {"eval_loss": 1.0}
    assert method.state_dict() == {}


def test_default_merge_replaces_every_layer_by_a_plain_one():
    model = H.TINY_MODELS["llama"](0)
    method = Scale(MethodConfig(name="scale_test", target_modules=["o_proj", "down_proj"]))
    method.attach(model)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.gain.uniform_(-0.5, 0.5)
    before = H.logits(model)
    method.merge(model)
    assert not method.layers and not any(isinstance(m, AdapterLayer) for m in model.modules())
    torch.testing.assert_close(H.logits(model), before, rtol=1e-5, atol=1e-5)


def test_default_groups_decay_matrices_only_and_ask_layers_for_lora_b():
    model, method = H.make("llama", {**CFG, "loraplus_lr_ratio": 4.0})
    groups = {g["name"]: g for g in method.param_groups(model, TrainConfig(learning_rate=1.0, weight_decay=0.1))}
    b_ids = {id(layer.lora_B.weight) for layer in method.layers.values()}
    assert {id(p) for p in groups["lora_B"]["params"]} == b_ids and groups["lora_B"]["lr"] == 4.0
    model, method = H.make("llama", CFG)
    names = [g["name"] for g in method.param_groups(model, TrainConfig(learning_rate=1.0, weight_decay=0.1))]
    assert names == ["decay"]


def test_the_registry_answers_by_name_and_by_peft_config():
    assert get_method_class("lora") is REGISTRY["lora"] and list(REGISTRY)[0] == "lora"
    with pytest.raises(RecipeError, match=r"method.name = 'dorra' is not a method \(did you mean `dora`\?\)"):
        get_method_class("dorra")
    plain = methods_for_peft({"peft_type": "LORA"})
    assert plain[0] == "lora" and "dora" not in plain and "vera" not in plain
    assert methods_for_peft({"peft_type": "LORA", "use_dora": True}) == ["dora"]
    assert methods_for_peft({"peft_type": "VERA"}) == []


def test_each_method_validates_its_own_fields():
    assert recipe_from_dict({"method": {"name": "dylora", "update": "all"}}).method.update == "all"
    other = recipe_from_dict({"method": {"name": "lora", "update": "all"}}).method  # DyLoRA's field under LoRA
    assert other.set_aside_notes() == ["method.update = 'all' set aside (a field of dylora; lora has none)"]
    with pytest.raises(RecipeError, match="unknown field `method.updates`"):  # no method's field: refused
        recipe_from_dict({"method": {"name": "lora", "updates": "all"}})
    assert "VeRA has no alpha scaling" in recipe_from_dict({"method": {"name": "vera", "use_rslora": True}}).method.set_aside_notes()[0]
    with pytest.raises(RecipeError, match="unknown field `method.rr`"):
        recipe_from_dict({"method": {"name": "vera", "rr": 4}})
