"""The config reference, docs/configuration.md, generated from the schema: every field of every
model a config reaches, with its type, its default and its description. The descriptions live on
the fields (`Field(description=...)`) so that the page cannot drift from the code; `make docs`
(`python -m cluster docs --write`) rewrites it, and a test fails when it is out of date."""

import inspect
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cluster.schema import ClusterConfig

DEFAULT_PATH = Path("docs/configuration.md")

_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}
_BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}

HEADER = """\
# Configuration reference

<!-- Generated from cluster/schema/ by `make docs` (python -m cluster docs --write): edit the
field descriptions there, not this page. -->

A config is an ordinary Ray Serve config file. This page is the `args` of the application whose
`import_path` is `serve_app.app:build_app`; the file's other keys (`http_options`,
`proxy_location`, an application's `name`, `route_prefix`, `runtime_env`) are Serve's own.
`python -m cluster validate FILE` checks a file against this schema, naming the path of every bad
field; unknown keys are errors. A field's path is written as in YAML, `[]` standing for any item of
a list: `models[].deployment.num_gpus`. [`configs/local.yaml`](../configs/local.yaml) and
[`configs/gpu-cluster.yaml`](../configs/gpu-cluster.yaml) are complete examples.
"""


def markdown(root: type[BaseModel] = ClusterConfig) -> str:
    sections = [HEADER]
    for model, path in models(root):
        sections.append(_section(model, path))
    return "\n".join(sections)


def models(root: type[BaseModel] = ClusterConfig) -> list[tuple[type[BaseModel], str]]:
    """Every model a config reaches from `root`, depth first in field order, each with the first
    path it is found at."""
    found: dict[type[BaseModel], str] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        if model in found:
            return
        found[model] = path
        for name, field in model.model_fields.items():
            for inner in _models_in(field.annotation):
                visit(inner, f"{path}.{name}".lstrip(".") + ("[]" if _is_list(field.annotation) else ""))

    visit(root, "")
    return list(found.items())


def undescribed(root: type[BaseModel] = ClusterConfig) -> list[str]:
    """`Model.field` for each field without a description, and `Model` for each model without a
    docstring: the page would have a hole there."""
    missing = []
    for model, _ in models(root):
        if not (model.__doc__ or "").strip():
            missing.append(model.__name__)
        missing += [
            f"{model.__name__}.{name}"
            for name, field in model.model_fields.items()
            if not (field.description or "").strip()
        ]
    return missing


def _section(model: type[BaseModel], path: str) -> str:
    where = f"At `{path}`. " if path else ""
    lines = [
        f"## {model.__name__}",
        "",
        where + _paragraph(model.__doc__ or ""),
        "",
        "| field | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        lines.append(
            f"| `{name}` | {_cell(_field_type(field))} | {_cell(_default(field))} | {_cell(field.description or '')} |"
        )
    return "\n".join(lines) + "\n"


def _paragraph(text: str) -> str:
    return " ".join(inspect.cleandoc(text).split())


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _field_type(field: FieldInfo) -> str:
    """A field's own constraints sit in `field.metadata` (those of an optional field bind its
    value, not the null); those of a type inside a union or a list sit in that type's
    `Annotated`."""
    annotation = field.annotation
    if field.metadata and _is_optional(annotation):
        [inner] = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _or_null(_constrained(_type(inner), field.metadata, inner))
    return _constrained(_type(annotation), field.metadata, annotation)


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        base, *metadata = args
        return _constrained(_type(base), metadata, base)
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if len(options) > 1 and all(_is_model(arg) for arg in options):
            text = "one of " + ", ".join(_type(arg) for arg in options)
        else:
            text = " or ".join(_type(arg) for arg in options)
        return _or_null(text) if len(options) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {_inner(args[0])}"
    if origin is dict:
        return f"map of {_inner(args[0])} to {_inner(args[1])}"
    if _is_model(annotation):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and annotation.__name__ == "datetime":
        return "date-time (ISO 8601)"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _inner(annotation: Any) -> str:
    """An item's type, bracketed where its own commas would read as the list's."""
    text = _type(annotation)
    return f"({text})" if "," in text or " or " in text else text


def _or_null(text: str) -> str:
    return f"{text}, or null" if "," in text else f"{text} or null"


def _constrained(text: str, metadata: list[Any], base: Any) -> str:
    """`integer ≥ 1`, `number > 0, ≤ 60`, `string matching ...`, `string, non-empty`."""
    constraints = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            return _constrained(text, item.metadata, base)
        for name, symbol in _BOUNDS.items():
            if getattr(item, name, None) is not None:
                constraints.append(f"{symbol} {getattr(item, name)}")
        if isinstance(item, annotated_types.MinLen):
            constraints.append(_min_length(item.min_length, base))
        if getattr(item, "pattern", None) is not None:
            constraints.append(f"matching `{item.pattern}`")
    if not constraints:
        return text
    joined = ", ".join(constraints)
    return f"{text} {joined}" if joined[0] in "><≥≤m" else f"{text}, {joined}"


def _min_length(length: int, base: Any) -> str:
    if get_origin(base) is list:
        return "at least one item" if length == 1 else f"at least {length} items"
    return "non-empty" if length == 1 else f"at least {length} characters"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "its defaults"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if _is_model(annotation):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)
