"""The recipe reference, generated from the recipe schema (the pydantic models of :mod:`lorakit.config`
and each registered method's config class), so the documentation cannot drift from the code.

Two renderings of the same facts (field, type and allowed values, default, one line of meaning from the
field's ``Field(description=...)``):

- :func:`markdown`: tables per section, the README's "Recipe reference" (``lorakit recipe --markdown``);
- :func:`commented_recipe`: a complete default recipe in YAML, every field commented
  (``lorakit recipe [--method NAME]``); it validates as it is.
"""

from __future__ import annotations

import textwrap
import types
import typing
from dataclasses import dataclass

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lorakit.config import Recipe
from lorakit.methods.config import LoraConfig

SECTIONS = ("model", "method", "data", "train")


@dataclass
class FieldDoc:
    name: str
    type: str  # the type with its bounds, or the allowed values
    default: str  # as YAML writes it
    description: str


def _scalar(value) -> str:
    if value is None:
        return "null"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(_scalar(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    if origin is list:
        item = typing.get_args(annotation)[0]
        return "list of mappings" if isinstance(item, type) and issubclass(item, BaseModel) else f"list of {_type_name(item)}"
    if annotation is bool:
        return "true | false"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(info: FieldInfo) -> str:
    signs = {annotated_types.Gt: (">", "gt"), annotated_types.Ge: ("≥", "ge"),
             annotated_types.Lt: ("<", "lt"), annotated_types.Le: ("≤", "le")}
    parts = [f"{sign} {_scalar(getattr(item, attr))}" for item in info.metadata
             for kind, (sign, attr) in signs.items() if isinstance(item, kind)]
    return ", ".join(parts)


def field_doc(name: str, info: FieldInfo) -> FieldDoc:
    kind = _type_name(info.annotation)
    bounds = _bounds(info)
    if bounds:
        kind = kind.replace(" | null", "") + f" {bounds}" + (" | null" if "null" in kind else "")
    return FieldDoc(name, kind, "required" if info.is_required() else _scalar(info.default), info.description or "")


def item_model(annotation) -> type[BaseModel] | None:
    """The section model of a list-of-sections field (``data.sources``), else None."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is list else ()
    return args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None


def section_docs(model: type[BaseModel]) -> list[FieldDoc]:
    """One :class:`FieldDoc` per field; a method's config that redefines a shared field without a
    description keeps the shared one, and ``method.name`` lists the registered methods."""
    docs = [field_doc(name, info) for name, info in model.model_fields.items()]
    if issubclass(model, base_method_config()):
        shared = base_method_config().model_fields
        for doc in docs:
            if not doc.description and doc.name in shared:
                doc.description = shared[doc.name].description or ""
            if doc.name == "name":
                doc.type = " | ".join(method_classes())
    return docs


def method_classes() -> dict[str, type[BaseModel]]:
    """{method name: its config class}, in registry order."""
    from lorakit.methods import REGISTRY

    return {name: cls.config_class for name, cls in REGISTRY.items()}


def base_method_config() -> type[BaseModel]:
    return Recipe.model_fields["method"].annotation


def family_config(config: type[BaseModel]) -> type[BaseModel]:
    """The shared config a method's config builds on: the A/B methods' (:class:`LoraConfig`) or every
    method's."""
    return LoraConfig if issubclass(config, LoraConfig) else base_method_config()


def family_docs() -> list[FieldDoc]:
    """The A/B methods' fields beyond every method's."""
    shared = base_method_config().model_fields
    return [doc for doc in section_docs(LoraConfig) if doc.name not in shared]


def method_specific(config: type[BaseModel]) -> list[FieldDoc]:
    """The fields a method adds, and shared fields whose default or type it changes (``name`` aside)."""
    base = family_config(config).model_fields
    docs = []
    for doc in section_docs(config):
        shared = base.get(doc.name)
        if doc.name == "name" or shared is not None and (doc.type, doc.default) == (
                field_doc(doc.name, shared).type, field_doc(doc.name, shared).default):
            continue
        docs.append(doc)
    listed = {doc.name for doc in docs}
    for name, rule in getattr(config, "set_aside", {}).items():
        if name not in listed:
            docs.append(FieldDoc(name, "set aside", "—", f"a recipe's value is set aside with a warning: {rule}"))
    return docs


def _table(rows: list[FieldDoc], first: str = "field", prefix: str = "") -> list[str]:
    lines = [f"| {first} | type / allowed | default | meaning |", "| --- | --- | --- | --- |"]
    for row in rows:
        kind = row.type.replace("|", "\\|")
        lines.append(f"| `{prefix}{row.name}` | {kind} | `{row.default}` | {row.description} |")
    return lines


def markdown() -> str:
    """The whole reference as Markdown tables (the README's "Recipe reference")."""
    out: list[str] = []
    for section in SECTIONS:
        model = Recipe.model_fields[section].annotation
        out += [f"**`{section}`**" + (" (fields every method accepts)" if section == "method" else ""), ""]
        out += _table(section_docs(model), prefix=f"{section}.") + [""]
        for name, info in model.model_fields.items():
            if (item := item_model(info.annotation)) is not None:
                out += [f"**`{section}.{name}[]`** (each item of `{section}.{name}`: "
                        f"{(item.__doc__ or '').strip().splitlines()[0].rstrip('.')})", ""]
                out += _table(section_docs(item), prefix=f"{section}.{name}[].") + [""]
        if section == "method":
            out += ["**`method`: what each method adds or changes** (`lorakit recipe --method NAME` prints a "
                    "whole recipe for it)", "", "| method | field | type / allowed | default | meaning |",
                    "| --- | --- | --- | --- | --- |"]
            for name, config in method_classes().items():
                for row in method_specific(config):
                    kind = row.type.replace("|", "\\|")
                    out.append(f"| `{name}` | `{row.name}` | {kind} | `{row.default}` | {row.description} |")
            out.append("")
            family = [name for name, config in method_classes().items() if issubclass(config, LoraConfig)]
            out += [f"**`method`: fields of the A/B methods** ({', '.join(family)})", ""]
            out += _table(family_docs(), prefix="method.") + [""]
    top = field_doc("output_dir", Recipe.model_fields["output_dir"])
    out += ["**top level**", ""] + _table([top]) + [""]
    return "\n".join(out)


def _commented(docs: list[FieldDoc], values: dict, indent: str) -> list[str]:
    lines = []
    for doc in docs:
        comment = textwrap.wrap(f"{doc.type} — {doc.description}", width=100 - len(indent) - 2)
        lines += [f"{indent}# {line}" for line in comment] + [f"{indent}{doc.name}: {_scalar(values[doc.name])}"]
    return lines


def commented_recipe(method: str = "lora") -> str:
    """A complete recipe with every field at its default for ``method``, each commented with its type,
    allowed values and meaning. Raises RecipeError for an unknown method name."""
    from lorakit.methods import get_method_class

    config = get_method_class(method).config_class
    recipe = Recipe.model_validate({"method": {"name": method}})
    lines = ["# A lorakit recipe: every field at its default, with its type and meaning (lorakit recipe).",
             "# Delete what you do not change; `lorakit train RECIPE key=value` overrides any field."]
    for section in SECTIONS:
        model = config if section == "method" else Recipe.model_fields[section].annotation
        values = getattr(recipe, section).model_dump(mode="json")
        lines += [f"{section}:"] + _commented(section_docs(model), values, "  ")
    top = field_doc("output_dir", Recipe.model_fields["output_dir"])
    lines += _commented([top], {"output_dir": recipe.output_dir}, "")
    return "\n".join(lines) + "\n"
