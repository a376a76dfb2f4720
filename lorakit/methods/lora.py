"""LoRA (Hu et al. 2021, arXiv 2106.09685, §4.1) with rsLoRA scaling (Kalajdzievski 2023, arXiv 2312.03732).

    h = W0 x + b + s · B (A dropout(x)),   s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Shapes: x ``(..., in)``, ``lora_A.weight`` A ``(r, in)`` Kaiming-uniform (a=√5, i.e. U(±1/√in)),
``lora_B.weight`` B ``(out, r)`` zeros, so the adapter is a no-op at init. W0 and b stay frozen.
Merge: W ← W0 + s·BA, the product in fp32 and cast once. Trainable parameters per layer: r·(in + out).

Speed: unless a subclass overrides :meth:`LoraLayer.lora_output`, the branch is added to the base output
by one ``addmm`` (:func:`lorakit.methods.ops.lora_into`: the GEMM epilogue applies s and adds), when the
dtypes allow it (:func:`lorakit.methods.ops.can_fuse`); the result equals the plain path up to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.methods.base import AdapterLayer, Method, kaiming_uniform_
from lorakit.methods.config import LoraConfig
from lorakit.methods.ops import can_fuse, lora_into
from lorakit.methods.registry import register


def adapter_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cast the branch input to the adapter's dtype unless autocast already governs the matmul."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


class LoraLayer(AdapterLayer):
    """``base_layer`` plus s·B(A dropout(x)); the parent of every A/B method's layer."""

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig):
        super().__init__(base_layer)
        self.r = cfg.r
        self.scaling = cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        kaiming_uniform_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s·B(A dropout(x)) of shape ``(..., out)``."""
        x = adapter_input(self.lora_dropout(x), self.lora_A.weight)
        return self.lora_B(self.lora_A(x)) * self.scaling

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if type(self).lora_output is LoraLayer.lora_output and can_fuse(x, base_out, self.lora_A.weight):
            return lora_into(base_out, self.lora_dropout(x), self.lora_A.weight, self.lora_B.weight, self.scaling)
        return base_out + self.lora_output(x).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def ratio_parameters(self) -> list[nn.Parameter]:
        return [self.lora_B.weight]

    def is_plain_lora(self, strict: bool = True) -> bool:
        cls = type(self)
        same = (cls.adapter_forward is LoraLayer.adapter_forward and cls.delta_weight is LoraLayer.delta_weight
                and cls.merged_weight is AdapterLayer.merged_weight)
        return same and (not strict or cls.lora_output is LoraLayer.lora_output)


@register
class Lora(Method):
    name = "lora"
    paper = "Hu et al. 2021, arXiv 2106.09685"
    trains = "lora_A, lora_B"
    config_class = LoraConfig
    layer_class = LoraLayer

    @classmethod
    def imports_peft(cls, config: dict) -> bool:
        """A PEFT LoRA folder without ``use_dora`` starts this method (and its subclasses)."""
        return config.get("peft_type") == "LORA" and not config.get("use_dora")
