"""Assembling a run: data, tokenizer, model, adapter — from a recipe or from a saved checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lorakit import trust
from lorakit.config import Recipe, recipe_from_dict
from lorakit.data import load_raw, tokenize
from lorakit.methods import Method, build_method
from lorakit.models import load_model, load_tokenizer, model_device
from lorakit.quant import prepare_kbit_model
from lorakit.train import checkpoint as ckpt


@dataclass
class Session:
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    method: Method
    data: Any
    device: torch.device


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked elements."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.dtype == torch.uint8 else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def parameter_table(model: torch.nn.Module, method: Method) -> Table:
    trainable, total = count_parameters(model)
    table = Table(title=f"{method.name}: {len(method.layers)} adapted modules")
    for col in ("trainable", "total", "trainable %"):
        table.add_column(col, justify="right")
    table.add_row(f"{trainable:,}", f"{total:,}", f"{100 * trainable / total:.4f}")
    return table


def build_session(recipe: Recipe, console: Console, method_state: dict | None = None,
                  peft_adapter: bool = True) -> Session:
    """Load data, tokenizer and model, attach the recipe's method (restoring ``method_state``).

    With ``model.adapter`` (and ``peft_adapter``) the method's r/alpha/targets come from (or are checked
    against) that PEFT folder, updating ``recipe.method`` in place, and its weights are loaded after attach
    (:mod:`lorakit.peft_import`)."""
    task = recipe.model.task
    if recipe.model.adapter and peft_adapter:
        from lorakit.peft_import import apply_adapter_config

        apply_adapter_config(recipe)  # fails before any model loads
    raw = load_raw(recipe.data, task, recipe.train.seed)
    tokenizer = load_tokenizer(recipe.model)
    num_labels = len(raw.label_names) if task == "seq_cls" else None
    torch.manual_seed(recipe.train.seed)
    model = load_model(recipe.model, num_labels=num_labels, label_names=raw.label_names,
                       precision=recipe.train.precision)
    data = tokenize(raw, recipe.data, tokenizer, task)
    device = model_device()
    method = build_method(recipe.method)
    if recipe.model.quantization is not None:
        prepare_kbit_model(model)  # freeze, fp32 norms and head (QLoRA; any method over a k-bit base)
    method.attach(model, task)
    if recipe.model.adapter and peft_adapter:
        from lorakit.peft_import import load_peft_weights

        count = load_peft_weights(model, method, recipe.model.adapter)
        console.print(f"model.adapter: {count} tensors loaded from {recipe.model.adapter}", soft_wrap=True)
    if method_state:
        method.load_state_dict(method_state)
    if recipe.model.quantization is None:
        model.to(device)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return Session(recipe, model, tokenizer, method, data, device)


def load_checkpoint_session(run_or_checkpoint: str | Path, console: Console, overrides: dict | None = None,
                            trust_remote_code: bool = False) -> tuple[Session, Path]:
    """Rebuild the model of a saved checkpoint and load its adapter weights.

    ``overrides`` replaces recipe sections (e.g. ``{"data": {...}}`` for ``eval --data``). Remote code
    runs only with ``trust_remote_code`` (the user's flag), never on the stored recipe's word
    (:mod:`lorakit.trust`). Raises LorakitError when the folder holds no checkpoint, or a stored file
    is not valid or points outside the run folder.
    """
    path = ckpt.resolve_checkpoint(run_or_checkpoint)
    recipe_data, method_state = ckpt.read_checkpoint_meta(path)
    recipe_data = trust.stored_recipe(path, recipe_data, trust_remote_code, console)
    for section, values in (overrides or {}).items():
        recipe_data.setdefault(section, {}).update(values)
    recipe = recipe_from_dict(recipe_data, origin=str(path / "recipe.yaml"))
    session = build_session(recipe, console, method_state, peft_adapter=False)  # weights: the checkpoint's
    ckpt.load_adapter_weights(session.model, path / ckpt.ADAPTER_FILE)
    return session, path
