"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411, Algorithm 1): the base weight follows the adapter's delta.

The paper's rule, with t the 0-based index of the optimizer step just taken and P_t = B_t A_t the
product *before* that step (P_{t+1} after it): if t > K, W_{t+1} = W_t + λ·s·(P_{t+1} − P_t).
The sum telescopes: W_t = W0 for t ≤ K + 1, and W_t = W0 + λ·s·(P_t − P_{K+1}) after that. So lorakit
never touches W0. After the step with index K (``after_optimizer_step(K)``: K + 1 steps taken) each
layer copies (A, B) = (A_{K+1}, B_{K+1}) once into the persistent buffers ``snapshot_A`` ``(r, in)``
and ``snapshot_B`` ``(out, r)``; from then on

    h = W0 x + b + s · B (A x) + λ·s · (sg(B) sg(A) x − B_K A_K x),    sg = stop-gradient,

where (A_K, B_K) names the snapshot (METHODS.md §7's "(A_K, B_K)"; in the paper's indexing it is
(A_{K+1}, B_{K+1}), since W first changes after the step with index K + 1). The correction is 0 at
the first forward after the snapshot and gives no gradient to A or B (W gets no gradient in the
paper either), so A and B see exactly the paper's gradients. It is evaluated as
λs·((sg(B) − B_K)·sg(A)x + B_K·(sg(A) − A_K)x), the differences taken in fp32 before any
low-precision matmul. Only the *parameters* are detached: the gradient still flows to x through this
term, as it would through the updated W. The whole branch is one rank-3r LoRA product
s·[B, sg(B) − B_K, B_K]·([A; λ·sg(A); λ·(sg(A) − A_K)] x) (:meth:`DeltaLoraLayer.delta_factors`; A and
B only in the first block, so their gradients are those of s·BAx), added to the base output by LoRA's
one ``addmm`` (:func:`lorakit.methods.ops.lora_into`) where the dtypes allow it.

Init: A Kaiming-uniform (U(±1/√in)), B zeros, snapshots zeros (unused until taken); s = lora_alpha / r
(rsLoRA: / √r); λ = ``delta_lambda`` (2), K = ``delta_start_step`` (500). No dropout on the LoRA path
(the paper drops it from the low-rank branch so that ∂L/∂(BA) equals ∂L/∂W, which is what
justifies updating W by the change of BA): ``lora_dropout`` is 0, and a recipe's other value is
set aside with one warning line (so one recipe runs under every method). Trainable parameters per layer: r·(in + out).
Merge: W ← W0 + s·BA + λs·(BA − B_K A_K) (the last term only once the snapshot is taken), i.e. a rank-2r
LoRA B' = [(1+λ)s·B, −λs·B_K], A' = [A; A_K] with scaling 1 (:func:`as_lora`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lorakit.methods.config import LoraConfig
from lorakit.methods.ops import can_fuse, lora_into
from lorakit.methods.registry import register
from lorakit.methods.base import Method
from lorakit.methods.lora import LoraLayer, adapter_input
from lorakit.methods.peft_export import lora_export
from lorakit.world import full_tensor


class DeltaLoraConfig(LoraConfig):
    """LoRA's fields plus λ (``delta_lambda``) and K (``delta_start_step``); ``lora_dropout`` is 0 (another value is set aside)."""

    set_aside = {"lora_dropout": "Delta-LoRA uses no dropout on the LoRA path so that the gradient of BA is that "
                                 "of W, Zi et al. 2023"}

    name: str = "delta_lora"
    lora_dropout: float = Field(0.0, ge=0, le=0, description="always 0: Delta-LoRA uses no dropout on the LoRA path "
                                "(a recipe's other value is set aside with a warning)")
    delta_lambda: float = Field(2.0, gt=0, description="λ: W moves by λ·s·Δ(BA) after each step (§3)")
    delta_start_step: int = Field(500, ge=0, description="K: steps of plain LoRA before W starts to follow (§3)")


class DeltaLoraLayer(LoraLayer):
    """LoRA plus the telescoped W update λs·(sg(B)sg(A) − B_K A_K) once ``delta_active``."""

    def __init__(self, base_layer: nn.Module, cfg: DeltaLoraConfig):
        super().__init__(base_layer, cfg)
        self.delta_lambda = cfg.delta_lambda
        self.delta_active = False
        device = self.lora_A.weight.device
        self.register_buffer("snapshot_A", torch.zeros(self.r, self.in_features, device=device))
        self.register_buffer("snapshot_B", torch.zeros(self.out_features, self.r, device=device))

    @torch.no_grad()
    def take_snapshot(self) -> None:
        """Copy the current (A, B) into (A_K, B_K) and switch the W update on (FSDP: A and B gathered
        whole on every rank, so the W update is the same everywhere)."""
        self.snapshot_A.copy_(full_tensor(self.lora_A.weight))
        self.snapshot_B.copy_(full_tensor(self.lora_B.weight))
        self.delta_active = True

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self.delta_active:  # plain LoRA (LoRA's fused path where the dtypes allow it)
            return super().adapter_forward(x, base_out)
        left, right = self.delta_factors()
        if can_fuse(x, base_out, self.lora_A.weight):
            return lora_into(base_out, x, left, right, self.scaling)
        x = adapter_input(x, self.lora_A.weight)
        return base_out + (F.linear(F.linear(x, left), right) * self.scaling).to(base_out.dtype)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L ``(3r, in)``, R ``(out, 3r)``) with s·R L = s·BA + λs·((sg(B) − B_K)·sg(A) + B_K·(sg(A) − A_K)):
        L = [A; λ·sg(A); λ·(sg(A) − A_K)], R = [B, sg(B) − B_K, B_K], differences in fp32. A and B get
        gradients through the first block only (as through s·BAx)."""
        A, B = self.lora_A.weight, self.lora_B.weight
        a, b, lam = A.detach(), B.detach(), self.delta_lambda
        left = torch.cat([A, a * lam, (a - self.snapshot_A) * lam])
        right = torch.cat([B, b - self.snapshot_B, self.snapshot_B], dim=1)
        return left, right

    def delta_weight(self) -> torch.Tensor:
        b, a = self.lora_B.weight.float(), self.lora_A.weight.float()
        delta = self.scaling * (b @ a)
        if self.delta_active:
            delta = delta + self.delta_lambda * self.scaling * (b @ a - self.snapshot_B.float() @ self.snapshot_A.float())
        return delta


def as_lora(layer: DeltaLoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The layer's ΔW as a plain rank-2r LoRA: (A' ``(2r, in)``, B' ``(out, 2r)``, scaling 1.0).

    A' = [A; A_K], B' = [(1+λ)s·B, −λs·B_K] once the snapshot is taken, else [s·B, 0], so that
    B'A' = ``layer.delta_weight()`` (fp32) and every layer exports at the same rank 2r.
    """
    s, lam = layer.scaling, layer.delta_lambda
    a, b = layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float()
    a_k, b_k = layer.snapshot_A.float(), layer.snapshot_B.float()
    if layer.delta_active:
        b_new = torch.cat([(1 + lam) * s * b, -lam * s * b_k], dim=1)
    else:
        b_new = torch.cat([s * b, torch.zeros_like(b_k)], dim=1)
    return torch.cat([a, a_k], dim=0), b_new, 1.0


@register
class DeltaLora(Method):
    name = "delta_lora"
    paper = "Zi et al. 2023, arXiv 2309.02411"
    trains = "lora_A, lora_B (W follows λ·sΔ(BA) after step K, no optimizer state)"
    config_class = DeltaLoraConfig
    layer_class = DeltaLoraLayer

    def export_peft(self, model: nn.Module):
        """PEFT LoRA of rank 2r with scaling 1 (r = lora_alpha = 2r): B', A' from :func:`as_lora`."""
        pairs = {path: as_lora(layer)[:2] for path, layer in self.layers.items()}
        rank = 2 * self.cfg.r
        config, tensors = lora_export(self, model, pairs, rank, rank, False)
        config["lora_dropout"] = 0.0
        return config, tensors

    def __init__(self, cfg: DeltaLoraConfig):
        super().__init__(cfg)
        self.snapshot_step: int | None = None

    def schedule_warnings(self, total_steps: int) -> list[str]:
        """W starts to follow after the step with index K (0-based): a run of ``total_steps`` ≤ K + 1 steps
        never updates W, and trains plain LoRA."""
        k = self.cfg.delta_start_step
        if k + 1 < total_steps:
            return []
        return [f"method.delta_start_step {k} is past the end of this run ({total_steps} steps): the base weights "
                f"never follow the adapter, so this trains plain LoRA; set delta_start_step below {total_steps - 1} "
                "for Delta-LoRA's update"]

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After the step with 0-based index K (K + 1 steps taken), snapshot (A, B) in every layer.

        ``step`` is the index of the step just taken. A run resumed past K without a snapshot (K raised
        in between) takes it at once.
        """
        if self.snapshot_step is None and step >= self.cfg.delta_start_step:
            for layer in self.layers.values():
                layer.take_snapshot()
            self.snapshot_step = step

    as_lora = staticmethod(as_lora)

    def state_dict(self) -> dict:
        """``{"snapshot_taken": bool, "snapshot_step": int | None}``; the snapshots are layer buffers."""
        return {"snapshot_taken": self.snapshot_step is not None, "snapshot_step": self.snapshot_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        taken = bool(state.get("snapshot_taken"))
        self.snapshot_step = state.get("snapshot_step", self.cfg.delta_start_step) if taken else None
        for layer in self.layers.values():
            layer.delta_active = self.snapshot_step is not None
