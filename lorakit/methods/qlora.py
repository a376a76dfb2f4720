"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314, §3 and §4 "QLoRA vs. standard finetuning"): LoRA over a
4-bit NormalFloat base.

    y = dequant(Wq) x + b + s · B (A dropout(x)),   s = lora_alpha / r

Base: every linear layer but the heads is a bitsandbytes ``Linear4bit`` holding Wq, NF4 codes with one
absmax per block of 64 weights; double quantization stores those fp32 scales as 8-bit values in blocks of
256 (≈0.127 instead of 0.5 bit per parameter). ``base_layer(x)`` dequantizes and multiplies in the compute
dtype (bf16 on CUDA, fp32 on CPU). ``model.quantization`` defaults to ``nf4`` for this method (``fp4`` and
``int8`` also work); the same k-bit base composes with every other method (QDoRA, QVeRA, …).

Adapter: exactly LoRA (:mod:`lorakit.methods.lora`): A ``(r, in)`` Kaiming-uniform, B ``(out, r)`` zeros,
both fp32; r·(in + out) trainable parameters per layer. Defaults are the paper's: all linear layers
(not the LM head), r = 64, lora_alpha = 16, dropout 0.05 (0.1 for models up to 13B in the paper).
Training: fused AdamW on CUDA by default (``train.optimizer: paged_adamw`` for the paper's paged AdamW
32-bit, :func:`lorakit.quant.kbit_optimizer_class`); frozen norms keep the load dtype
(:func:`lorakit.quant.prepare_kbit_model`); decoder layers compiled as for LoRA (``train.compile: auto``).

Merge: W' = dequant(Wq) + s·BA, saved unquantized (``lorakit merge``): it reproduces the trained function
exactly. ``--onto original`` merges onto the original 16/32-bit weights instead, which deviates from
the trained function by the quantization error.
"""

from __future__ import annotations

from pydantic import Field

from lorakit.methods.config import LoraConfig
from lorakit.methods.registry import register
from lorakit.methods.lora import Lora


class QLoraConfig(LoraConfig):
    """LoRA's fields with QLoRA's defaults (paper §4 / Appendix B.2)."""

    name: str = "qlora"
    r: int = Field(64, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


@register
class QLora(Lora):
    name = "qlora"
    paper = "Dettmers et al. 2023, arXiv 2305.14314"
    trains = "lora_A, lora_B (over an NF4 base)"
    config_class = QLoraConfig
    default_quantization = "nf4"
