"""The method registry: one module per method, one ``register`` line each."""

from __future__ import annotations

import difflib

from lorakit.errors import RecipeError
from lorakit.methods.base import AdapterLayer, Method

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    """The registered method called ``name``. Raises RecipeError naming the allowed names."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise RecipeError(f"method.name = {name!r} is not a method{hint}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_method(cfg) -> Method:
    return get_method_class(cfg.name)(cfg)


def _discover() -> None:
    """Import every module of this package; each registers its method(s) with ``@register``."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: (i.name != "lora", i.name)):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = ["REGISTRY", "AdapterLayer", "Method", "build_method", "get_method_class", "register"]
