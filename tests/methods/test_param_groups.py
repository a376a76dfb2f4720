"""Parameter groups (membership edge cases): LoRA+'s ratio on the layers' ``lora_B`` matrices."""

import pytest
import torch
from torch import nn

from lorakit.config import TrainConfig
from lorakit.methods.config import LoraConfig
from lorakit.methods.layer import AdapterLayer
from lorakit.methods.lora import LoraLayer
from lorakit.methods.param_groups import build_param_groups

TRAIN = TrainConfig(learning_rate=1e-3, weight_decay=0.05)


def groups_of(model: nn.Module, cfg: LoraConfig) -> list[dict]:
    """The groups a method with ``cfg`` builds (:meth:`Method.param_groups`) over ``model``'s layers."""
    ratio = [p for m in model.modules() if isinstance(m, AdapterLayer) for p in m.ratio_parameters()]
    return build_param_groups(model, TRAIN, cfg.loraplus(), ratio)


class _EmbeddingAdapter(AdapterLayer):
    """A minimal adapter on an nn.Embedding (lorakit's injector adapts only linear layers today)."""

    def __init__(self, base: nn.Embedding, r: int = 2):
        nn.Module.__init__(self)
        self.base_layer, self.disabled = base, False
        self.lora_A = nn.Parameter(torch.zeros(r, base.num_embeddings))
        self.lora_B = nn.Parameter(torch.zeros(base.embedding_dim, r))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = LoraConfig(r=2, lora_dropout=0.0)
        self.embed_tokens = _EmbeddingAdapter(nn.Embedding(10, 4).requires_grad_(False))
        self.embed_proj = LoraLayer(nn.Linear(4, 4).requires_grad_(False), cfg)  # a linear named "embed…"
        self.norm = nn.LayerNorm(4)  # trainable 1-D weight and bias
        self.head = nn.Linear(4, 3)  # trainable 2-D weight, 1-D bias


def _settings(groups):
    return {id(p): (g["name"], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_loraplus_membership_by_module_not_by_name():
    model = _Toy()
    groups = groups_of(model, LoraConfig(loraplus_lr_ratio=10.0, loraplus_lr_embedding=1e-6))
    got = _settings(groups)
    lr, wd = TRAIN.learning_rate, TRAIN.weight_decay
    expected = {
        model.embed_tokens.lora_A: ("embedding", 1e-6, wd), model.embed_tokens.lora_B: ("embedding", 1e-6, wd),
        model.embed_proj.lora_A.weight: ("lr", lr, wd), model.embed_proj.lora_B.weight: ("lora_B", 10 * lr, wd),
        model.norm.weight: ("no_decay", 10 * lr, 0.0), model.norm.bias: ("no_decay", 10 * lr, 0.0),
        model.head.weight: ("lr", lr, wd), model.head.bias: ("no_decay", 10 * lr, 0.0),
    }
    assert len(got) == len(expected)
    for p, (name, group_lr, decay) in expected.items():
        assert got[id(p)][0] == name and got[id(p)][1:] == pytest.approx((group_lr, decay))
    assert [g["name"] for g in groups] == ["lr", "lora_B", "no_decay", "embedding"]


def test_without_ratio_two_groups_and_frozen_left_out():
    model = _Toy()
    groups = groups_of(model, LoraConfig())
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("decay", 1e-3, 0.05), ("no_decay", 1e-3, 0.0)]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.embed_proj.base_layer.weight) not in grouped
