"""The adapter layer every method builds: a frozen ``base_layer`` plus an adapter branch.

The shapes follow ``nn.Linear``: the base weight W0 is ``(out_features, in_features)``; GPT-2's
``Conv1D`` stores ``(in, out)`` and is transposed on read and on merge.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.quant import dequantize_weight, is_quantized_linear


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a 4/8-bit Linear or a GPT-2 Conv1D."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight W0 as fp32 ``(out, in)``, dequantized for bitsandbytes layers."""
    if is_quantized_linear(layer):  # bnb Params4bit / Int8Params
        return dequantize_weight(layer)
    weight = layer.weight.detach().float()
    return weight.t() if is_conv1d(layer) else weight


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus an adapter branch.

    Subclasses implement :meth:`adapter_forward` and :meth:`delta_weight` (or :meth:`merged_weight`
    when the merge is not additive, as in DoRA). ``forward(x)`` takes ``(..., in_features)`` and returns
    ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        return self.adapter_forward(x, result)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Return the layer output given the input x and the base output ``base_layer(x)``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW as fp32 ``(out, in)``, such that the merged weight is W0 + ΔW."""
        raise NotImplementedError

    def ratio_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at λ·lr (Hayou et al. 2024, §4: the ``lora_B`` matrices); none here."""
        return []

    def is_plain_lora(self, strict: bool = True) -> bool:
        """True when this layer computes exactly W0x + b + s·B(A x̃) with ``lora_A``/``lora_B`` and ``scaling``
        (so PEFT's LoRA reproduces it); ``strict`` also asks for LoRA's own branch code. No here."""
        return False

    def merged_weight(self) -> torch.Tensor:
        """The fp32 ``(out, in)`` weight of the equivalent plain layer (W0 + ΔW unless overridden)."""
        return base_weight(self.base_layer) + self.delta_weight()

    def merged_layer(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) computing what this layer computes, bias unchanged.

        The product is done in fp32 and cast once to ``dtype`` (default: the base weight's float dtype,
        float32 for a quantized base).
        """
        weight = self.merged_weight()
        base = self.base_layer
        if dtype is None:
            dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        bias = None if base.bias is None else base.bias.detach().to(dtype)
        device = weight.device
        if self.fan_in_fan_out:
            layer = type(base)(self.out_features, self.in_features)
            layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
            layer.bias = nn.Parameter(bias if bias is not None else torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False)
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer


def kaiming_uniform_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-uniform with a=√5 as ``nn.Linear`` uses: U(±1/√fan_in) for a ``(fan_out, fan_in)`` weight."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        return weight.uniform_(-bound, bound, generator=generator)
