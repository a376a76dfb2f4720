"""An adapter in PEFT's format: the ``adapter_config.json`` mapping and ``adapter_model.safetensors``
tensors each method's :meth:`~lorakit.methods.base.Method.export_peft` returns (written to a folder by
:mod:`lorakit.storage.peft`).

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

import re

import torch
from torch import nn

from lorakit.methods.layer import AdapterLayer

PREFIX = "base_model.model."


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


def base_config(method, model: nn.Module, peft_type: str) -> dict:
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


def lora_export(method, model: nn.Module, pairs: dict, r: int, lora_alpha: float, use_rslora: bool,
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


def export_lora_family(method, model: nn.Module, strict: bool = True) -> tuple[dict, dict] | None:
    """LoRA-family layers with LoRA's math (``strict``: also LoRA's own branch code); else None.

    The scaling written is the layers' own s: ``lora_alpha`` / ``use_rslora`` of the recipe when they
    give s, else ``lora_alpha`` = s·r without rsLoRA (a method with its own scaling rule); layers with
    different s have no single PEFT config (None)."""
    layers = method.layers
    if not layers or not all(layer.is_plain_lora(strict) for layer in layers.values()):
        return None
    cfg = method.cfg
    pairs = {p: (l.lora_A.weight, l.lora_B.weight) for p, l in layers.items()}
    scalings = {float(l.scaling) for l in layers.values()}
    if scalings == {float(cfg.scaling)}:
        return lora_export(method, model, pairs, cfg.r, cfg.lora_alpha, cfg.use_rslora)
    if len(scalings) != 1:
        return None
    return lora_export(method, model, pairs, cfg.r, scalings.pop() * cfg.r, False)
