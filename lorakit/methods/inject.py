"""Finding target modules and swapping them for adapter layers.

``target_modules`` is a list of names (a module matches when its dotted path equals a name or ends
with ``.name``), a regex string (full match on the dotted path), or ``all-linear`` (every linear layer
except the LM head and the classification head).
"""

from __future__ import annotations

import re
from torch import nn

from lorakit.errors import LorakitError
from lorakit.methods.layer import AdapterLayer, is_conv1d

HEAD_NAMES = ("lm_head", "score", "classifier")


def is_adaptable(module: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' 4/8-bit layers subclass it) or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def head_names(model: nn.Module) -> set[str]:
    """Dotted paths of the output head(s): the LM head and the classification head."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[0] in HEAD_NAMES and name.count(".") <= 1:
            names.add(name)
    return names


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Dotted paths of the modules to adapt, in model order.

    Raises:
        LorakitError: nothing matched, or a match is not a linear layer; lists the names that exist.
    """
    heads = head_names(model)
    candidates = {n: m for n, m in model.named_modules() if n and not isinstance(m, AdapterLayer)}
    if target_modules == "all-linear":
        chosen = [n for n, m in candidates.items() if is_adaptable(m) and n not in heads]
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        chosen = [n for n in candidates if pattern.fullmatch(n)]
    else:
        chosen = [n for n in candidates if any(n == t or n.endswith("." + t) for t in target_modules)]
    linear_suffixes = sorted({n.split(".")[-1] for n, m in candidates.items() if is_adaptable(m)})
    if not chosen:
        raise LorakitError(
            f"method.target_modules {target_modules!r} matches no module; linear layers here: "
            f"{', '.join(linear_suffixes)} (or use all-linear)"
        )
    bad = [n for n in chosen if not is_adaptable(candidates[n])]
    if bad:
        raise LorakitError(
            f"method.target_modules {target_modules!r} matches {bad[0]} ({type(candidates[bad[0]]).__name__}), "
            f"which is not a linear layer; linear layers here: {', '.join(linear_suffixes)}"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, method, task: str = "causal_lm") -> dict[str, AdapterLayer]:
    """Freeze ``model``, wrap each target with ``method.make_layer(name, module)`` (a
    :class:`~lorakit.methods.base.Method`), unfreeze a classification head.

    Returns the adapter layers by dotted path.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name in find_targets(model, method.cfg.target_modules):
        layer = method.make_layer(name, model.get_submodule(name))
        layer.train(model.training)
        replace_module(model, name, layer)
        layers[name] = layer
    if task == "seq_cls":
        for name in head_names(model):
            if name.split(".")[0] in ("score", "classifier"):
                for param in model.get_submodule(name).parameters():
                    param.requires_grad_(True)
    return layers


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
