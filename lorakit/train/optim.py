"""Optimizer and learning-rate schedule of a training run (the groups come from the method:
:meth:`lorakit.methods.base.Method.param_groups`)."""

from __future__ import annotations

import math

import torch

from lorakit.config import TrainConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiply every group's own lr by f(step), the factor for optimizer step ``step`` (0-based).

    Warmup: f = (step + 1) / (warmup_steps + 1) for step < warmup_steps (so the first step is not
    wasted at lr 0), reaching 1 at ``warmup_steps``. Then, with p = (step − warmup) / (total − warmup)
    clamped to [0, 1]: ``linear`` 1 − p, ``cosine`` (1 + cos πp) / 2, ``constant`` 1 — the decay of
    transformers' ``get_{linear,cosine}_schedule_with_warmup``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_name(train: TrainConfig, device: torch.device) -> str:
    """What ``train.optimizer`` means on ``device``: ``paged AdamW`` (bitsandbytes' paged AdamW 32-bit, CUDA
    only; explicit ``paged_adamw``), ``fused AdamW`` (``auto`` / ``adamw`` on CUDA, over a k-bit base too)
    or ``AdamW`` (elsewhere). For the speed line at the start of training."""
    if train.optimizer == "paged_adamw" and device.type == "cuda":
        return "paged AdamW"
    return "fused AdamW" if device.type == "cuda" else "AdamW"


def build_optimizer(groups: list[dict], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``groups``: torch's fused CUDA kernel on GPU (also over a k-bit base: paged AdamW cost
    14–27% of the QLoRA step, docs/benchmarks.md); ``train.optimizer: paged_adamw`` takes bitsandbytes'
    paged AdamW 32-bit (QLoRA, Dettmers et al. 2023, §3: paging absorbs memory spikes), plain AdamW on
    CPU (said once in the log)."""
    if train.optimizer == "paged_adamw":
        from lorakit.quant import kbit_optimizer_class

        return kbit_optimizer_class(device)(groups, lr=train.learning_rate, weight_decay=train.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused)
