"""Compute precision of training, evaluation and generation: ``train.precision`` (auto | bf16 | fp32).

``bf16``: the frozen base is loaded in bfloat16 (``model.dtype: auto``) and forward passes run under
bf16 autocast; adapter weights stay fp32 master weights (the optimizer updates fp32), as on GPU
(Micikevicius et al. 2018, mixed precision; bf16: Kalamkar et al. 2019). ``fp32``: no autocast, an
fp32 base. ``auto``: bf16 on CUDA, fp32 on CPU (``bf16`` on a CPU with native bf16 matrix instructions,
AVX-512 BF16 or AMX, is 1.6-2.2x faster, opt-in; emulated bf16 is slower than fp32).

Stated tolerance of the bf16 path: the first 50 losses stay within 1e-2 relative of the fp32-adapter
reference (CPU, tiny Llama: tests/fast/test_tracking.py, measured 3.3e-4 / 3.7e-4 for LoRA / DoRA;
GPU, random-weight Qwen2.5 shape against PEFT on the same bf16 base: docs/benchmarks.md, 2.0e-3). On
the real SmolLM2 on CPU, bf16 against an fp32 base leaves that tolerance (up to 2.8e-2 per step), as
PEFT's own bf16 does: hence fp32 stays the CPU default. Speed: docs/benchmarks.md.
"""

from __future__ import annotations

import torch

CHOICES = ("auto", "bf16", "fp32")


def resolve_precision(choice: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what ``train.precision`` = ``choice`` means on ``device``. ``auto`` is bf16 on
    CUDA and fp32 on CPU: on real models the bf16 losses leave the 1e-2 tolerance of PEFT's fp32
    default on CPU (docs/benchmarks.md), so bf16 there is opt-in (fast on CPUs with AVX-512 BF16 or
    AMX). Raises ValueError for a choice other than auto, bf16, fp32."""
    if choice not in CHOICES:
        raise ValueError(f"train.precision {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" else "fp32"


def recipe_precision(recipe, device: torch.device) -> str:
    """:func:`resolve_precision` of a recipe's ``train.precision``."""
    return resolve_precision(recipe.train.precision, device)


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of ``precision`` (auto | bf16 | fp32) on ``device``: bf16 autocast, or
    disabled for fp32."""
    enabled = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def cpu_check_overrides(device: torch.device) -> dict | None:
    """Recipe overrides for ``merge`` / ``export``, which write weights and check them against the
    adapter model: fp32 on CPU (a one-off pass, so speed does not matter there and the merged weights
    keep the fp32 base), None (the recipe's precision) on GPU."""
    return {"train": {"precision": "fp32"}} if device.type == "cpu" else None
