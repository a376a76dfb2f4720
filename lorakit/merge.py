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

from lorakit.errors import LorakitError
from lorakit.evaluate import autocast, to_device
from lorakit.quant import dequantize_model, is_quantized_model
from lorakit.session import load_checkpoint_session
from lorakit.train import checkpoint as ckpt
from lorakit.train.loop import iterate_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ONTO = ("dequant", "original")


@torch.no_grad()
def _logits(model, batches, device) -> list[torch.Tensor]:
    model.eval()
    outs = []
    for batch in batches:
        batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
        with autocast(device):
            outs.append(model(**batch).logits.float().cpu())
    return outs


def _set_rank(method, rank: int | None) -> None:
    if rank is not None:
        if not hasattr(method, "set_rank"):
            raise LorakitError(f"--rank: method {method.name} has a fixed rank")
        method.set_rank(rank)


def _onto_original(session, path: Path, rank: int | None):
    """(model, method): the recipe's base loaded unquantized, carrying the checkpoint's adapter.

    Raises LorakitError when the base is itself stored quantized (no original weights exist)."""
    from lorakit.methods import build_method
    from lorakit.models import load_model

    recipe = session.recipe
    labels = getattr(session.data, "label_names", None) if recipe.model.task == "seq_cls" else None
    model = load_model(recipe.model.model_copy(update={"quantization": None}),
                       num_labels=len(labels) if labels else None, label_names=labels)
    if is_quantized_model(model) or getattr(model, "hf_quantizer", None) is not None:
        raise LorakitError(f"--onto original: {recipe.model.name_or_path} is stored quantized, so it has no "
                           "original weights to merge onto; use --onto dequant")
    method = build_method(recipe.method)
    method.attach(model, recipe.model.task)
    method.load_state_dict(ckpt.read_checkpoint_meta(path)[1])
    ckpt.load_adapter_weights(model, path / ckpt.ADAPTER_FILE)
    _set_rank(method, rank)
    return model.to(session.device), method


def merge_run(run: Path, output: Path, dtype: str, console: Console, rank: int | None = None,
              onto: str = "dequant") -> float:
    """Merge a run's adapter into its base, save model + tokenizer to ``output`` atomically.

    Over a quantized base the saved model is unquantized (see the module docstring for ``onto``).
    Returns the largest absolute logit difference between the adapter model and the merged model on a
    few held-out batches. Raises LorakitError for a bad dtype or ``onto``, an unmergeable method, an
    existing non-empty ``output``, or ``onto="original"`` over a base stored quantized.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise LorakitError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    if onto not in ONTO:
        raise LorakitError(f"--onto {onto!r}: expected {' or '.join(ONTO)}")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise LorakitError(f"--output {output}: folder exists and is not empty")
    session, path = load_checkpoint_session(run, console)
    method = session.method
    if not method.mergeable:
        raise LorakitError(f"method {method.name} cannot be merged into the base weights")
    _set_rank(method, rank)
    batches = list(iterate_batches(session.data.eval, session.data.collate, 4, seed=None))[:2]
    before = _logits(session.model, batches, session.device)
    model, target, quant = session.model, DTYPES.get(dtype), session.recipe.model.quantization
    base = "the base weights"
    if quant is not None:
        from lorakit.models import _dtype

        target = target or _dtype(session.recipe.model)  # auto: the dtype the base was loaded in
        base = f"dequant(Wq) of the {quant} base (reproduces the adapter model)"
        if onto == "original":
            session.model = model = None  # free the k-bit copy
            model, method = _onto_original(session, path, rank)
            base = f"the original weights of {session.recipe.model.name_or_path} (not the {quant} ones trained on)"
    model = method.merge(model, target)
    if quant is not None:
        dequantize_model(model, target)
    after = _logits(model, batches, session.device)
    diff = max((a - b).abs().max().item() for a, b in zip(before, after))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    session.tokenizer.save_pretrained(tmp)
    if output.exists():
        output.rmdir()
    os.replace(tmp, output)
    console.print(f"merged {path} ({method.name}) onto {base} into {output}", soft_wrap=True)
    return diff
