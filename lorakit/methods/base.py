"""The interface every adapter method implements: a layer (init, forward, delta, merge) and hooks.

A method is one module in ``lorakit/methods/``: a config class (its recipe fields), a layer class that
wraps a frozen base layer (:mod:`lorakit.methods.layer`), and a :class:`Method` subclass whose hooks
the trainer calls without knowing the method by name. Every per-method fact lives on the class: its
parameter groups, whether its rank can change after training, whether and how it reads and writes PEFT
folders, whether it merges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from lorakit.errors import ArgumentError, LorakitError
from lorakit.methods.config import MethodConfig
from lorakit.methods.inject import inject, replace_module
from lorakit.methods.layer import AdapterLayer, base_weight, is_conv1d, kaiming_uniform_, layer_shape
from lorakit.methods.param_groups import build_param_groups
from lorakit.methods.peft_export import export_lora_family
from lorakit.methods.peft_import import load_peft_weights
from lorakit.world import World

__all__ = ["AdapterLayer", "Method", "base_weight", "is_conv1d", "kaiming_uniform_", "layer_shape"]


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
      - ``export_peft(model)`` / ``imports_peft(config)`` + ``load_peft(model, path)``: PEFT folders.
      - ``set_rank(b)``: evaluate, merge and export at another rank (methods with a variable rank).

    ``world`` (:class:`lorakit.world.World`, set by the trainer): the processes of a distributed run,
    for hooks that must agree across ranks (DyLoRA broadcasts its rank draw, LoRA-drop reduces its
    selection pass). ``shardable`` False: the method cannot run under FSDP (``unsharded_reason`` says
    why) and runs under DDP instead.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    trains: ClassVar[str] = "lora_A, lora_B"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    layer_class: ClassVar[type[AdapterLayer]]
    mergeable: ClassVar[bool] = True
    default_quantization: ClassVar[str | None] = None  # model.quantization when the recipe leaves it unset
    shardable: ClassVar[bool] = True
    unsharded_reason: ClassVar[str] = ""
    world: World = World()  # set per instance by the trainer
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
        self.layers = inject(model, self, task)

    @classmethod
    def hooks_used(cls) -> list[str]:
        return [h for h in cls.HOOKS if getattr(cls, h) is not getattr(Method, h)]

    # ---- hooks ----------------------------------------------------------------------------------
    def prepare(self, ctx: Any) -> None:
        pass

    def param_groups(self, model: nn.Module, train: Any) -> list[dict]:
        """AdamW groups over the trainable parameters (``train``: the recipe's TrainConfig). With a LoRA+
        ratio λ (Hayou et al. 2024, §4; :meth:`MethodConfig.loraplus`): the layers'
        :meth:`~AdapterLayer.ratio_parameters` (``lora_B``) and 1-D trainables at λ·lr, 2-D others at lr,
        adapters on embeddings at ``loraplus_lr_embedding`` (:mod:`lorakit.methods.param_groups`)."""
        ratio_params = [p for layer in self.layers.values() for p in layer.ratio_parameters()]
        return build_param_groups(model, train, self.cfg.loraplus(), ratio_params)

    def schedule_warnings(self, total_steps: int) -> list[str]:
        """Lines to show at the start of training when this run's length defeats the method (e.g. a
        method that would never leave its warm-up phase). Default: none."""
        return []

    def before_step(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def evaluate(self, run_eval: Callable[[], dict], **options: Any) -> dict:
        """Held-out metrics from ``run_eval()``. Raises LorakitError for rank options (a fixed rank)."""
        if options:
            raise ArgumentError(f"--rank/--ranks: method {self.name} has a fixed rank")
        return run_eval()

    def set_rank(self, rank: int) -> None:
        """Use rank ``rank`` for evaluation, merging and export. Raises LorakitError: a fixed rank."""
        raise ArgumentError(f"--rank: method {self.name} has a fixed rank")

    def merge(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        for name, layer in self.layers.items():
            replace_module(model, name, layer.merged_layer(dtype))
        self.layers = {}
        return model

    # ---- PEFT folders ---------------------------------------------------------------------------
    def export_peft(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """This adapter as PEFT files: (``adapter_config.json`` mapping, ``adapter_model.safetensors``
        tensors by PEFT key), or None when PEFT has no faithful equivalent (merge instead). Default:
        :func:`lorakit.methods.peft_export.export_lora_family` (layers with LoRA's math)."""
        return export_lora_family(self, model)

    @classmethod
    def imports_peft(cls, config: dict) -> bool:
        """Whether a PEFT folder with this ``adapter_config.json`` can start this method (the reverse of
        :meth:`export_peft`). Default: no."""
        return False

    def load_peft(self, model: nn.Module, path: str | Path) -> int:
        """Copy a PEFT folder's tensors into ``model`` (this method attached); returns the tensor count.
        Default: LoRA's keys (:func:`lorakit.methods.peft_import.load_peft_weights`)."""
        return load_peft_weights(model, self, path)

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
