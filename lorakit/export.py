"""``lorakit export``: a trained adapter as a PEFT folder (:mod:`lorakit.storage.peft`), checked by
loading it with ``peft`` on the recipe's base and comparing logits with lorakit's model.

What each method writes: :mod:`lorakit.methods.peft_export` (and each method's ``export_peft``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from lorakit.data.batches import iterate_batches
from lorakit.device import model_device
from lorakit.errors import LorakitError
from lorakit.evaluate import batch_logits
from lorakit.precision import cpu_check_overrides, recipe_precision
from lorakit.session import load_base, load_run
from lorakit.storage import checkpoint as ckpt
from lorakit.storage.peft import write_peft_folder


def peft_logits(folder: Path, session, batches) -> list[torch.Tensor] | None:
    """Logits of ``peft.PeftModel.from_pretrained`` on the recipe's base (loaded as lorakit loads it,
    quantized if it was) with the exported folder; None when peft is not installed."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    recipe = session.recipe
    base, _ = load_base(recipe, session.data.label_names)  # as lorakit loaded it (a k-bit base prepared as trained)
    model = PeftModel.from_pretrained(base, str(folder))
    if recipe.model.quantization is None:
        model.to(session.device)
    return batch_logits(model, batches, session.device, recipe_precision(recipe, session.device))


def export_run(run: Path, output: Path, console: Console, rank: int | None = None, base_model: str | None = None,
               check: bool = True, trust_remote_code: bool = False) -> float | None:
    """Export a run's (or checkpoint's) adapter as a PEFT folder with its tokenizer.

    Returns the largest |logit difference| between lorakit's model and PEFT's model loaded from
    ``output`` on a few held-out batches (None when not checked). Raises LorakitError for an existing
    non-empty ``output``, a fixed-rank method given ``--rank``, or a method without a PEFT equivalent.
    """
    output = Path(output)
    ckpt.check_output_folder(output, "--output", empty=True)
    session, path = load_run(run, console, cpu_check_overrides(model_device()),  # fp32 on CPU
                             trust_remote_code=trust_remote_code)
    method = session.method
    if rank is not None:
        method.set_rank(rank)
    if not write_peft_folder(output, session.model, method, session.recipe, base_model, session.tokenizer):
        raise LorakitError(f"method {method.name} has no faithful PEFT equivalent, so no PEFT adapter can be "
                           f"written; `lorakit merge {run} --output DIR` saves a standalone model instead")
    console.print(f"exported {escape(str(path))} ({method.name}) as a PEFT adapter into {escape(str(output))}", soft_wrap=True)
    snippet = (output / "README.md").read_text().split(chr(10), 2)[2].strip().replace("path/to/this/folder", str(output))
    console.print(f"[dim]{escape(snippet)}[/dim]", soft_wrap=True, highlight=False)
    if not check:
        return None
    batches = list(iterate_batches(session.data.eval, session.data.collate, 4, seed=None))[:2]
    before = batch_logits(session.model, batches, session.device, recipe_precision(session.recipe, session.device))
    session.model = None
    after = peft_logits(output, session, batches)
    if after is None:
        console.print("peft is not installed: the export was not checked")
        return None
    return max((a - b).abs().max().item() for a, b in zip(before, after))
