"""An adapter as a PEFT folder that ``peft.PeftModel.from_pretrained``, vLLM and transformers'
``load_adapter`` read: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ a README, and the
tokenizer when given). The tensors and config are the method's own
(:meth:`~lorakit.methods.base.Method.export_peft`, :mod:`lorakit.methods.peft_export`); this module
writes them atomically. Used by ``lorakit export`` and by every final checkpoint (``final/peft/``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lorakit.files import normal_modes

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def base_model_reference(model: nn.Module, recipe) -> str:
    """What ``base_model_name_or_path`` names: the folder the base was loaded from (for built-ins
    lorakit's cached copy, the exact weights trained on) as an absolute path, else the recipe's name."""
    loaded = getattr(model, "name_or_path", "") or ""
    if loaded and Path(loaded).is_dir():
        return str(Path(loaded).resolve())
    return recipe.model.name_or_path


def usage(config: dict, model: nn.Module, recipe, method) -> str:
    """The folder's README: what it holds and how to load it with peft."""
    seq_cls = recipe.model.task == "seq_cls"
    auto = "AutoPeftModelForSequenceClassification" if seq_cls else "AutoPeftModelForCausalLM"
    labels = getattr(model.config, "id2label", None) if seq_cls else None
    kwargs = f", num_labels={len(labels)}" if labels else ""
    quant = recipe.model.quantization
    note = (f"\nTrained over a {quant} (bitsandbytes) base: pass the same `quantization_config` to reproduce it "
            "exactly.\n" if quant else "")
    return (f"# {method.name} adapter exported by lorakit ({config['peft_type']})\n\n"
            f"Base: `{config['base_model_name_or_path']}`.\n{note}\n```python\n"
            f"from peft import {auto}\nmodel = {auto}.from_pretrained(\"path/to/this/folder\"{kwargs})\n```\n")


def write_peft_folder(output: Path, model: nn.Module, method, recipe, base_model: str | None = None,
                      tokenizer=None) -> bool:
    """Write ``method``'s adapter as a PEFT folder at ``output`` (atomically). Returns False, writing
    nothing, when the method has no faithful PEFT equivalent."""
    exported = method.export_peft(model)
    if exported is None:
        return False
    config, tensors = exported
    config["base_model_name_or_path"] = base_model or base_model_reference(model, recipe)
    config["task_type"] = TASK_TYPES.get(recipe.model.task)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous().cpu().clone() for k, v in tensors.items()},
              str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "README.md").write_text(usage(config, model, recipe, method))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    normal_modes(tmp)  # safetensors writes 0600
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    return True
