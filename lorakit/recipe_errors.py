"""How a bad recipe is said: one line per pydantic validation error (the field as written, the bad value,
what is allowed, the nearest name for an unknown key) or YAML problem (a key given twice included)."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorakit.errors import RecipeError
from lorakit.methods import MethodConfig, get_method_class

UNION_TAG = re.compile(r"^(list|dict|str|int|float|bool|literal|function-\w+)(\[.*\])?$")


def nearest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else f"; allowed: {', '.join(allowed)}"


def section_fields(root: type[BaseModel], data: dict, loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (the location of an unknown key), for the suggestion."""
    model = root
    node: Any = data
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (data.sources)
            node = node[part] if isinstance(node, list) and part < len(node) else {}
            continue
        node = node.get(part, {}) if isinstance(node, dict) else {}
        if part == "method":
            try:
                model = get_method_class(node.get("name", MethodConfig.model_fields["name"].default)).config_class
            except RecipeError:
                model = MethodConfig
        else:
            annotation = model.model_fields[str(part)].annotation
            annotation = (typing.get_args(annotation) or [annotation])[0] if typing.get_origin(annotation) is list \
                else annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else model
    return list(model.model_fields)


def field_name(loc: tuple) -> str:
    """``data.sources[1].weight`` from pydantic's ``("data", "sources", 1, "weight")``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def format_error(err: ValidationError, data: dict, origin: str, root: type[BaseModel]) -> str:
    """One line for the first problem of a recipe mapping ``data`` validated as ``root``: the field (as
    ``data.sources[1].weight``), the bad value and what is allowed; an unknown key gets the nearest name."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not UNION_TAG.match(str(p)))  # not `list[str]` of a union
    field = field_name(loc) or "recipe"
    if first["type"] == "missing":
        return f"{origin}: {field} is missing"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        return f"{origin}: unknown field `{field}`{nearest(key, section_fields(root, data, loc))}"
    msg = first["msg"].removeprefix("Value error, ")
    ctx = first.get("ctx", {})
    if "expected" in ctx:
        msg = f"expected {ctx['expected']}"
    if not loc or f"{field}." in msg:  # a rule across fields: the message names them
        return f"{origin}: {msg}"
    return f"{origin}: {field} = {first.get('input')!r} is invalid: {msg}"


def yaml_reason(err: yaml.YAMLError) -> str:
    """One line: the problem and its line, from a PyYAML error."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem}, line {mark.line + 1}" if mark is not None else problem


def refuse_repeated_keys(node: yaml.Node | None, visited: set[int] | None = None) -> None:
    """Raise ``yaml.YAMLError`` for a key given twice in one mapping of a composed YAML document (YAML
    itself keeps the last one silently). Composing builds nodes only: no tag is constructed. An alias is
    the node it names, so each node is visited once (a recursive alias cannot loop)."""
    visited = set() if visited is None else visited
    if node is None or id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.YAMLError(f"`{key_node.value}` is given twice in one section "
                                         f"(line {key_node.start_mark.line + 1})")
                seen.add(key_node.value)
            refuse_repeated_keys(value_node, visited)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            refuse_repeated_keys(item, visited)
