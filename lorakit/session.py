"""A session: the recipe's data, tokenizer, model and method, with weights from one source.

:func:`load_session` is the one way every command builds a model with its adapter: ``train`` (fresh,
from a PEFT folder, or resumed from a checkpoint), ``eval``, ``merge``, ``export``, ``generate`` and
``chat``. The weight source is one of

- ``None``: the method's initial adapter (training starts here);
- :class:`Checkpoint`: a lorakit checkpoint folder (a training checkpoint or a run's ``final``),
  whose method state and ``adapter.safetensors`` are loaded (:mod:`lorakit.storage.checkpoint`);
- :class:`PeftFolder`: a PEFT LoRA/DoRA folder; the method must accept it
  (:meth:`~lorakit.methods.base.Method.imports_peft`), which also fills the recipe's r, lora_alpha,
  use_rslora and target_modules (:mod:`lorakit.methods.peft_import`).

:func:`load_run` reads a run folder or checkpoint's stored recipe and loads it with its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorakit import trust
from lorakit.config import Recipe, recipe_from_dict
from lorakit.data import load_raw, tokenize
from lorakit.device import model_device
from lorakit.errors import LorakitError
from lorakit.methods import Method, build_method, methods_for_peft
from lorakit.methods.peft_import import fill_from_adapter, read_adapter_config
from lorakit.models import load_model, load_tokenizer, quiet_loading
from lorakit.quant import prepare_kbit_model
from lorakit.storage import checkpoint as ckpt


@dataclass(frozen=True)
class Checkpoint:
    """A lorakit checkpoint folder: ``adapter.safetensors``, ``method.json``, ``recipe.yaml``."""

    path: Path


@dataclass(frozen=True)
class PeftFolder:
    """A PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""

    path: Path


WeightSource = Checkpoint | PeftFolder | None


@dataclass
class Session:
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    method: Method
    data: Any  # lorakit.data.DataBundle, or None when loaded without data
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


def apply_adapter_config(recipe: Recipe, path: str | Path) -> dict:
    """Check that the PEFT folder at ``path`` can start ``recipe.method`` and fill the method's r,
    lora_alpha, use_rslora and target_modules from it (in place). Returns the adapter config.

    Raises LorakitError naming model.adapter: not a PEFT folder, a method that cannot start from this
    kind of adapter, or a recipe field set to another value than the adapter's."""
    config = read_adapter_config(path)
    allowed = methods_for_peft(config)
    if recipe.method.name not in allowed:
        kind = "a DoRA adapter (use_dora: true)" if config.get("use_dora") else "a LoRA adapter"
        raise LorakitError(f"model.adapter {path} is {kind}; method.name must be {' or '.join(allowed)}, "
                           f"not {recipe.method.name}")
    fill_from_adapter(recipe.method, config, path)
    return config


def recipe_weights(recipe: Recipe) -> PeftFolder | None:
    """Where a fresh run's adapter starts: the recipe's ``model.adapter`` PEFT folder, or None."""
    return PeftFolder(Path(recipe.model.adapter)) if recipe.model.adapter else None


def _load_weights(model: torch.nn.Module, method: Method, weights: WeightSource, console: Console | None) -> None:
    if isinstance(weights, Checkpoint):
        method.load_state_dict(ckpt.read_checkpoint_meta(weights.path)[1])
        ckpt.load_adapter_weights(model, weights.path / ckpt.ADAPTER_FILE)
    elif isinstance(weights, PeftFolder):
        count = method.load_peft(model, weights.path)
        if console is not None:
            console.print(f"model.adapter: {count} tensors loaded from {escape(str(weights.path))}", soft_wrap=True)


def load_base(recipe: Recipe, label_names: list[str] | None = None, trust_remote_code: bool | None = None):
    """(model, tokenizer) of the recipe's base, without an adapter, on the CPU (a k-bit base where
    bitsandbytes put it, prepared as QLoRA trains it: frozen, fp32 head). ``label_names``:
    a classification model's labels; ``trust_remote_code``: as in :func:`load_session`."""
    mcfg = recipe.model if trust_remote_code is None else recipe.model.model_copy(
        update={"trust_remote_code": trust_remote_code})
    with quiet_loading():  # transformers' warnings only once both loaded
        tokenizer = load_tokenizer(mcfg)
        labels = label_names if mcfg.task == "seq_cls" else None
        model = load_model(mcfg, num_labels=len(labels) if labels else None, label_names=label_names,
                           precision=recipe.train.precision)
    if mcfg.quantization is not None:
        prepare_kbit_model(model)  # freeze, fp32 head (QLoRA; any method over a k-bit base)
    return model, tokenizer


def load_session(recipe: Recipe, weights: WeightSource = None, console: Console | None = None, *,
                 with_data: bool = True, eval_whole_data: bool = False, label_names: list[str] | None = None,
                 trust_remote_code: bool | None = None, describe_data: bool = False) -> Session:
    """Load data (unless ``with_data`` is off), tokenizer and model, attach the recipe's method and load
    ``weights`` into it; the model ends on its device (a k-bit base stays where bitsandbytes put it).

    ``eval_whole_data``: every row of the data is held out (``lorakit eval --data FILE``), none trains.
    ``label_names``: a classification model's labels (in head order) when no data is loaded, or those the
    data's labels must be among (a trained classifier evaluated on other data). ``trust_remote_code``: the
    caller's decision on running a model folder's own code; None takes the recipe's
    ``model.trust_remote_code``. A :class:`PeftFolder` updates ``recipe.method`` in place before any
    model loads. ``describe_data`` (training): a single source's first note says what was read
    (:func:`lorakit.data.mix.source_line`). Raises LorakitError (or RecipeError) with one line for every
    bad input."""
    task = recipe.model.task
    if isinstance(weights, PeftFolder):
        apply_adapter_config(recipe, weights.path)  # fails before any model loads
    raw = load_raw(recipe.data, task, recipe.train.seed, whole_for_eval=eval_whole_data,
                   label_names=label_names, describe=describe_data) if with_data else None
    labels = raw.label_names if raw is not None else label_names
    torch.manual_seed(recipe.train.seed)
    model, tokenizer = load_base(recipe, labels, trust_remote_code)
    data = tokenize(raw, recipe.data, tokenizer, task) if raw is not None else None
    method = build_method(recipe.method)
    method.attach(model, task)
    _load_weights(model, method, weights, console)
    # what was read (rows skipped, answers truncated away), once nothing can fail with a line of its own
    for note in [*raw.notes, *data.notes] if raw is not None and console is not None else []:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    device = model_device()
    if recipe.model.quantization is None:
        model.to(device)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return Session(recipe, model, tokenizer, method, data, device)


def run_recipe(checkpoint: Path, overrides: dict | None = None, trust_remote_code: bool = False,
               console: Console | None = None) -> Recipe:
    """The recipe stored in a checkpoint folder, made safe to load (:func:`lorakit.trust.stored_recipe`:
    remote code only with the user's ``trust_remote_code``, the base the adapter was trained on), with
    ``overrides`` replacing recipe sections' fields (e.g. ``{"data": {"source": ...}}`` for ``eval
    --data``). Raises LorakitError / RecipeError naming the file."""
    recipe_data, _ = ckpt.read_checkpoint_meta(checkpoint)
    recipe_data = trust.stored_recipe(checkpoint, recipe_data, trust_remote_code, console)
    for section, values in (overrides or {}).items():
        recipe_data.setdefault(section, {}).update(values)
    return recipe_from_dict(recipe_data, origin=str(checkpoint / "recipe.yaml"))


def load_run(run_or_checkpoint: str | Path, console: Console | None = None, overrides: dict | None = None,
             trust_remote_code: bool = False, **options: Any) -> tuple[Session, Path]:
    """(session, checkpoint folder) of a run folder (its ``final``, else its latest checkpoint) or a
    checkpoint folder: the stored recipe (:func:`run_recipe`, with ``overrides`` and the user's
    ``trust_remote_code``) and its weights, through :func:`load_session` (``options`` as there).
    Raises LorakitError when the folder holds no checkpoint, or a stored file is not valid or points
    outside the run folder."""
    path = ckpt.resolve_checkpoint(run_or_checkpoint)
    recipe = run_recipe(path, overrides, trust_remote_code, console)
    options.setdefault("label_names", ckpt.read_label_names(path))  # a classifier's labels, in its head's order
    return load_session(recipe, Checkpoint(path), console, **options), path


def peft_folder_recipe(path: str | Path) -> Recipe:
    """A recipe for a PEFT folder alone: its ``base_model_name_or_path`` with the first registered method
    that accepts it. Raises LorakitError: no base named, or no method accepts the adapter."""
    config = read_adapter_config(path)
    base = config.get("base_model_name_or_path")
    if not base:
        raise LorakitError(f"{path}: adapter_config.json names no base_model_name_or_path")
    names = methods_for_peft(config)
    if not names:
        raise LorakitError(f"{path}: no lorakit method reads this adapter (peft_type {config.get('peft_type')})")
    return recipe_from_dict({"model": {"name_or_path": base, "adapter": str(path)}, "method": {"name": names[0]}})
