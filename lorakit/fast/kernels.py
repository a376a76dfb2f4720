"""Model-level speed-ups applied by the trainer: liger-kernel's RMSNorm and SwiGLU, ``torch.compile``.

- ``train.kernels`` (``auto``: on CUDA when ``liger_kernel`` imports; ``liger``; ``none``): every
  RMSNorm of a Llama-style model (Llama, Mistral, Qwen2/3) gets liger's Triton RMSNorm ("llama"
  casting: inverse RMS in fp32, as transformers), which saves its input and 1/rms instead of fp32
  copies; every SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj`` with SiLU) computes
  ``silu(gate) * up`` in one kernel that saves only the two projections and recomputes the rest.
  The patch replaces the ``forward`` of those module instances only (no global monkey-patching), so
  adapter layers inside the MLP keep working. Note: liger's SwiGLU backward overwrites its saved
  inputs (the gate/up outputs) with their gradients, so an adapter layer must not save its own output
  for its backward pass (none in lorakit does).
- ``train.compile`` (``auto``: ``cudagraphs`` on CUDA unless the base is quantized or activation
  checkpointing is on, else off; plain compile with gradient accumulation;
  ``cudagraphs``: compiled layers replayed as CUDA graphs, ``mode="reduce-overhead"``, with batches
  padded to a multiple of 64 tokens so few shapes are recorded; ``true``: plain compile; ``false``):
  ``torch.compile`` each decoder layer (the compile time, seconds, is paid at the first steps; see
  docs/benchmarks.md).
- ``train.activation_memory_budget`` (compiled layers only): the fraction of a layer's activations that
  torch.compile's min-cut partitioner may keep for the backward pass
  (``torch._functorch.config.activation_memory_budget``); it recomputes the cheapest of the rest in the
  backward. Selective activation checkpointing without a recipe of which op to keep.
"""

from __future__ import annotations

import types

import torch
from torch import nn

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")


def liger_kernels_available() -> bool:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # noqa: F401
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: F401
    except Exception:  # ImportError, Triton without a GPU, ...
        return False
    return True


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation"))


def apply_liger(model: nn.Module) -> list[str]:
    """Patch RMSNorm and SwiGLU modules of a Llama-style ``model`` in place; returns what was patched
    (``["rms_norm×N", "swiglu×M"]``), empty for other architectures."""
    if getattr(getattr(model, "config", None), "model_type", None) not in LLAMA_STYLE:
        return []
    norms = mlps = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_forward, module)
            norms += 1
        elif _is_swiglu(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            mlps += 1
    return [f"liger rms_norm×{norms}"] * bool(norms) + [f"liger swiglu×{mlps}"] * bool(mlps)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "-", None)
    for holder in (backbone, model):
        layers = getattr(holder, "layers", None) or getattr(holder, "h", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def compile_layers(model: nn.Module, mode: str | None = None) -> list[str]:
    """``torch.compile`` every decoder layer in place (``mode``: torch.compile's, e.g.
    ``reduce-overhead`` for CUDA graphs); returns ``["compile×N"]`` (``"compile×N as CUDA graphs"``) or [] if
    none found."""
    layers = decoder_layers(model)
    if layers is None:
        return []
    for layer in layers:
        layer.compile(mode=mode)
    return [f"compile×{len(layers)}" + (" as CUDA graphs" if mode == "reduce-overhead" else f" ({mode})" if mode else "")]


def compile_mode(train, device: torch.device, auto_ok: bool = True, auto_graphs: bool = True) -> str | None:
    """``train.compile`` resolved to torch.compile's mode: None (no compile), ``default`` (``true``), or
    ``reduce-overhead`` (``cudagraphs``: the compiled layers replayed as CUDA graphs; CUDA only, plain
    compile elsewhere). ``auto`` means ``cudagraphs`` on CUDA where ``auto_ok`` (the caller's say:
    False over a quantized base, where compiling costs memory, docs/benchmarks.md, and with activation
    checkpointing) and no compile otherwise; plain compile instead of CUDA graphs unless ``auto_graphs``
    (False with gradient accumulation: not measured under CUDA graphs)."""
    choice = train.compile
    if choice == "auto":
        choice = (("cudagraphs" if auto_graphs else True) if device.type == "cuda" and auto_ok else False)
    if choice == "cudagraphs":
        return "reduce-overhead" if device.type == "cuda" else "default"
    return "default" if choice else None


def accelerate(model: nn.Module, train, device: torch.device, mode: str | None) -> list[str]:
    """Apply the recipe's model-level levers: ``train.kernels`` and the compile ``mode`` resolved by
    :func:`compile_mode` (None: no compile). Returns their names, e.g. ``["compile×24 as CUDA graphs"]``."""
    applied: list[str] = []
    # torch.compile fuses norms and activations itself and cannot trace liger's Triton kernels
    use_liger = train.kernels == "liger" or (train.kernels == "auto" and device.type == "cuda" and mode is None)
    if use_liger and liger_kernels_available():
        applied += apply_liger(model)
    elif train.kernels == "liger":
        from lorakit.errors import LorakitError

        raise LorakitError("train.kernels liger: liger-kernel is not installed (pip install liger-kernel; needs CUDA)")
    budget = getattr(train, "activation_memory_budget", 1.0)
    if mode is not None:
        # process-wide, read when the layers compile (at the first step): set on every call, so a later
        # trainer in the same process does not inherit an earlier recipe's budget
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = budget
        applied += compile_layers(model, None if mode == "default" else mode)
        applied += [f"activation memory budget {budget:g}"] if budget < 1 else []
    elif budget < 1:
        applied.append(f"activation memory budget {budget:g} ignored (layers not compiled)")
    return applied
