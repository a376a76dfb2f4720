"""Learning-rate schedules and the optimizer choice."""

import math

import pytest
import torch
from torch import nn

from lorakit.config import TrainConfig
from lorakit.train.optim import build_scheduler


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


def test_optimizer_choice_is_fused_adamw_unless_paged_is_asked_for():
    """``train.optimizer`` auto / adamw: torch AdamW (fused on CUDA), also over a k-bit base (QLoRA);
    ``paged_adamw`` is the explicit choice of bitsandbytes' paged AdamW (torch AdamW on CPU)."""
    from lorakit.train.optim import build_optimizer, optimizer_name

    params = [{"params": [nn.Parameter(torch.zeros(2, 2))], "lr": 1e-3, "weight_decay": 0.0}]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for choice in ("auto", "adamw"):
        train = TrainConfig(optimizer=choice)
        opt = build_optimizer(params, train, cpu)
        assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]
        assert optimizer_name(train, cpu) == "AdamW" and optimizer_name(train, cuda) == "fused AdamW"
    paged = TrainConfig(optimizer="paged_adamw")
    assert optimizer_name(paged, cuda) == "paged AdamW" and optimizer_name(paged, cpu) == "AdamW"
    assert type(build_optimizer(params, paged, cpu)) is torch.optim.AdamW  # paging needs CUDA
