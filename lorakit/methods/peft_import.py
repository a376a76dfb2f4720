"""Reading a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT saves
them) into a method: the reverse of :mod:`lorakit.methods.peft_export`.

Which methods a folder can start is each method's :meth:`~lorakit.methods.base.Method.imports_peft`
(LoRA's family for a LoRA adapter, DoRA for one with ``use_dora``). ``r``, ``lora_alpha``, ``use_rslora`` and ``target_modules``
come from the adapter config when the recipe leaves them unset, and must equal it when set. After the
method is attached the tensors are loaded: ``base_model.model.<path>.lora_A.weight`` → ``<path>.lora_A.weight``
(likewise ``lora_B``), ``<path>.lora_magnitude_vector`` → ``<path>.magnitude`` (DoRA), and the modules in
``modules_to_save`` (a classification head) → the model's own tensors, which then train. The adapted
modules must be exactly those the adapter holds. Every mismatch is a LorakitError naming model.adapter.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.jsonfile import read_json_object
from lorakit.errors import LorakitError

TAKEN = ("r", "lora_alpha", "use_rslora", "target_modules")


def _where(path) -> str:
    return f"model.adapter {path}"


def read_adapter_config(path: str | Path) -> dict:
    """The folder's ``adapter_config.json``. Raises LorakitError: no such folder/file, or not a LoRA."""
    folder = Path(path).expanduser()
    file = folder / "adapter_config.json"
    if not file.is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise LorakitError(f"{_where(path)}: not a PEFT adapter folder (needs adapter_config.json and "
                           "adapter_model.safetensors)")
    config = read_json_object(file, _where(path))
    if config.get("peft_type") != "LORA":
        raise LorakitError(f"{_where(path)}: peft_type {config.get('peft_type')!r}; only LORA adapters "
                           "(with or without use_dora) can be a starting point")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LorakitError(f"{_where(path)}: per-module ranks/alphas ({key}) are not supported")
    if config.get("bias", "none") != "none":
        raise LorakitError(f"{_where(path)}: bias {config['bias']!r}; lorakit trains no biases (bias: none)")
    return config


def _same(key: str, ours, theirs) -> bool:
    if key == "target_modules" and isinstance(ours, list) and isinstance(theirs, list):
        return sorted(ours) == sorted(theirs)
    if key == "lora_alpha":
        return float(ours) == float(theirs)
    return ours == theirs


def fill_from_adapter(method, config: dict, path) -> None:
    """Fill ``method`` (a method config, in place) with the adapter's r, lora_alpha, use_rslora and
    target_modules where the recipe left them unset. Raises LorakitError naming model.adapter: a field
    the adapter lacks, or a recipe field set to a value other than the adapter's."""
    theirs = {k: config.get(k, False if k == "use_rslora" else None) for k in TAKEN}
    for key in TAKEN:
        if theirs[key] is None:
            raise LorakitError(f"{_where(path)}: adapter_config.json has no {key}")
        if key in method.model_fields_set and not _same(key, getattr(method, key), theirs[key]):
            raise LorakitError(f"method.{key} = {getattr(method, key)!r} but {_where(path)} has {key} = "
                               f"{theirs[key]!r}; remove method.{key} from the recipe or make them equal")
    for key in TAKEN:
        if key not in method.model_fields_set:
            setattr(method, key, theirs[key])


def _own_key(key: str) -> tuple[str, str]:
    """(kind, lorakit key) for a PEFT tensor key: kind is lora, magnitude or module (a saved module)."""
    key = key.removeprefix("base_model.model.")
    key = re.sub(r"\.(lora_A|lora_B)\.default\.weight$", r".\1.weight", key)
    key = key.replace(".modules_to_save.default.", ".")
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        return "lora", key
    match = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?", key)
    if match:
        return "magnitude", f"{match.group(1)}.magnitude"
    if re.search(r"\.lora_\w+", key):
        raise LorakitError(f"tensor {key}: not a LoRA tensor lorakit can load")
    return "module", key


@torch.no_grad()
def load_peft_weights(model: nn.Module, method, path: str | Path) -> int:
    """Copy the adapter's tensors into ``model`` (the method attached). Returns the tensor count.

    Raises:
        LorakitError (naming model.adapter): the adapted modules differ from the adapter's, a tensor has
            no place in the model, or a shape differs.
    """
    file = Path(path).expanduser() / "adapter_model.safetensors"
    try:
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorakitError(f"{_where(path)}: adapter_model.safetensors is not a valid safetensors file ({reason})") from None
    mapped, modules, owners = {}, set(), set()
    for key, tensor in tensors.items():
        try:
            kind, target = _own_key(key)
        except LorakitError as err:
            raise LorakitError(f"{_where(path)}: {err}") from None
        if kind == "lora":
            modules.add(target.rsplit(".", 2)[0])
        elif kind == "module":
            owners.add(target.rpartition(".")[0])
        mapped[target] = (key, tensor)
    adapted = set(method.layers)
    if modules != adapted:
        extra, missing = sorted(modules - adapted), sorted(adapted - modules)
        detail = f"adapts {missing[0]}, which the adapter lacks" if missing else f"does not adapt {extra[0]}"
        raise LorakitError(f"{_where(path)}: the recipe's target_modules {detail}; the adapter covers "
                           f"{len(modules)} modules, the recipe {len(adapted)}")
    own = model.state_dict()
    for target, (key, tensor) in mapped.items():
        if target not in own:
            raise LorakitError(f"{_where(path)}: tensor {key} has no place in this model (another base model?)")
        if own[target].shape != tensor.shape:
            raise LorakitError(f"{_where(path)}: tensor {key} has shape {tuple(tensor.shape)}, this model "
                               f"expects {tuple(own[target].shape)}")
    for target, (_, tensor) in mapped.items():
        own[target].copy_(tensor.to(own[target].dtype))
    for owner in owners:  # modules_to_save train, as in PEFT (and so the checkpoint keeps them)
        model.get_submodule(owner).requires_grad_(True)
    return len(mapped)
