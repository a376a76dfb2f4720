"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303, §3): LoRA with A frozen at its random init.

    h = W0 x + b + s · B (A dropout(x)),   s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Shapes and init as LoRA: ``lora_A.weight`` A ``(r, in)`` Kaiming-uniform (U(±1/√in)) and **frozen**
(a ``requires_grad=False`` parameter under PEFT's name; it is random, so checkpoints store it);
``lora_B.weight`` B ``(out, r)`` zeros, the only trained tensor: r·out parameters per layer.
Merge: W ← W0 + s·BA, as LoRA.

Memory (the method's point): with A frozen, autograd keeps for the branch only what B's gradient needs,
the r-wide Ax, never the full-width x that A's gradient would need (``tests/methods/test_lora_fa.py``
counts the saved bytes). Dropout would bring a full-width tensor back: PyTorch's dropout saves its
mask (a float tensor as large as x on CPU, a bool tensor on CUDA). So with ``lora_dropout > 0`` the
branch computes A·dropout(x) in one autograd function that saves only a random seed and regenerates
the mask in the backward pass (one extra Bernoulli draw per layer): nothing full-width is saved.
Inside ``torch.compile`` (the default on CUDA, ``train.compile``), where a seeded generator cannot be
traced and would split every compiled layer at each adapter, the branch is plain dropout + linear
instead; the compiler then saves the dropout mask as bool (1 byte per element) and the r-wide
A·dropout(x), still never x itself (``tests/methods/test_lora_fa.py`` inspects the compiled graph).

Optional gradient projection (``gradient_projection: true``, METHODS.md §6, as PEFT's LoRA-FA
optimizer does): g_B ← (1/s²) · g_B · (AAᵀ)⁻¹ (pseudo-inverse, fp32), the B-gradient whose low-rank
update best matches the full-weight gradient. It is applied in the backward pass, to each
micro-batch's gradient before it is accumulated: the map is linear, so the accumulated gradient is
the projection of the summed gradient. Unlike PEFT (which projects inside its optimizer step), the
gradient norm clipping then sees the projected gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lorakit.methods.config import LoraConfig
from lorakit.methods.registry import register
from lorakit.methods.lora import Lora, LoraLayer, adapter_input
from lorakit.methods.peft_export import export_lora_family
from lorakit.world import full_tensor


class LoraFaConfig(LoraConfig):
    """LoRA's fields plus ``gradient_projection`` (g_B ← g_B (AAᵀ)⁻¹ / s², default off)."""

    name: str = "lora_fa"
    gradient_projection: bool = Field(False, description="project B's gradient: g_B ← g_B (AAᵀ)⁻¹ / s² (as PEFT's LoRA-FA)")


def dropout_mask(shape, dtype, device, p: float, seed: int) -> torch.Tensor:
    """Bernoulli(1 − p) mask scaled by 1/(1 − p), reproducible from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p, generator=gen).div_(1 - p)


class DropoutFrozenProjection(torch.autograd.Function):
    """y = A·dropout(x) ``(..., r)`` for a frozen A ``(r, in)``; saves a seed, not the mask or x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, ()).item())
        ctx.save_for_backward(A)
        ctx.p, ctx.seed, ctx.meta = p, seed, (x.shape, x.dtype, x.device)
        return F.linear(x * dropout_mask(x.shape, x.dtype, x.device, p, seed), A)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (A,) = ctx.saved_tensors
        shape, dtype, device = ctx.meta
        grad_x = (grad @ A.to(grad.dtype)) * dropout_mask(shape, dtype, device, ctx.p, ctx.seed)
        return grad_x.to(dtype), None, None


class ProjectGradient(torch.autograd.Function):
    """Identity on B ``(out, r)`` whose backward maps g_B to g_B·P, P = pinv(AAᵀ)/s² ``(r, r)`` fp32."""

    @staticmethod
    def forward(ctx, B: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projection)
        return B.view_as(B)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (projection,) = ctx.saved_tensors
        return (grad.float() @ projection).to(grad.dtype), None


class LoraFaLayer(LoraLayer):
    """LoRA whose A is frozen; only B learns, and x is never saved for the backward pass."""

    def __init__(self, base_layer: nn.Module, cfg: LoraFaConfig):
        super().__init__(base_layer, cfg)
        self.lora_A.weight.requires_grad_(False)
        self.gradient_projection = cfg.gradient_projection
        self.register_buffer("projection", None, persistent=False)  # P (r, r) fp32, see refresh_projection
        self._projection_of: tuple = ()

    @torch.no_grad()
    def refresh_projection(self) -> None:
        """P = pinv(AAᵀ)/s² ``(r, r)`` fp32, recomputed only when A changed (a load). Runs eagerly: the
        trainer calls it before each step (:meth:`LoraFa.before_step`), so a compiled forward only reads
        the buffer (a pseudo-inverse inside a CUDA graph would need a host sync)."""
        A = full_tensor(self.lora_A.weight)  # FSDP: outside the forward A is a shard
        key = (A._version, A.data_ptr(), A.device)
        if self.projection is None or key != self._projection_of:
            with torch.autocast(A.device.type, enabled=False):  # pinv needs fp32 (no bf16 kernel)
                A = A.float()
                self.projection = torch.linalg.pinv(A @ A.T) / self.scaling**2
            self._projection_of = key

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A.weight, self.lora_B.weight
        x = adapter_input(x, A)
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        if self.training and p > 0 and torch.compiler.is_compiling():
            ax = F.linear(self.lora_dropout(x), A)  # compiled: saves a 1-byte mask (module docstring)
        elif self.training and p > 0:
            ax = DropoutFrozenProjection.apply(x, A, p)
        else:
            ax = F.linear(x, A)
        if self.gradient_projection and B.requires_grad and torch.is_grad_enabled():
            if self.projection is None or not torch.compiler.is_compiling():
                self.refresh_projection()
            B = ProjectGradient.apply(B, self.projection)
        return F.linear(ax, B) * self.scaling


@register
class LoraFa(Lora):
    name = "lora_fa"
    paper = "Zhang et al. 2023, arXiv 2308.03303"
    trains = "lora_B (lora_A frozen at its random init)"
    config_class = LoraFaConfig
    layer_class = LoraFaLayer

    def before_step(self, step: int) -> None:
        """Gradient projection: make each layer's P current, outside any compiled forward."""
        if self.cfg.gradient_projection:
            for layer in self.layers.values():
                layer.refresh_projection()

    def export_peft(self, model: nn.Module):
        """PEFT LoRA (its own ``lora_output`` only saves memory; the math is LoRA's)."""
        return export_lora_family(self, model, strict=False)
