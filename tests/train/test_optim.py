"""Parameter groups (membership edge cases) and learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from lorakit.config import MethodConfig, TrainConfig
from lorakit.methods.base import AdapterLayer
from lorakit.methods.lora import LoraLayer
from lorakit.train.optim import build_param_groups, build_scheduler

TRAIN = TrainConfig(learning_rate=1e-3, weight_decay=0.05)


def schedule(kind: str, total: int, warmup: int) -> list[float]:
    """The factor applied at each optimizer step 0..total-1, read off a real optimizer."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, kind, total, warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


C = lambda p: 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731


@pytest.mark.parametrize("kind,expected", [
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1 / 3, 2 / 3, 1.0, C(0.25), C(0.5), C(0.75)]),
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedule_values_with_warmup(kind, expected):
    assert schedule(kind, total=6, warmup=2) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_no_warmup_starts_at_full_lr_and_never_goes_negative(kind):
    values = schedule(kind, total=5, warmup=0)
    assert values[0] == 1.0 and all(0 < v <= 1 for v in values)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, kind, 5, 0)
    for _ in range(8):  # past the end the factor stays at its final value (0 for linear/cosine)
        opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 if kind == "constant" else 0.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_matches_transformers_after_warmup(kind):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    ref_fn = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[kind]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = ref_fn(opt, num_warmup_steps=3, num_training_steps=20)
    ref_values = []
    for _ in range(20):
        ref_values.append(opt.param_groups[0]["lr"])
        opt.step(), ref.step()
    assert schedule(kind, 20, 3)[3:] == pytest.approx(ref_values[3:])


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
        cfg = MethodConfig(r=2, lora_dropout=0.0)
        self.embed_tokens = _EmbeddingAdapter(nn.Embedding(10, 4).requires_grad_(False))
        self.embed_proj = LoraLayer(nn.Linear(4, 4).requires_grad_(False), cfg)  # a linear named "embed…"
        self.norm = nn.LayerNorm(4)  # trainable 1-D weight and bias
        self.head = nn.Linear(4, 3)  # trainable 2-D weight, 1-D bias


def _settings(groups):
    return {id(p): (g["name"], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_loraplus_membership_by_module_not_by_name():
    model = _Toy()
    groups = build_param_groups(model, TRAIN, MethodConfig(loraplus_lr_ratio=10.0, loraplus_lr_embedding=1e-6))
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
    groups = build_param_groups(model, TRAIN, MethodConfig())
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("decay", 1e-3, 0.05), ("no_decay", 1e-3, 0.0)]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.embed_proj.base_layer.weight) not in grouped
