"""The interface every adapter method implements: a layer (init, forward, delta, merge) and hooks.

A method is one module in ``lorakit/methods/``: a config class (its recipe fields), a layer class that
wraps a frozen base layer, and a :class:`Method` subclass whose hooks the trainer calls without knowing
the method by name. The shapes follow ``nn.Linear``: the base weight W0 is ``(out_features,
in_features)``; GPT-2's ``Conv1D`` stores ``(in, out)`` and is transposed on read and on merge.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from lorakit.config import MethodConfig, TrainConfig


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a 4/8-bit Linear or a GPT-2 Conv1D."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight W0 as fp32 ``(out, in)``, dequantized for bitsandbytes layers."""
    from lorakit.quant import dequantize_weight, is_quantized_linear

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


class Method:
    """A registered adapter method: builds layers and supplies the trainer's hooks.

    Hooks (each optional; the defaults do nothing special):
      - ``prepare(ctx)``: once before training, not on resume (LoRA-drop's selection pass).
      - ``param_groups(model, train)``: the optimizer's groups (LoRA+ learning-rate ratio).
      - ``before_step(step)``: before each optimizer step's forward passes (DyLoRA's rank draw).
      - ``after_optimizer_step(step, optimizer)``: after ``optimizer.step()`` (Delta-LoRA).
      - ``evaluate(run_eval, **options)``: held-out metrics (DyLoRA evaluates at several ranks).
      - ``merge(model)``: replace every adapter layer by a plain merged layer.
      - ``state_dict()`` / ``load_state_dict(state)``: JSON-able method state for checkpoints.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    trains: ClassVar[str] = "lora_A, lora_B"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    layer_class: ClassVar[type[AdapterLayer]]
    mergeable: ClassVar[bool] = True
    default_quantization: ClassVar[str | None] = None  # model.quantization when the recipe leaves it unset
    HOOKS: ClassVar[tuple[str, ...]] = (
        "prepare", "param_groups", "before_step", "after_optimizer_step", "evaluate", "merge",
        "state_dict", "export_peft",
    )

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.layers: dict[str, AdapterLayer] = {}

    # ---- building -------------------------------------------------------------------------------
    def make_layer(self, name: str, base: nn.Module) -> AdapterLayer:
        return self.layer_class(base, self.cfg)

    def attach(self, model: nn.Module, task: str = "causal_lm") -> None:
        """Freeze ``model`` and wrap every target module. Raises LorakitError if nothing matches."""
        from lorakit.inject import inject

        self.layers = inject(model, self, task)

    @classmethod
    def hooks_used(cls) -> list[str]:
        return [h for h in cls.HOOKS if getattr(cls, h) is not getattr(Method, h)]

    # ---- hooks ----------------------------------------------------------------------------------
    def prepare(self, ctx: Any) -> None:
        pass

    def param_groups(self, model: nn.Module, train: TrainConfig) -> list[dict]:
        """AdamW groups. With ``loraplus_lr_ratio`` λ (Hayou et al. 2024, §4): ``lora_B`` and 1-D
        trainables at λ·lr, 2-D others at lr, adapters on embeddings at ``loraplus_lr_embedding``.
        Weight decay is set in every group (1-D parameters get none)."""
        from lorakit.train.optim import build_param_groups

        return build_param_groups(model, train, self.cfg)

    def before_step(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def evaluate(self, run_eval: Callable[[], dict], **options: Any) -> dict:
        return run_eval()

    def merge(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from lorakit.inject import replace_module

        for name, layer in self.layers.items():
            replace_module(model, name, layer.merged_layer(dtype))
        self.layers = {}
        return model

    def export_peft(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """This adapter as PEFT files: (``adapter_config.json`` mapping, ``adapter_model.safetensors``
        tensors by PEFT key), or None when PEFT has no faithful equivalent (merge instead). Default:
        :func:`lorakit.export.builtin_export` (layers with LoRA's math); other methods override it."""
        from lorakit.export import builtin_export

        return builtin_export(self, model)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
