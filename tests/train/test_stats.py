"""Losses read one step late (lorakit.train.stats): same records, and a non-finite step never applied."""

import json

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train.stats import StepStats, skips_nonfinite_on_device
from tests.train.test_loop import make_trainer


def fused_optimizer(trainer):
    """The trainer's optimizer as torch's fused AdamW (its CUDA default), here on the CPU."""
    from lorakit.train.optim import build_scheduler

    cfg = trainer.recipe.train
    groups = trainer.method.param_groups(trainer.model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    warmup = int(cfg.warmup_ratio * trainer.total_steps)
    return optimizer, build_scheduler(optimizer, cfg.lr_scheduler, trainer.total_steps, warmup)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


def test_fused_adamw_skips_a_flagged_update():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert skips_nonfinite_on_device(optimizer)
    assert not skips_nonfinite_on_device(torch.optim.AdamW([p], lr=0.1))
    p.grad = torch.full((3,), float("nan"))
    optimizer.found_inf = StepStats(1, torch.tensor(float("nan"))).nonfinite()
    optimizer.step()
    assert torch.equal(p.detach(), torch.ones(3)) and optimizer.state[p]["step"].item() == 0
    p.grad = torch.ones(3)
    optimizer.found_inf = StepStats(2, torch.tensor(1.0), torch.tensor(1.0)).nonfinite()
    optimizer.step()
    assert optimizer.state[p]["step"].item() == 1 and (p.detach() < 1).all()


def test_deferred_reading_logs_the_same_losses(tmp_path):
    """Fused AdamW (stats read one step late) and plain AdamW (read at once) log the same steps and
    losses, and the deferred run's records are complete and in order."""
    train = {"max_steps": 5, "save_every": 2, "eval_every": 3, "gradient_accumulation_steps": 1}
    plain = make_trainer(tmp_path, "plain", method={"lora_dropout": 0.0}, train=train)
    plain.train()
    late = make_trainer(tmp_path, "late", method={"lora_dropout": 0.0}, train=train)
    late.make_optimizer = lambda: fused_optimizer(late)
    late.train()
    a, b = records(tmp_path / "plain"), records(tmp_path / "late")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in b)
    speeds = sorted(r["tokens_per_s"] for r in b)  # each record times whole steps, also at eval / save / end
    assert speeds[-1] < 10 * speeds[len(speeds) // 2], speeds


def test_nonfinite_step_mid_run_stops_before_anything_is_saved(tmp_path):
    """Read one step late: a NaN at step 2 of 4 is reported as step 2 (step 3 may have run) and no
    checkpoint is written after it."""
    t = make_trainer(tmp_path, train={"max_steps": 4, "save_every": None, "gradient_accumulation_steps": 1})
    t.make_optimizer = lambda: fused_optimizer(t)
    real_loss = t.loss
    t.loss = lambda batch, num_items=None: real_loss(batch, num_items) * (float("nan") if t.step == 1 else 1.0)
    with pytest.raises(LorakitError, match="loss became nan at step 2; .*the step after it may already have run"):
        t.train()
    assert t.step == 3 and not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_is_not_applied(tmp_path, fused):
    """A NaN loss at step 2 stops training with a one-line error naming step 2; the weights are those
    after step 1, whether the step was checked before the update (plain) or skipped on the device (fused)."""
    t = make_trainer(tmp_path, train={"max_steps": 2, "save_every": None})
    if fused:
        t.make_optimizer = lambda: fused_optimizer(t)
    after_first = {}
    real_loss, real_step = t.loss, t.optimizer_step

    def step(batches, optimizer, scheduler):
        if t.step == 1:
            after_first.update({n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad})
        return real_step(batches, optimizer, scheduler)

    t.optimizer_step = step
    t.loss = lambda batch, num_items=None: real_loss(batch, num_items) * (float("nan") if t.step == 1 else 1.0)
    with pytest.raises(LorakitError, match="loss became nan at step 2; .*that update was not applied"):
        t.train()
    for n, p in t.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, after_first[n]), n
