"""k-bit bases (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, §3): preparation, dequantization, optimizer.

Any method trains over a bitsandbytes base: ``Linear4bit`` (NF4/FP4, blockwise absmax over 64 weights,
double quantization of the fp32 scales in blocks of 256) or ``Linear8bitLt`` (LLM.int8(), row-wise
absmax). The adapter wraps the quantized layer and ``base_layer(x)`` does the dequant matmul in the
compute dtype (fp32 on CPU, bf16 on CUDA; see :mod:`lorakit.models`).

- :func:`prepare_kbit_model`: before attaching the adapter: freeze every parameter, keep a (trained)
  classification head in fp32. Unlike PEFT's ``prepare_model_for_kbit_training``, frozen norms and
  other small tensors keep the load dtype (see the function). With gradient checkpointing the session
  makes the inputs require grad.
- :func:`dequantize_weight`: W0 as fp32 ``(out, in)``: NF4/FP4 ``dequantize_4bit``; int8 ``CB·SCB/127``.
- :func:`dequantize_model`: after a merge, replace every remaining quantized linear by an ``nn.Linear``
  and drop the quantization config, so the folder loads with a plain ``from_pretrained``.
- :func:`kbit_optimizer_class`: paged AdamW 32-bit (bitsandbytes) on CUDA; ``torch.optim.AdamW`` on CPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def is_quantized_linear(module: nn.Module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (recognized by their weight's class)."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in QUANTIZED_PARAMS


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


def _unpack_cpu_4bit(data: torch.Tensor, state):
    """bitsandbytes ≥ 0.49 repacks a ``Linear4bit`` for its AVX512-BF16 CPU kernel at the first no-grad
    eval forward (nibbles reordered, absmax un-nested, transposed and cast to bf16). Undo the layout on
    copies; the scales stay the bf16 values the packed kernel computes with."""
    import bitsandbytes.functional as bnbf

    packed_absmax = state.absmax
    state = copy.copy(state)
    state.original_nested = False  # we restore the (un-nested) absmax ourselves below
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), state)
    state.absmax = packed_absmax.t().reshape(-1).float()
    return data, state


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes linear layer as fp32 ``(out, in)``.

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` (NF4/FP4 code × block absmax, the absmax itself
    dequantized first under double quantization). int8: ``CB · SCB / 127`` with ``SCB`` the per-row
    absmax, found on the weight before the first forward and on ``layer.state`` after it.

    Raises:
        TypeError: ``layer`` is not a bitsandbytes linear layer.
    """
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu_4bit(data, state)
        return bnbf.dequantize_4bit(data, state).float()
    if kind == "Int8Params":
        if weight.dtype != torch.int8:  # has_fp16_weights: still a float weight
            return weight.detach().float()
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(layer, "state", None), "SCB", None)
        if scb is None:
            raise TypeError(f"{type(layer).__name__}: int8 weight without its row scales (SCB)")
        return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes linear layer")


def prepare_kbit_model(model: nn.Module, head_names: tuple[str, ...] = ("score", "classifier")) -> nn.Module:
    """Ready a k-bit model for adapter training (call before attaching the adapter).

    Freezes every parameter and casts a classification head (``head_names``, trained later) to fp32
    master weights. Norms, biases and embeddings keep the load dtype: they are frozen, so an fp32 copy
    holds the same values, and a bf16 base with fp32 norm weights would turn every norm output, hence the
    residual stream and the projections after it (bitsandbytes returns its input's dtype), into fp32 —
    twice the activation memory and slower elementwise passes than LoRA on the same bf16 base (measured
    in docs/benchmarks.md). PEFT's ``prepare_model_for_kbit_training`` upcasts them for fp16 training;
    lorakit trains in bf16 or fp32.
    Also stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel, which changes the
    weights' layout and rounds the scales to bf16 at the first eval-mode forward (train and eval would
    then compute different functions). Returns ``model``.
    """
    quantized = {id(p) for m in model.modules() if is_quantized_linear(m) for p in m.parameters()}
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" or hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    for name, module in model.named_modules():
        is_head = bool(name) and name.split(".")[0] in head_names
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
            if is_head and id(param) not in quantized and param.dtype.is_floating_point:
                param.data = param.data.float()
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every bitsandbytes linear by an ``nn.Linear`` holding its dequantized weight, cast the
    floating tensors to ``dtype``, and clear the quantization markers (``config.quantization_config``,
    ``hf_quantizer``), so ``save_pretrained`` writes a plain model. Returns ``model``."""
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantize_weight(module).to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        model.__dict__.pop(attr, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for param in model.parameters():
        if param.dtype.is_floating_point:
            param.data = param.data.to(dtype)
    if config is not None:
        config.dtype = dtype
    return model


_SAID_CPU = False


def kbit_optimizer_class(device: torch.device) -> type[torch.optim.Optimizer]:
    """The optimizer for training over a k-bit base: ``bitsandbytes.optim.PagedAdamW32bit`` on CUDA
    (QLoRA §3: paged optimizer states absorb memory spikes); ``torch.optim.AdamW`` on CPU, where paging
    does not exist — said once per process. Both take ``(groups, lr=..., weight_decay=...)``."""
    global _SAID_CPU
    if torch.device(device).type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit
    if not _SAID_CPU:
        from lorakit.assets import console

        console.print("[dim]k-bit base on CPU: paged AdamW needs CUDA, training with torch.optim.AdamW[/dim]")
        _SAID_CPU = True
    return torch.optim.AdamW
