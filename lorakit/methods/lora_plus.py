"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): LoRA with a larger learning rate for B.

    h = W0 x + b + s · B (A dropout(x)),   s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Parameters, shapes, init, scaling and merge are exactly LoRA's (``lorakit.methods.lora``): A
``(r, in)`` Kaiming-uniform, B ``(out, r)`` zeros, merge W ← W0 + s·BA. Only the optimizer differs:
lr_B = λ·lr_A with λ = ``loraplus_lr_ratio`` λ ≫ 1 (the paper's infinite-width analysis: equal rates
do not learn features efficiently; its experiments recommend λ ≈ 2⁴ for LLMs), so this method
defaults λ to 16 and requires one.
The groups (:func:`lorakit.methods.param_groups.build_param_groups`, asked by every A/B method's
:meth:`~lorakit.methods.base.Method.param_groups`): A and other ≥2-D trainables at lr; B
and 1-D trainables at λ·lr; adapters on embeddings at ``loraplus_lr_embedding``; every ≥2-D group
decays by ``train.weight_decay``, 1-D tensors never. Any A/B method gets the same groups by setting
``loraplus_lr_ratio`` in its recipe; ``lora_plus`` is the named, defaulted form for plain LoRA.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from lorakit.methods.config import LoraConfig
from lorakit.methods.registry import register
from lorakit.methods.lora import Lora, LoraLayer


class LoraPlusConfig(LoraConfig):
    """LoRA's fields; ``loraplus_lr_ratio`` (λ = lr_B / lr_A) defaults to 16 and cannot be null."""

    name: str = "lora_plus"
    loraplus_lr_ratio: float = Field(16.0, gt=0, description="λ: lr of lora_B = λ × learning_rate (the paper recommends ≈ 2⁴ for LLMs)")

    @field_validator("loraplus_lr_ratio", mode="before")
    @classmethod
    def _ratio_required(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("lora_plus needs a learning-rate ratio lr_B/lr_A (default 16); "
                             "for plain LoRA use method.name: lora")
        return value


@register
class LoraPlus(Lora):
    name = "lora_plus"
    paper = "Hayou et al. 2024, arXiv 2402.12354"
    trains = "lora_A (lr), lora_B (λ·lr)"
    config_class = LoraPlusConfig
    layer_class = LoraLayer
