"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.config import MethodConfig, TrainConfig


def build_param_groups(model: nn.Module, train: TrainConfig, method: MethodConfig) -> list[dict]:
    """AdamW groups over the trainable parameters, each carrying its own lr and weight_decay.

    Without ``method.loraplus_lr_ratio``: matrices at (lr, weight_decay), 1-D tensors at (lr, 0).
    With ratio λ (LoRA+, Hayou et al. 2024, §4, as the widely used implementation groups them):
    ``lora_B`` matrices and 1-D trainables at λ·lr, other matrices at lr, adapters on embeddings
    at ``method.loraplus_lr_embedding``. Weight decay is set per group, since a group's own value
    overrides the optimizer's default. Empty groups are dropped.
    """
    lr, wd, ratio = train.learning_rate, train.weight_decay, method.loraplus_lr_ratio
    groups: dict[str, dict] = {}

    def add(key: str, param: nn.Parameter, group_lr: float, decay: float) -> None:
        groups.setdefault(key, {"params": [], "lr": group_lr, "weight_decay": decay, "name": key})
        groups[key]["params"].append(param)

    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2
        decay = wd if is_matrix else 0.0
        if ratio is None:
            add("decay" if is_matrix else "no_decay", param, lr, decay)
        elif id(param) in embedding_params or "embed" in name and "lora_" in name:
            add("embedding", param, method.loraplus_lr_embedding, decay)
        elif "lora_B" in name or not is_matrix:
            add("lora_B" if is_matrix else "no_decay", param, lr * ratio, decay)
        else:
            add("lora_A", param, lr, decay)
    return list(groups.values())


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then linear decay to 0, cosine decay to 0, or constant."""

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


def build_optimizer(groups: list[dict], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``groups``; the fused CUDA kernel on GPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused)
