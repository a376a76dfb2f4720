"""``lorakit merge``: fold the adapter into the base weights and save a transformers folder.

Over a k-bit base (QLoRA, Dettmers et al. 2023) the saved model is unquantized. ``onto="dequant"``
(default) merges each adapter onto dequant(Wq) and dequantizes every other quantized linear: the
trained function exactly. ``onto="original"`` rebuilds the adapter on the original 16/32-bit weights
of ``model.name_or_path`` and merges there: deviates by the quantization error, which is reported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from lorakit.data.batches import iterate_batches
from lorakit.device import model_device
from lorakit.errors import ArgumentError, LorakitError
from lorakit.evaluate import batch_logits
from lorakit.files import normal_modes
from lorakit.models import model_dtype
from lorakit.precision import cpu_check_overrides, recipe_precision
from lorakit.quant import dequantize_model, is_quantized_model
from lorakit.session import Checkpoint, load_run, load_session, run_recipe
from lorakit.storage import checkpoint as ckpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ONTO = ("dequant", "original")


def merged_dtype(dtype: str, recipe, checkpoint: Path) -> tuple[torch.dtype, str]:
    """(dtype, why) of the saved weights: ``--dtype`` when not auto, else the dtype the base was trained
    in, :func:`~lorakit.models.model_dtype` of the run's resolved precision (the adapter file's record,
    :func:`~lorakit.storage.checkpoint.read_precision`; a recipe's explicit bf16 / fp32 for a checkpoint
    written before that record; else fp32). Raises LorakitError for an unknown ``dtype``."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ArgumentError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[dtype], "--dtype"
    trained = ckpt.read_precision(checkpoint)
    stated = recipe.train.precision if recipe.train.precision != "auto" else None
    precision = trained or stated or "fp32"
    target = model_dtype(recipe.model, precision)
    if recipe.model.dtype != "auto":
        return target, f"model.dtype {recipe.model.dtype}, as trained"
    if trained or stated:
        return target, f"trained in {precision}"
    return target, "the run's precision is not recorded (train.precision: auto)"


def _onto_original(session, path: Path, rank: int | None):
    """(model, method): the recipe's base loaded unquantized, carrying the checkpoint's adapter.

    Raises LorakitError when the base is itself stored quantized (no original weights exist)."""
    recipe = session.recipe.model_copy(update={"model": session.recipe.model.model_copy(update={"quantization": None})})
    labels = session.data.label_names if recipe.model.task == "seq_cls" else None
    original = load_session(recipe, Checkpoint(path), with_data=False, label_names=labels)
    model = original.model
    if is_quantized_model(model) or getattr(model, "hf_quantizer", None) is not None:
        raise LorakitError(f"--onto original: {recipe.model.name_or_path} is stored quantized, so it has no "
                           "original weights to merge onto; use --onto dequant")
    if rank is not None:
        original.method.set_rank(rank)
    return model, original.method


def untie_diverged_head(model: torch.nn.Module) -> bool:
    """Set ``tie_word_embeddings`` false when the output embedding no longer is (or equals) the input
    embedding, as after merging an adapter on a tied LM head; a loader would otherwise re-tie it and
    drop the trained head. Returns True when it untied."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    configs = {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)()) if c is not None}
    if inp is None or out is None or not any(getattr(c, "tie_word_embeddings", False) for c in configs.values()):
        return False
    a, b = inp.weight, out.weight
    if a is b or (a.shape == b.shape and torch.equal(a, b)):
        return False
    for config in configs.values():
        config.tie_word_embeddings = False
    return True


def save_merged(model: torch.nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> bool:
    """``save_pretrained`` a merged model (and tokenizer) so that a plain ``from_pretrained`` gives it back.

    ``dtype`` casts every floating tensor once (the merge itself was fp32); tied embeddings stay tied
    unless the LM head was adapted (:func:`untie_diverged_head`); ``vocab_size`` follows the embedding
    rows (a resized vocabulary). Returns True when the head was untied.
    """
    if dtype is not None:
        model.to(dtype)
    untied = untie_diverged_head(model)
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    if inp is not None and getattr(text, "vocab_size", None) not in (None, inp.weight.shape[0]):
        text.vocab_size = inp.weight.shape[0]
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return untied


def load_merged(folder: Path, task: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A merged folder loaded the way users load it: ``AutoModelFor…from_pretrained(folder)``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype="auto", trust_remote_code=trust_remote_code)


def _largest(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(before, after))


def merge_run(run: Path, output: Path, dtype: str, console: Console, rank: int | None = None,
              onto: str = "dequant", trust_remote_code: bool = False) -> tuple[float, str, float | None]:
    """Merge a run's adapter into its base, save model + tokenizer to ``output`` atomically.

    Over a quantized base the saved model is unquantized (see the module docstring for ``onto``); the
    weights are saved in ``dtype``, auto: the dtype the run trained its base in (:func:`merged_dtype`).
    Returns (the largest absolute logit difference between the adapter model and the merged model, as
    reloaded from ``output`` with ``AutoModelFor…from_pretrained``, on a few held-out batches; the saved
    dtype and why, e.g. ``"bfloat16 (trained in bf16)"``; when saving rounds the merged weights to a
    narrower dtype, the same difference before that rounding, else None). Raises LorakitError for a bad dtype or ``onto``, an unmergeable method, an
    existing non-empty ``output``, or ``onto="original"`` over a base stored quantized.
    """
    if dtype != "auto" and dtype not in DTYPES:  # before anything loads
        raise ArgumentError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    if onto not in ONTO:
        raise ArgumentError(f"--onto {onto!r}: expected {' or '.join(ONTO)}")
    output = Path(output)
    ckpt.check_output_folder(output, "--output", empty=True)
    session, path = load_run(run, console, cpu_check_overrides(model_device()),  # fp32 on CPU
                             trust_remote_code=trust_remote_code)
    method = session.method
    if not method.mergeable:
        raise LorakitError(f"method {method.name} cannot be merged into the base weights")
    if rank is not None:
        method.set_rank(rank)
    batches = list(iterate_batches(session.data.eval, session.data.collate, 4, seed=None))[:2]
    precision = recipe_precision(session.recipe, session.device)
    before = batch_logits(session.model, batches, session.device, precision)
    model, quant = session.model, session.recipe.model.quantization
    target, why = merged_dtype(dtype, run_recipe(path, trust_remote_code=trust_remote_code), path)  # not the check's fp32
    base = "the base weights"
    if quant is not None:
        base = f"dequant(Wq) of the {quant} base (reproduces the adapter model)"
        if onto == "original":
            session.model = model = None  # free the k-bit copy
            model, method = _onto_original(session, path, rank)
            base = f"the original weights of {session.recipe.model.name_or_path} (not the {quant} ones trained on)"
    model, exact = method.merge(model, target if quant is not None else None), None
    if quant is not None:
        dequantize_model(model, target)
    elif model.dtype != target:  # saving rounds the weights: measure the merge itself before that
        exact = _largest(before, batch_logits(model, batches, session.device, precision))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    untied = save_merged(model, session.tokenizer, tmp, target)
    normal_modes(tmp)  # save_pretrained's safetensors writes 0600
    session.model = model = None
    mcfg = session.recipe.model
    reloaded = load_merged(tmp, mcfg.task, mcfg.trust_remote_code).to(session.device)  # what users will load
    after = batch_logits(reloaded, batches, session.device, precision)
    diff = _largest(before, after)
    if output.exists():
        output.rmdir()
    os.replace(tmp, output)
    if untied:
        console.print("the adapted LM head no longer equals the input embeddings: saved untied "
                      "(tie_word_embeddings: false)")
    console.print(f"merged {escape(str(path))} ({method.name}) onto {escape(base)} into {escape(str(output))}", soft_wrap=True)
    return diff, f"{str(target).removeprefix('torch.')} ({why})", exact
