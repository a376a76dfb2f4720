"""The method registry: ``@register`` adds a :class:`~lorakit.methods.base.Method` under its ``name``."""

from __future__ import annotations

import difflib

from lorakit.errors import RecipeError
from lorakit.methods.base import Method
from lorakit.methods.config import METHOD_FIELDS, MethodConfig

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    METHOD_FIELDS[cls.name] = frozenset(cls.config_class.model_fields)
    return cls


def get_method_class(name: str) -> type[Method]:
    """The registered method called ``name``. Raises RecipeError naming the allowed names."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise RecipeError(f"method.name = {name!r} is not a method{hint}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_method(cfg: MethodConfig) -> Method:
    """The recipe's method, not yet attached to a model."""
    return get_method_class(cfg.name)(cfg)


def methods_for_peft(adapter_config: dict) -> list[str]:
    """Names of the methods that can start from a PEFT folder with this ``adapter_config.json``
    (:meth:`Method.imports_peft`), in registration order."""
    return [name for name, cls in REGISTRY.items() if cls.imports_peft(adapter_config)]
