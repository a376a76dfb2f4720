"""``lorakit export``: a trained adapter as a PEFT folder (:mod:`lorakit.storage.peft`), checked by
loading it back and comparing logits with lorakit's model on a few held-out examples: reloaded by
lorakit itself (:mod:`lorakit.methods.peft_import`; LoRA and DoRA folders, no peft needed) and loaded
by ``peft.PeftModel`` when peft is installed (``pip install 'lorakit[peft]'``). What was compared, and
what was not, is said plainly.

What each method writes: :mod:`lorakit.methods.peft_export` (and each method's ``export_peft``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console

from lorakit.config import recipe_from_dict, recipe_to_dict
from lorakit.data.batches import iterate_batches
from lorakit.device import model_device
from lorakit.errors import LorakitError
from lorakit.evaluate import batch_logits
from lorakit.methods import methods_for_peft
from lorakit.precision import cpu_check_overrides, recipe_precision
from lorakit.session import PeftFolder, load_base, load_run, load_session
from lorakit.storage import checkpoint as ckpt
from lorakit.storage.peft import write_peft_folder

PEFT_HINT = "pip install 'lorakit[peft]' to check"


@dataclass
class ExportReport:
    """What ``export`` wrote and compared. ``lorakit_diff`` / ``peft_diff``: the largest |logit
    difference| to lorakit's model of the folder reloaded by lorakit / loaded by PEFT, None when not
    compared (``lorakit_note`` / ``peft_note`` say why); ``examples``: held-out examples compared."""

    output: Path
    method: str
    base: str
    checked: bool = False
    examples: int = 0
    lorakit_diff: float | None = None
    lorakit_note: str = ""
    peft_diff: float | None = None
    peft_version: str = ""
    peft_note: str = ""

    def lines(self) -> list[str]:
        """Two lines: what was written, then what was compared (never "checked" when nothing was)."""
        written = (f"PEFT adapter ({self.method}) written to {self.output}; base_model_name_or_path {self.base}; "
                   f"{self.output / 'README.md'} shows how to load it")
        if not self.checked:
            return [written, "not checked (--no-check)"]
        parts = [f"reloaded by lorakit: {self.lorakit_diff:.3g}" if self.lorakit_diff is not None
                 else f"not reloaded by lorakit ({self.lorakit_note})",
                 f"loaded by PEFT {self.peft_version}: {self.peft_diff:.3g}" if self.peft_diff is not None
                 else f"not checked against PEFT ({self.peft_note})"]
        if self.lorakit_diff is None and self.peft_diff is None:
            return [written, "not checked: " + "; ".join(parts)]
        return [written, f"largest |logit difference| to lorakit's model on {self.examples} held-out examples: "
                + "; ".join(parts)]


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


def lorakit_logits(folder: Path, session, batches) -> list[torch.Tensor] | None:
    """Logits of the exported folder reloaded by lorakit (``model.adapter``, as ``generate`` and a run
    starting from it load it) on the recipe's base; None when no lorakit method reads this kind of
    folder (only LoRA and DoRA ones are read back)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    names = methods_for_peft(config) if config.get("peft_type") == "LORA" else []
    if not names:
        return None
    data = recipe_to_dict(session.recipe)
    data["method"] = {"name": names[0]}  # r, lora_alpha, use_rslora, target_modules: from the folder
    data["model"] = {**data["model"], "adapter": str(folder)}
    recipe = recipe_from_dict(data)
    reloaded = load_session(recipe, PeftFolder(Path(folder)), with_data=False, label_names=session.data.label_names,
                            trust_remote_code=session.recipe.model.trust_remote_code)
    return batch_logits(reloaded.model, batches, reloaded.device, recipe_precision(recipe, reloaded.device))


def _largest(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(before, after))


def export_run(run: Path, output: Path, console: Console, rank: int | None = None, base_model: str | None = None,
               check: bool = True, trust_remote_code: bool = False) -> ExportReport:
    """Export a run's (or checkpoint's) adapter as a PEFT folder with its tokenizer and check it
    (unless ``check`` is off): see :class:`ExportReport`.

    Raises LorakitError for an existing non-empty ``output``, a fixed-rank method given ``--rank``, or a
    method without a PEFT equivalent.
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
    base = json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"]
    report = ExportReport(output, method.name, base, checked=check)
    if not check:
        return report
    batches = list(iterate_batches(session.data.eval, session.data.collate, 4, seed=None))[:2]
    report.examples = sum(len(b["input_ids"]) for b in batches)
    before = batch_logits(session.model, batches, session.device, recipe_precision(session.recipe, session.device))
    session.model, method.layers = None, {}  # free lorakit's copy before loading the base again
    after = lorakit_logits(output, session, batches)
    report.lorakit_diff = None if after is None else _largest(before, after)
    report.lorakit_note = "lorakit reads back only LoRA and DoRA folders"
    after = peft_logits(output, session, batches)
    report.peft_diff = None if after is None else _largest(before, after)
    report.peft_version = metadata.version("peft") if after is not None else ""
    report.peft_note = f"peft is not installed; {PEFT_HINT}"
    return report
