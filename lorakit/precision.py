"""Compute precision of training, evaluation and generation: ``train.precision`` (auto | bf16 | fp32).

``bf16``: the frozen base is loaded in bfloat16 (``model.dtype: auto``) and forward passes run under
bf16 autocast; adapter weights stay fp32 master weights (the optimizer updates fp32), as on GPU
(Micikevicius et al. 2018, mixed precision; bf16: Kalamkar et al. 2019). ``fp32``: no autocast, an
fp32 base. ``auto``: bf16 on CUDA and on CPUs with native bf16 matrix instructions (AVX-512 BF16 or
AMX), fp32 elsewhere (emulated bf16 is slower than fp32 there) and over a k-bit base on CPU.

Stated tolerance of the bf16 path: the first 50 losses stay within 1e-2 relative of the fp32 path
(CPU, tiny Llama: tests/fast/test_tracking.py, measured 3.3e-4 / 3.7e-4 for LoRA / DoRA; GPU:
docs/benchmarks.md, 8.8e-4). Speed: docs/benchmarks.md.
"""

from __future__ import annotations

import torch

CHOICES = ("auto", "bf16", "fp32")


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(choice: str, device: torch.device, quantized: bool = False) -> str:
    """``bf16`` or ``fp32``: what ``train.precision`` = ``choice`` means on ``device``. ``auto`` is fp32 on
    CPU over a k-bit base (``quantized``; bitsandbytes computes in fp32 there). Raises ValueError for a
    choice other than auto, bf16, fp32."""
    if choice not in CHOICES:
        raise ValueError(f"train.precision {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu() and not quantized):
        return "bf16"
    return "fp32"


def recipe_precision(recipe, device: torch.device) -> str:
    """:func:`resolve_precision` of a recipe's ``train.precision`` (its ``model.quantization`` included)."""
    return resolve_precision(recipe.train.precision, device, recipe.model.quantization is not None)


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
