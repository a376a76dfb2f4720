"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2023, arXiv 2310.11454, §3).

One pair of frozen random matrices is shared by every adapted layer; each layer trains two vectors:

    h = W0x + b0 + Λ_b B[:out] Λ_d A[:, :in] x̃ = W0x + b0 + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x̃)))

Shapes: x ``(..., in)``; shared ``vera_A`` A ``(r, in_max)`` and ``vera_B`` B ``(out_max, r)``, sized to the
largest in/out over the adapted layers and sliced per layer; ``vera_lambda_d`` λ_d ``(r,)`` initialized to
``d_initial`` (0.1); ``vera_lambda_b`` λ_b ``(out,)`` zeros, so the layer is a no-op at init. x̃ =
dropout(x) with ``lora_dropout``. No α scaling: a recipe's ``lora_alpha``, ``use_rslora`` or LoRA+ fields are set aside with a warning. Default
r = 256. Trainable per layer: r + out.

A and B are Kaiming-uniform with gain √2, i.e. U(±√(6/fan_in)) (fan_in = in_max for A, r for B), drawn
A then B from a CPU ``torch.Generator`` seeded with ``projection_prng_key`` (default 0) — the same draw
as PEFT, so a checkpoint need not store them: the method regenerates them on attach. They are buffers
(never parameters) of one :class:`VeraProjection` module that every layer holds as its child
``vera_projection``; sharing the module (not just the tensors) keeps them shared through
``model.to(...)``, and the checkpoint writer, which dedupes tensors by storage, stores them once (under
the first layer's name) when ``save_projection`` is true (PEFT's default) and not at all otherwise.

Merge: ΔW = diag(λ_b) · B[:out] · diag(λ_d) · A[:, :in], in fp32 and cast once.

LoRA+ (``loraplus_lr_ratio``) is refused: its analysis is about the trained A/B pair, which VeRA
freezes (on VeRA's two 1-D vectors it would only multiply the learning rate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pydantic import Field
from torch import nn

from lorakit.errors import LorakitError
from lorakit.methods.base import AdapterLayer, Method, layer_shape
from lorakit.methods.config import MethodConfig
from lorakit.methods.inject import find_targets
from lorakit.methods.lora import adapter_input
from lorakit.methods.peft_export import PREFIX, base_config, head_tensors
from lorakit.methods.registry import register


class VeraConfig(MethodConfig):
    set_aside = {
        "lora_alpha": "VeRA has no alpha scaling: its trainable vectors scale the update, Kopiczko et al. 2023 §3",
        "use_rslora": "VeRA has no alpha scaling, Kopiczko et al. 2023 §3",
        "loraplus_lr_ratio": "LoRA+ acts on a trained A/B pair; VeRA's A and B are frozen",
        "loraplus_lr_embedding": "LoRA+ acts on a trained A/B pair; VeRA's A and B are frozen",
    }

    r: int = Field(256, gt=0, description="rank of the shared random projections A, B")
    projection_prng_key: int = Field(0, description="seed of the frozen shared projections")
    save_projection: bool = Field(True, description="store the projections with the adapter (else rebuilt from the seed)")
    d_initial: float = Field(0.1, description="initial value of the vector vera_lambda_d (§3.1)")


def kaiming_uniform_gain2(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(±√(6/fan_in)) for a ``(fan_out, fan_in)`` tensor (Kaiming-uniform, gain √2), drawn on the CPU."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen shared pair: ``vera_A`` ``(r, in_max)`` and ``vera_B`` ``(out_max, r)``, fp32 buffers."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, persistent: bool, device=None):
        super().__init__()
        self.seed = seed
        self.register_buffer("vera_A", torch.empty(r, in_max, device=device), persistent=persistent)
        self.register_buffer("vera_B", torch.empty(out_max, r, device=device), persistent=persistent)
        self.regenerate(seed)

    @torch.no_grad()
    def regenerate(self, seed: int) -> None:
        """Redraw A then B from a CPU generator seeded with ``seed`` (as PEFT does)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.vera_A.copy_(kaiming_uniform_gain2(tuple(self.vera_A.shape), gen))
        self.vera_B.copy_(kaiming_uniform_gain2(tuple(self.vera_B.shape), gen))
        self.seed = seed


class VeraLayer(AdapterLayer):
    """``base_layer`` plus λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] dropout(x)))) with the shared A, B.

    Raises:
        LorakitError: the shared projection is smaller than this layer or than r.
    """

    def __init__(self, base_layer: nn.Module, cfg: VeraConfig, projection: VeraProjection):
        super().__init__(base_layer)
        self.r = cfg.r
        r_a, in_max = projection.vera_A.shape
        out_max = projection.vera_B.shape[0]
        if in_max < self.in_features or out_max < self.out_features or r_a != self.r:
            raise LorakitError(f"VeRA projection {r_a}×{in_max}/{out_max}×{r_a} does not fit a layer "
                               f"{self.out_features}×{self.in_features} at r={self.r}")
        self.vera_projection = projection
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(cfg.d_initial), device=device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:, :in] ``(r, in)``, B[:out] ``(out, r)``) of the shared projection."""
        proj = self.vera_projection
        return proj.vera_A[:, : self.in_features], proj.vera_B[: self.out_features]

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.sliced()
        x = adapter_input(self.lora_dropout(x), self.vera_lambda_d)
        delta = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)
        return base_out + delta.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.sliced()
        d, lam_b = self.vera_lambda_d.detach().float(), self.vera_lambda_b.detach().float()
        return (lam_b.unsqueeze(1) * b.float()) @ (d.unsqueeze(1) * a.float())


@register
class Vera(Method):
    name = "vera"
    paper = "Kopiczko et al. 2023, arXiv 2310.11454"
    trains = "vera_lambda_d, vera_lambda_b"
    config_class = VeraConfig
    layer_class = VeraLayer
    mergeable = True

    def export_peft(self, model: nn.Module):
        """PEFT VeRA: ``vera_lambda_b`` ``(out,)`` / ``vera_lambda_d`` ``(r,)`` per layer, the shared
        projection once as ``base_model.vera_A`` ``(r, in_max)`` / ``base_model.vera_B`` ``(out_max, r)``."""
        cfg, proj = self.cfg, self.projection
        config = base_config(self, model, "VERA")
        config.update(r=cfg.r, projection_prng_key=proj.seed, save_projection=True,
                      vera_dropout=cfg.lora_dropout, d_initial=cfg.d_initial, init_weights=True)
        tensors = {"base_model.vera_A": proj.vera_A.detach().float(),
                   "base_model.vera_B": proj.vera_B.detach().float()}
        for path, layer in self.layers.items():
            tensors[f"{PREFIX}{path}.vera_lambda_b"] = layer.vera_lambda_b.detach().float()
            tensors[f"{PREFIX}{path}.vera_lambda_d"] = layer.vera_lambda_d.detach().float()
        return config, {**tensors, **head_tensors(model)}

    projection: VeraProjection | None = None

    def attach(self, model: nn.Module, task: str = "causal_lm") -> None:
        """Draw the shared projection sized to the largest target, then wrap the targets.

        Raises LorakitError if nothing matches ``target_modules``.
        """
        bases = [model.get_submodule(n) for n in find_targets(model, self.cfg.target_modules)]
        shapes = [layer_shape(m) for m in bases]
        in_max, out_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
        self.projection = VeraProjection(self.cfg.r, in_max, out_max, self.cfg.projection_prng_key,
                                         self.cfg.save_projection, device=bases[0].weight.device)
        super().attach(model, task)

    def make_layer(self, name: str, base: nn.Module) -> VeraLayer:
        return VeraLayer(base, self.cfg, self.projection)

    def state_dict(self) -> dict:
        proj = self.projection
        return {"projection_prng_key": proj.seed, "vera_A_shape": list(proj.vera_A.shape),
                "vera_B_shape": list(proj.vera_B.shape)}

    def load_state_dict(self, state: dict) -> None:
        """Regenerate the projection from the recorded seed. Raises LorakitError on a shape mismatch."""
        proj = self.projection
        for key in ("vera_A", "vera_B"):
            want = state.get(f"{key}_shape")
            if want is not None and list(getattr(proj, key).shape) != list(want):
                raise LorakitError(f"VeRA checkpoint has {key} of shape {tuple(want)}, this model needs "
                                   f"{tuple(getattr(proj, key).shape)} (other base or target_modules?)")
        seed = state.get("projection_prng_key", proj.seed)
        if seed != proj.seed:
            proj.regenerate(seed)
