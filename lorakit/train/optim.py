"""Optimizer parameter groups and learning-rate schedules.

Groups built by :func:`build_param_groups`, each carrying its own ``lr`` and ``weight_decay`` (a
group's own value overrides the optimizer's default, so a default alone would silently do nothing):

===========  ===========================================  ====================  ===============
group        members (trainable parameters only)          lr                    weight_decay
===========  ===========================================  ====================  ===============
decay        ≥2-D tensors (no LoRA+ ratio)                 lr                    weight_decay
no_decay     1-D tensors (biases, vectors)                 lr, or λ·lr (LoRA+)   0
lr           LoRA+: A matrices and every other ≥2-D tensor lr                    weight_decay
lora_B       LoRA+: ``lora_B`` matrices                    λ·lr                  weight_decay
embedding    LoRA+: tensors of adapters on nn.Embedding    loraplus_lr_embedding  weight_decay / 0
===========  ===========================================  ====================  ===============

LoRA+ (Hayou et al. 2024, arXiv 2402.12354, §4; the groups of the reference implementation and of
``peft.optimizers.create_loraplus_optimizer``): λ = ``method.loraplus_lr_ratio``. One deliberate
difference from PEFT's helper: PEFT decays 1-D tensors that are not biases or norms (a DoRA magnitude,
VeRA's vectors) and takes its decay from ``loraplus_weight_decay`` (default 0), ignoring a plain
``weight_decay``; lorakit decays every ≥2-D group by ``train.weight_decay`` and never decays 1-D ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.config import MethodConfig, TrainConfig

GROUP_ORDER = ("decay", "lr", "lora_B", "no_decay", "embedding")  # the lr-group first: it is logged


def _embedding_adapter_params(model: nn.Module) -> set[int]:
    """ids of the adapter tensors (not the frozen base) of adapter layers that wrap an nn.Embedding."""
    from lorakit.methods.base import AdapterLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer) and isinstance(module.base_layer, nn.Embedding):
            base = {id(p) for p in module.base_layer.parameters()}
            ids |= {id(p) for p in module.parameters() if id(p) not in base}
    return ids


def build_param_groups(model: nn.Module, train: TrainConfig, method: MethodConfig) -> list[dict]:
    """AdamW groups over the trainable parameters of ``model`` (see the module docstring's table).

    Returns a list of dicts with ``params``, ``lr``, ``weight_decay`` and ``name``, in the order of
    ``GROUP_ORDER`` (so group 0, whose lr the trainer logs, is at the recipe's lr); empty groups are
    dropped. A ``lora_B`` matrix is recognized by a name component ``lora_B`` (``….lora_B.weight``).
    """
    lr, wd, ratio = train.learning_rate, train.weight_decay, method.loraplus_lr_ratio
    groups: dict[str, dict] = {}

    def add(key: str, param: nn.Parameter, group_lr: float, decay: float) -> None:
        groups.setdefault(key, {"params": [], "lr": group_lr, "weight_decay": decay, "name": key})
        groups[key]["params"].append(param)

    embedding = _embedding_adapter_params(model) if ratio is not None else set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2
        decay = wd if is_matrix else 0.0
        if ratio is None:
            add("decay" if is_matrix else "no_decay", param, lr, decay)
        elif id(param) in embedding:
            add("embedding", param, method.loraplus_lr_embedding, decay)
        elif not is_matrix:
            add("no_decay", param, lr * ratio, 0.0)
        elif "lora_B" in name.split("."):
            add("lora_B", param, lr * ratio, decay)
        else:
            add("lr", param, lr, decay)
    return [groups[key] for key in GROUP_ORDER if key in groups]


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


def build_optimizer(
    groups: list[dict], train: TrainConfig, device: torch.device, quantized: bool = False
) -> torch.optim.Optimizer:
    """AdamW over ``groups``; the fused CUDA kernel on GPU. Over a k-bit base (QLoRA, Dettmers et al.
    2023, §3): bitsandbytes' paged AdamW on CUDA, plain AdamW on CPU (said once in the log)."""
    if quantized:
        from lorakit.quant import kbit_optimizer_class

        return kbit_optimizer_class(device)(groups, lr=train.learning_rate, weight_decay=train.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused)
