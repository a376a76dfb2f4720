"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353, §4, §4.3).

The weight is split into a magnitude and a direction; LoRA adapts the direction:

    W' = (m / n) ⊙_row (W0 + s·BA),    n = ‖W0 + s·BA‖_row  (one norm per output row, **detached**, §4.3)

Forward (the paper writes "column norm" for its d×k layout; in ``nn.Linear`` layout it is per output row):
  - dropout inactive (eval, or ``lora_dropout`` 0):  h = (m/n) ⊙ (W0x + s·BAx) + b, where W0x is the
    base output minus its bias (no extra matmul);
  - dropout active in training:  h = W0x + b + (m/n − 1) ⊙ (W0x̃) + (m/n) ⊙ (s·BAx̃), x̃ = dropout(x),
    which costs one extra base matmul on x̃ (as METHODS.md §8 and PEFT do).

Shapes: x ``(..., in)``; ``lora_A.weight`` A ``(r, in)`` Kaiming-uniform; ``lora_B.weight`` B ``(out, r)``
zeros; ``magnitude`` m ``(out,)`` fp32, initialized to ‖W0‖_row, so the layer is a no-op at init. Scaling
s = lora_alpha / r (rsLoRA: lora_alpha / √r). Trainable per layer: r·(in + out) + out. W0, b frozen.

n without forming W0 + s·BA (METHODS.md §8 design note), all in fp32 and clamped at 0 before the root:

    n_i² = ‖w_i‖² + 2s·(W0Aᵀ)_i·B_i + s²·B_i (AAᵀ) B_iᵀ

‖w_i‖² is a non-persistent buffer computed from the base at attach (so a checkpoint, which holds no base
weights, always gets the norms of the base it is loaded onto) and recomputed whenever a ``load_state_dict``
writes this layer's base weight. W0Aᵀ ``(out, r)`` is the base layer applied to the r rows of A minus its
bias, so a 4-bit base is never dequantized; AAᵀ is ``(r, r)``. On a bf16/fp16 base W0Aᵀ is computed in
the base's dtype (A cast to it) and then accumulated in fp32.

Speed (dropout inactive, dtypes as :func:`lorakit.methods.ops.can_fuse` requires): t = W0x + b + s·BAx comes
from one ``addmm`` onto the base output and σ ⊙ (t − b) + b from :class:`lorakit.methods.ops.DoraScale`,
which saves t in its own dtype (no fp32 copies of full-width activations); equal to the plain
formula up to rounding (tests/methods/test_ops.py states the tolerance).

Merge: W' = (m/n) ⊙_row (W0 + s·BA), the product in fp32 and cast once; the bias is unchanged.
With ``loraplus_lr_ratio`` λ, m is 1-D and lands in the λ·lr group without weight decay (as in PEFT).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.methods.config import LoraConfig
from lorakit.methods.ops import can_fuse, dora_scale, lora_into
from lorakit.methods.registry import register
from lorakit.methods.base import Method, base_weight
from lorakit.methods.lora import LoraLayer, adapter_input
from lorakit.methods.peft_export import lora_export


def _note_base_reload(module: "DoraLayer", state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a new base weight makes the cached ‖w_i‖² stale."""
    if prefix + "base_layer.weight" in state_dict:
        module._base_reloaded = True


def _refresh_norm(module: "DoraLayer", incompatible_keys) -> None:
    """load_state_dict post-hook: recompute ‖w_i‖² from the new base weight (eagerly, not in forward)."""
    if module._base_reloaded:
        module.weight_norm_sq = module._base_norm_sq().to(module.weight_norm_sq.device)
        module._base_reloaded = False


class DoraLayer(LoraLayer):
    """A LoRA layer with a trainable per-row ``magnitude`` (out,) and a detached row-norm rescaling."""

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig):
        super().__init__(base_layer, cfg)
        self.register_buffer("weight_norm_sq", self._base_norm_sq(), persistent=False)
        self.magnitude = nn.Parameter(self.weight_norm_sq.sqrt().clone())
        self._base_reloaded = False
        self.register_load_state_dict_pre_hook(_note_base_reload)
        self.register_load_state_dict_post_hook(_refresh_norm)

    def _base_norm_sq(self) -> torch.Tensor:
        """‖w_i‖² of the frozen base weight, fp32 ``(out,)`` (computed in fp64 for accuracy)."""
        with torch.no_grad():
            return base_weight(self.base_layer).double().pow(2).sum(1).float()

    def _base_apply_no_bias(self, rows: torch.Tensor) -> torch.Tensor:
        """W0 · rowsᵀ as fp32 ``(out, k)`` for ``rows`` ``(k, in)``, through the base layer (bias removed)."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        out = self.base_layer(rows.to(dtype)).float()
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            out = out - bias.float()
        return out.t()

    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·BA‖_row as fp32 ``(out,)``, detached, without materializing W0 + s·BA."""
        device_type = self.lora_A.weight.device.type
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            a = self.lora_A.weight.float()  # (r, in)
            b = self.lora_B.weight.float()  # (out, r)
            s = self.scaling
            cross = (self._base_apply_no_bias(a) * b).sum(1)  # (W0Aᵀ)_i · B_i
            quad = ((b @ (a @ a.t())) * b).sum(1)  # B_i (AAᵀ) B_iᵀ
            n_sq = self.weight_norm_sq.float() + 2 * s * cross + s * s * quad
            return n_sq.clamp_min(0).sqrt()

    def _bias(self) -> torch.Tensor | float:
        bias = getattr(self.base_layer, "bias", None)
        return 0.0 if bias is None else bias.float()

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude.float() / self.weight_norm()  # (out,): gradient reaches m only
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        if not dropout_active and can_fuse(x, base_out, self.lora_A.weight):
            t = lora_into(base_out, x, self.lora_A.weight, self.lora_B.weight, self.scaling)  # W0x + b + s·BAx
            return dora_scale(t, scale, getattr(self.base_layer, "bias", None))
        bias = self._bias()
        if dropout_active:
            x_drop = self.lora_dropout(x)
            lora = self.lora_B(self.lora_A(adapter_input(x_drop, self.lora_A.weight))) * self.scaling
            base_drop = self.base_layer(x_drop).float() - bias  # W0 x̃
            return base_out + ((scale - 1) * base_drop + scale * lora.float()).to(base_out.dtype)
        lora = self.lora_output(x).float()  # dropout is the identity here
        return (scale * (base_out.float() - bias + lora) + bias).to(base_out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """(m/n) ⊙_row (W0 + s·BA) as fp32 ``(out, in)``."""
        with torch.no_grad():
            weight = base_weight(self.base_layer) + super().delta_weight()
            return (self.magnitude.detach().float() / self.weight_norm()).unsqueeze(1) * weight

    def delta_weight(self) -> torch.Tensor:
        """W' − W0 as fp32 ``(out, in)`` (DoRA's merge is not additive in s·BA alone)."""
        return self.merged_weight() - base_weight(self.base_layer)


@register
class Dora(Method):
    name = "dora"
    paper = "Liu et al. 2024, arXiv 2402.09353"
    trains = "lora_A, lora_B, magnitude"
    config_class = LoraConfig
    layer_class = DoraLayer
    mergeable = True

    @classmethod
    def imports_peft(cls, config: dict) -> bool:
        """A PEFT LoRA folder with ``use_dora`` (``lora_magnitude_vector`` → ``magnitude``)."""
        return config.get("peft_type") == "LORA" and bool(config.get("use_dora"))

    def export_peft(self, model: nn.Module):
        """PEFT LoRA with ``use_dora``: m → ``lora_magnitude_vector`` ``(out,)``."""
        cfg, layers = self.cfg, self.layers
        pairs = {p: (l.lora_A.weight, l.lora_B.weight) for p, l in layers.items()}
        mags = {p: l.magnitude for p, l in layers.items()}
        return lora_export(self, model, pairs, cfg.r, cfg.lora_alpha, cfg.use_rslora, magnitudes=mags)
