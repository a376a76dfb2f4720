"""The adapter methods: one module per method, each adding itself to the registry with ``@register``.

Importing this package imports every module in it, so the registry is complete; the recipe schema
(:mod:`lorakit.config`) and every command find a method through :func:`get_method_class` by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from lorakit.methods.base import AdapterLayer, Method
from lorakit.methods.config import LoraConfig, MethodConfig
from lorakit.methods.registry import REGISTRY, build_method, get_method_class, methods_for_peft, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: (i.name != "lora", i.name)):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "AdapterLayer", "LoraConfig", "Method", "MethodConfig", "build_method",
           "get_method_class", "methods_for_peft", "register"]
