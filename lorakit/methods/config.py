"""The ``method`` section of a recipe: fields every method accepts, and the LoRA family's own.

:class:`MethodConfig` holds what every adapter method reads (``name``, ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``); each method's config class subclasses it (or
:class:`LoraConfig`) with its own fields, so a field a method cannot honour is unknown to it and the
recipe is refused with one line naming it. The recipe schema (:mod:`lorakit.config`) finds the class
through the registry by ``method.name``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PEER_ALIASES = {"lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


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

    def loraplus(self) -> tuple[float, float] | None:
        """(λ = lr_B / lr_A, lr of adapters on embeddings) when LoRA+ groups apply, else None."""
        return None

    @model_validator(mode="before")
    @classmethod
    def _peer_aliases(cls, data: Any) -> Any:
        """Accept the names other tools use: ``lora_r``, ``alpha``, ``dropout`` (every method inherits this)."""
        if isinstance(data, dict):
            for alias, name in PEER_ALIASES.items():
                if alias in data and name in data:
                    raise ValueError(f"method.{alias} and method.{name} conflict: {alias} is another name for "
                                     f"{name}; give one of them")
                if alias in data:
                    data = {**data, name: data[alias]}
                    del data[alias]
        return data

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
