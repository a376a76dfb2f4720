"""The ``method`` section of a recipe: fields every method accepts, and the LoRA family's own.

:class:`MethodConfig` holds what every adapter method reads (``name``, ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``); each method's config class subclasses it (or
:class:`LoraConfig`) with its own fields. A generic field a method cannot honour (Delta-LoRA's
``lora_dropout``, VeRA's ``lora_alpha``) is listed in its ``set_aside``: set aside with one warning line
naming the field and the paper's rule, so one recipe runs under every method; any other unknown field
is refused with one line naming it. The recipe schema (:mod:`lorakit.config`) finds the class
through the registry by ``method.name``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

PEER_ALIASES = {"lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
# registered method name -> its config's fields; filled by lorakit.methods.registry.register, so that this
# module needs no import of the registry (which imports it)
METHOD_FIELDS: dict[str, frozenset[str]] = {}


class MethodConfig(BaseModel):
    """Fields every method accepts. Methods subclass this for their own fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str = Field("lora", description="the adapter method (lorakit list-methods)")
    r: int = Field(8, gt=0, description="rank of the update BA (alias lora_r)")
    lora_alpha: float = Field(16.0, gt=0, description="scaling = lora_alpha / r (alias alpha)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter branch's input only (alias dropout)")
    target_modules: list[str] | str = Field("all-linear", description=
        "module names (e.g. [q_proj, v_proj]), one regex string matched against full names, or all-linear "
        "(every linear layer but the output head)")

    # Generic fields (of any method's recipe) this method cannot honour, with the paper's rule. A value
    # other than this method's default is set aside — replaced by the default — and named in one warning
    # line (:meth:`set_aside_notes`), so one recipe runs under every method with only ``name`` changed.
    set_aside: ClassVar[dict[str, str]] = {}
    _notes: list[str] = PrivateAttr(default_factory=list)

    def loraplus(self) -> tuple[float, float] | None:
        """(λ = lr_B / lr_A, lr of adapters on embeddings) when LoRA+ groups apply, else None."""
        return None

    def set_aside_notes(self) -> list[str]:
        """One line per field set aside when this config was validated (empty for a fitting recipe)."""
        return list(self._notes)

    @model_validator(mode="wrap")
    @classmethod
    def _aliases_and_set_aside(cls, data: Any, handler) -> Any:
        """Accept the names other tools use (``lora_r``, ``alpha``, ``dropout``), then set aside the
        fields in :attr:`set_aside` (every method inherits this)."""
        notes = []
        if isinstance(data, dict):
            for alias, name in PEER_ALIASES.items():
                if alias in data and name in data:
                    raise ValueError(f"method.{alias} and method.{name} conflict: {alias} is another name for "
                                     f"{name}; give one of them")
                if alias in data:
                    data = {**data, name: data[alias]}
                    del data[alias]
            for name, rule in cls.set_aside.items():
                field = cls.model_fields.get(name) or LoraConfig.model_fields[name]
                default = field.default
                if name in data and data[name] != default:  # "using": a value this method declares and uses
                    instead = f"using {default!r}" if name in vars(cls).get("__annotations__", {}) else "not used"
                    notes.append(f"method.{name} = {data[name]!r} set aside ({rule}); {instead}")
                if name in data:
                    data = {k: v for k, v in data.items() if k != name}
                    if name in cls.model_fields:
                        data[name] = default
            data, foreign = _other_methods_fields(cls, data)
            notes += foreign
        model = handler(data)
        if notes:
            model._notes = notes
        return model

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | str) -> list[str] | str:
        """A non-empty list of non-empty names, all-linear, or a regex that compiles."""
        if isinstance(value, list):
            if not value or not all(name.strip() for name in value):
                raise ValueError("expected module names such as [q_proj, v_proj] (none empty), a regex string, "
                                 "or all-linear")
        elif value != "all-linear":
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regex ({err}); give module names as a list, e.g. [q_proj, v_proj]")
        return value


def _other_methods_fields(cls: type[MethodConfig], data: dict) -> tuple[dict, list[str]]:
    """Drop the fields that another registered method owns but ``cls`` does not (a DyLoRA recipe's
    ``update`` run as LoRA), with a note each; a field no method knows stays, to be refused as unknown."""
    notes = []
    for key in [k for k in data if k not in cls.model_fields]:
        owners = [name for name, fields in METHOD_FIELDS.items() if key in fields]
        if owners:
            notes.append(f"method.{key} = {data[key]!r} set aside (a field of {', '.join(owners)}; "
                         f"{data.get('name', 'this method')} has none)")
            data = {k: v for k, v in data.items() if k != key}
    return data, notes


class LoraConfig(MethodConfig):
    """The A/B methods' fields: rsLoRA scaling and the LoRA+ learning-rate ratio."""

    use_rslora: bool = Field(False, description="scaling = lora_alpha / sqrt(r) (Kalajdzievski 2023)")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description=
        "LoRA+ on any A/B method: lr of lora_B = ratio × learning_rate (Hayou et al. 2024); null: off")
    loraplus_lr_embedding: float = Field(1e-6, gt=0, description="LoRA+: learning rate of embedding adapters")

    def loraplus(self) -> tuple[float, float] | None:
        return None if self.loraplus_lr_ratio is None else (self.loraplus_lr_ratio, self.loraplus_lr_embedding)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023)."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)
