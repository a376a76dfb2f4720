"""``lorakit export``: a trained adapter as a PEFT folder that ``peft.PeftModel.from_pretrained``, vLLM
and transformers' ``load_adapter`` read: ``adapter_config.json`` + ``adapter_model.safetensors``.

Mapping (METHODS.md "On-disk formats"); every exported tensor is fp32, keys ``base_model.model.<path>.…``:
  - lora, lora_plus, lora_fa, qlora, lora_drop → LoRA: ``lora_A.weight`` A ``(r, in)``, ``lora_B.weight``
    B ``(out, r)``, s = lora_alpha / r (rsLoRA: / √r). A LoRA-drop pair shared by several modules is
    written once per module (PEFT has no sharing). QLoRA's base is quantized: load the base with the
    same ``BitsAndBytesConfig`` to reproduce the trained function exactly.
  - dora → LoRA with ``use_dora``; m → ``<path>.lora_magnitude_vector`` ``(out,)``.
  - vera → VeRA: ``vera_lambda_b`` ``(out,)`` and ``vera_lambda_d`` ``(r,)`` per layer, the shared
    projection as ``base_model.vera_A`` ``(r, in_max)`` / ``base_model.vera_B`` ``(out_max, r)``.
  - dylora at its current rank b (``--rank``) → LoRA of rank b: A[:b], B[:, :b], s_b = lora_alpha / b.
  - delta_lora → LoRA of rank 2r with scaling 1 (``lora_alpha`` = 2r):
    B' = [(1+λ)s·B, −λs·B_K], A' = [A; A_K] (:func:`lorakit.methods.delta_lora.as_lora`).
Trainable tensors outside the adapter layers (a classification head) go whole into ``modules_to_save``,
stored as ``base_model.model.<module>.<param>`` (PEFT strips ``modules_to_save.default`` on save).
A method with no faithful PEFT equivalent exports nothing (``Method.export_peft`` returns None): merge it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.methods.base import AdapterLayer, Method
from lorakit.methods.lora import LoraLayer
from lorakit.models import model_device
from lorakit.precision import cpu_check_overrides, recipe_precision

PREFIX = "base_model.model."
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


# ---- shared pieces -------------------------------------------------------------------------------
def peft_target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """``target_modules`` that make PEFT adapt exactly ``paths``: the last names (``q_proj``) when those
    match nothing else under PEFT's suffix rule, else a regex of the exact paths (PEFT: ``re.fullmatch``)."""
    wanted = set(paths)
    inside = tuple(p + "." for p in wanted)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in wanted})
    matched = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)}
    if matched == wanted:
        return suffixes
    return "|".join(re.escape(p) for p in sorted(wanted))


def saved_modules(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Modules owning a trainable tensor outside the adapter layers (a classification head), by path,
    with their whole state (PEFT's ``modules_to_save`` replaces the module)."""
    adapters = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    owners = sorted({name.rpartition(".")[0] for name, p in model.named_parameters()
                     if p.requires_grad and not name.startswith(adapters)})
    return {o: model.get_submodule(o).state_dict() for o in owners}


def base_config(method: Method, model: nn.Module, peft_type: str) -> dict:
    """Fields every exported config shares; ``base_model_name_or_path`` and ``task_type`` are filled by
    :func:`write_peft_folder`."""
    layers = method.layers
    return {
        "peft_type": peft_type,
        "target_modules": peft_target_modules(model, list(layers)),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "modules_to_save": list(saved_modules(model)) or None,
        "base_model_name_or_path": None,
        "task_type": None,
        "inference_mode": True,
    }


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{mod}.{key}": t for mod, state in saved_modules(model).items() for key, t in state.items()}


def lora_export(method: Method, model: nn.Module, pairs: dict, r: int, lora_alpha: float, use_rslora: bool,
                magnitudes: dict | None = None) -> tuple[dict, dict]:
    """(config, tensors) of a PEFT LoRA (DoRA with ``magnitudes``) from ``pairs`` {path: (A, B)}."""
    config = base_config(method, model, "LORA")
    config.update(r=r, lora_alpha=lora_alpha, lora_dropout=method.cfg.lora_dropout, use_rslora=use_rslora,
                  use_dora=magnitudes is not None, init_lora_weights=True, rank_pattern={}, alpha_pattern={})
    tensors = {}
    for path, (a, b) in pairs.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().float()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().float()
        if magnitudes is not None:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = magnitudes[path].detach().float()
    return config, {**tensors, **head_tensors(model)}


def is_plain_lora(layer: nn.Module) -> bool:
    """A LoraLayer whose output is exactly W0x + b + s·B(A x̃) (no overridden math)."""
    cls = type(layer)
    return (isinstance(layer, LoraLayer) and cls.adapter_forward is LoraLayer.adapter_forward
            and cls.delta_weight is LoraLayer.delta_weight and cls.merged_weight is AdapterLayer.merged_weight)


def export_lora_family(method: Method, model: nn.Module, strict: bool = True) -> tuple[dict, dict] | None:
    """LoRA-family layers with LoRA's math (``strict``: also LoRA's own ``lora_output``); else None."""
    layers = method.layers
    ok = all(is_plain_lora(l) and (not strict or type(l).lora_output is LoraLayer.lora_output)
             for l in layers.values())
    if not layers or not ok:
        return None
    cfg = method.cfg
    pairs = {p: (l.lora_A.weight, l.lora_B.weight) for p, l in layers.items()}
    return lora_export(method, model, pairs, cfg.r, cfg.lora_alpha, cfg.use_rslora)


def builtin_export(method: Method, model: nn.Module) -> tuple[dict, dict] | None:
    """The default :meth:`Method.export_peft`: LoRA-family layers with LoRA's math, else None. Methods
    with another PEFT form (DoRA, VeRA, DyLoRA, Delta-LoRA) override ``export_peft`` in their module."""
    return export_lora_family(method, model)


# ---- folders -----------------------------------------------------------------------------------------
def base_model_reference(model: nn.Module, recipe) -> str:
    """What ``base_model_name_or_path`` names: the folder the base was loaded from (for built-ins
    lorakit's cached copy, the exact weights trained on) as an absolute path, else the recipe's name."""
    loaded = getattr(model, "name_or_path", "") or ""
    if loaded and Path(loaded).is_dir():
        return str(Path(loaded).resolve())
    return recipe.model.name_or_path


def usage(config: dict, model: nn.Module, recipe, method: Method) -> str:
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


def write_peft_folder(output: Path, model: nn.Module, method: Method, recipe, base_model: str | None = None,
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
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    return True


def peft_logits(folder: Path, session, batches) -> list[torch.Tensor] | None:
    """Logits of ``peft.PeftModel.from_pretrained`` on the recipe's base (loaded as lorakit loads it,
    quantized if it was) with the exported folder; None when peft is not installed."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    from lorakit.merge import _logits
    from lorakit.models import load_model

    recipe = session.recipe
    labels = getattr(session.data, "label_names", None) if recipe.model.task == "seq_cls" else None
    base = load_model(recipe.model, num_labels=len(labels) if labels else None, label_names=labels,
                      precision=recipe.train.precision)
    if recipe.model.quantization is not None:
        from lorakit.quant import prepare_kbit_model

        prepare_kbit_model(base)  # fp32 norms, as lorakit trained
    model = PeftModel.from_pretrained(base, str(folder))
    if recipe.model.quantization is None:
        model.to(session.device)
    return _logits(model, batches, session.device, recipe_precision(recipe, session.device))


def export_run(run: Path, output: Path, console: Console, rank: int | None = None, base_model: str | None = None,
               check: bool = True, trust_remote_code: bool = False) -> float | None:
    """Export a run's (or checkpoint's) adapter as a PEFT folder with its tokenizer.

    Returns the largest |logit difference| between lorakit's model and PEFT's model loaded from
    ``output`` on a few held-out batches (None when not checked). Raises LorakitError for an existing
    non-empty ``output``, a fixed-rank method given ``--rank``, or a method without a PEFT equivalent.
    """
    from lorakit.merge import _logits, _set_rank
    from lorakit.session import load_checkpoint_session
    from lorakit.train.loop import iterate_batches

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise LorakitError(f"--output {output}: folder exists and is not empty")
    session, path = load_checkpoint_session(run, console, cpu_check_overrides(model_device()),  # fp32 on CPU
                                            trust_remote_code=trust_remote_code)
    method = session.method
    _set_rank(method, rank)
    if not write_peft_folder(output, session.model, method, session.recipe, base_model, session.tokenizer):
        raise LorakitError(f"method {method.name} has no faithful PEFT equivalent, so no PEFT adapter can be "
                           f"written; `lorakit merge {run} --output DIR` saves a standalone model instead")
    console.print(f"exported {path} ({method.name}) as a PEFT adapter into {output}", soft_wrap=True)
    snippet = (output / "README.md").read_text().split(chr(10), 2)[2].strip().replace("path/to/this/folder", str(output))
    console.print(f"[dim]{snippet}[/dim]", soft_wrap=True, highlight=False)
    if not check:
        return None
    batches = list(iterate_batches(session.data.eval, session.data.collate, 4, seed=None))[:2]
    before = _logits(session.model, batches, session.device, recipe_precision(session.recipe, session.device))
    session.model = None
    after = peft_logits(output, session, batches)
    if after is None:
        console.print("peft is not installed: the export was not checked")
        return None
    return max((a - b).abs().max().item() for a, b in zip(before, after))
