"""Adapter-branch kernels with fewer passes over full-width activations.

- :func:`lora_into`: ``base_out + s·(x Aᵀ) Bᵀ`` as one ``addmm`` (the GEMM epilogue adds ``base_out``
  and applies ``s``), instead of a B matmul, a scaling pass and an add (two full-width passes fewer
  forward, one fewer backward). Under autocast the product runs in the autocast dtype with fp32
  accumulation and is rounded once (the unfused path rounds the product, the scaled product and the
  sum); in fp32 it equals the unfused path up to fp32 rounding.
- :class:`DoraScale`: DoRA's rescaling y = σ ⊙ (t − b) + b, σ = m/n ``(out,)``, t = W0x + b + s·BAx,
  in one pass forward (fp32 arithmetic, output in t's dtype) and one backward (Triton kernels on CUDA,
  :mod:`lorakit.methods.triton_ops`; torch ops elsewhere); it saves t in its own dtype (bf16 under
  autocast) instead of an fp32 copy. ∂L/∂σ = Σ_rows g ⊙ t − b ⊙ Σ_rows g, summed in fp32 (the torch
  path rounds the products to t's dtype first: within 1% of the exact value in bf16, tested).

Both are used only where :func:`can_fuse` holds (autocast dtype = the base output's dtype, or no
autocast and one dtype throughout); otherwise the layers keep their plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lorakit.methods.triton_ops as triton_ops


def can_fuse(x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the fused kernels compute in the dtype the plain path would use."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return base_out.dtype == torch.get_autocast_dtype(dev)
    return x.dtype == weight.dtype == base_out.dtype


def lora_into(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """``base_out + scaling · (x Aᵀ) Bᵀ``: x ``(..., in)``, A ``(r, in)``, B ``(out, r)``,
    base_out ``(..., out)``; returns ``(..., out)`` in base_out's dtype."""
    ax = F.linear(x, A)
    out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), ax.reshape(-1, ax.shape[-1]), B.t(),
                      alpha=scaling)
    return out.view(base_out.shape)


class DoraScale(torch.autograd.Function):
    """y = scale ⊙ (t − bias) + bias over the last dim. t ``(..., out)``; scale ``(out,)`` fp32;
    bias ``(out,)`` or None. Gradients for t, scale and (if it requires grad) bias."""

    @staticmethod
    def forward(ctx, t, scale, bias):
        flat = t.reshape(-1, t.shape[-1]).contiguous()
        if triton_ops.available(flat):
            c = None if bias is None else (1 - scale) * bias.float()
            ctx.save_for_backward(flat, scale, bias)
            return triton_ops.dora_forward(flat, scale.contiguous(), c).view(t.shape)
        y = torch.empty_like(flat)
        with torch.autocast(t.device.type, enabled=False):  # "promote" ops would copy t to fp32
            if bias is None:
                torch.mul(flat, scale, out=y)
            else:
                torch.addcmul((1 - scale) * bias.float(), flat, scale, out=y)
        ctx.save_for_backward(flat, scale, bias)
        return y.view(t.shape)

    @staticmethod
    def backward(ctx, grad):
        flat, scale, bias = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if triton_ops.available(g):
            grad_t, gt, col = triton_ops.dora_backward(g.contiguous(), flat, scale.contiguous())
            grad_scale = gt if bias is None else gt - bias.float() * col
            grad_bias = ((1 - scale) * col).to(bias.dtype) if ctx.needs_input_grad[2] else None
            return grad_t.view(grad.shape), grad_scale, grad_bias
        grad_t = torch.empty_like(g)
        torch.mul(g, scale, out=grad_t)
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # backward runs without autocast
            col = g.sum(0, dtype=torch.float32) if bias is not None else None
            if ctx.needs_input_grad[1]:
                grad_scale = (g * flat).sum(0, dtype=torch.float32)
                if bias is not None:
                    grad_scale = grad_scale - bias.float() * col
            if ctx.needs_input_grad[2]:
                grad_bias = ((1 - scale) * col).to(bias.dtype)
        return grad_t.view(grad.shape), grad_scale, grad_bias


def dora_scale(t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:class:`DoraScale` applied: ``scale ⊙ (t − bias) + bias`` in t's dtype."""
    return DoraScale.apply(t, scale, bias)
