"""The configuration reference, rendered as markdown from the config models.

Every field's meaning lives in `detector/config.py` as its `Field(description=...)` and every
section's in its model's docstring; `render_reference()` turns them, with each field's type,
constraints and default, into one table per section. The README holds the rendered text
between `START_MARKER` and `END_MARKER`; `detector config-reference --update-readme` rewrites
it, and a unit test fails when it is stale, so the reference cannot drift from the code.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from detector.config import Config
from detector.errors import DetectorError

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"
UPDATE_COMMAND = ".venv/bin/detector config-reference --update-readme"


@dataclass
class Section:
    """One model's table: every path it appears at (a model may be reused, like `Retry`)."""

    model: type[BaseModel]
    paths: list[str] = field(default_factory=list)


def sections(root: type[BaseModel] = Config) -> list[Section]:
    """Every model reachable from `root`, depth-first in field order, with the paths it sits at.

    Paths use `<name>` for a key the user chooses (`streams.<name>.window`) and `[]` for a list
    item (`sinks.webhooks[].retry`).
    """
    found: dict[type[BaseModel], Section] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        if model in found:
            found[model].paths.append(path)
            return
        found[model] = Section(model, [path])
        for name, info in model.model_fields.items():
            for sub, sub_path in _nested_models(info.annotation, _join(path, name)):
                visit(sub, sub_path)

    visit(root, "")
    return list(found.values())


def render_reference(root: type[BaseModel] = Config) -> str:
    """The reference as markdown: a heading, the model's docstring and a field table per section."""
    out = [
        f"Generated from the models in `detector/config.py` (`{UPDATE_COMMAND}`): edit the "
        "descriptions there, not here. A `<name>` in a path is a key you choose; `[]` is a list item.",
    ]
    for section in sections(root):
        out += ["", f"#### {_heading(section)}", ""]
        doc = inspect.getdoc(section.model)
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, info in section.model.model_fields.items():
            cells = [f"`{name}`", _type(info.annotation, info.metadata), _default(info), info.description or ""]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def readme_block(text: str) -> str:
    """The text between the README's reference markers (without the marker lines)."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise DetectorError(f"the README has no {START_MARKER} ... {END_MARKER} block")
    return text[start + len(START_MARKER) : end].strip("\n") + "\n"


def update_readme(path: Path) -> bool:
    """Replace the README's reference block with the rendered one. Returns whether it changed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DetectorError(f"cannot read {path}: {exc.strerror}") from None
    old = readme_block(text)
    new = render_reference()
    if old == new:
        return False
    start = text.index(START_MARKER) + len(START_MARKER)
    path.write_text(text[:start] + "\n" + new + text[text.index(END_MARKER) :])
    return True


def config_reference_command(update: bool, readme: Path) -> int:
    """`detector config-reference`: print the reference, or with `update` rewrite `readme`'s block."""
    if not update:
        sys.stdout.write(render_reference())
        return 0
    changed = update_readme(readme)
    print(f"{readme}: configuration reference {'updated' if changed else 'already up to date'}", file=sys.stderr)
    return 0


# --- helpers -----------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _nested_models(annotation: Any, path: str) -> list[tuple[type[BaseModel], str]]:
    """The models inside a field's type, each with the path its fields sit under."""
    annotation = _strip_annotated(annotation)
    if _is_model(annotation):
        return [(annotation, path)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return [found for arg in args for found in _nested_models(arg, path)]
    if origin is list:
        return _nested_models(args[0], path + "[]")
    if origin is dict:
        return _nested_models(args[1], path + ".<name>")
    return []


def tag(model: type[BaseModel]) -> tuple[str, str] | None:
    """The (field, value) that selects `model` in a discriminated union, like ("rule", "static")."""
    for name, info in model.model_fields.items():
        values = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is Literal else ()
        if info.is_required() and len(values) == 1:
            return name, str(values[0])
    return None


def _heading(section: Section) -> str:
    paths = ", ".join(f"`{p}`" for p in section.paths) if section.paths != [""] else "Top level"
    selector = tag(section.model)
    return f"{paths} with `{selector[0]}: {selector[1]}`" if selector else paths


def _number(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:g}").replace("e+", "e")


def _bounds(metadata: list[Any]) -> tuple[str, str]:
    """(' 2 ≤' style lower bound, '≤ 4096' style upper bound) from a field's constraints."""
    lower = upper = ""
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            lower = f"{_number(item.ge)} ≤ "  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            lower = f"{_number(item.gt)} < "  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            upper = f" ≤ {_number(item.le)}"  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            upper = f" < {_number(item.lt)}"  # type: ignore[arg-type]
    return lower, upper


def _type(annotation: Any, metadata: list[Any]) -> str:
    """A readable type: `2 ≤ int ≤ 4096`, `` `lstm` | `gru` | `rnn` ``, `list of str`, `... or null`."""
    annotation = _strip_annotated(annotation)
    if _is_union(annotation):
        args = typing.get_args(annotation)
        rest = [_strip_annotated(a) for a in args if a is not type(None)]
        tags = [tag(a) if _is_model(a) else None for a in rest]
        if len(rest) > 1 and all(tags):
            text = f"object, `{tags[0][0]}`: " + " | ".join(f"`{t[1]}`" for t in tags if t)  # type: ignore[index]
        elif len(rest) == 1:
            text = _type(rest[0], metadata)
        else:
            text = " or ".join(_type(a, metadata) for a in rest)
        return f"{text} or `null`" if len(rest) < len(args) else text
    if _is_model(annotation):
        return "object"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in args)
    nonempty = "non-empty " if _min_length(metadata) else ""
    if origin is list:
        inner = "objects" if _is_model(_strip_annotated(args[0])) else _type(args[0], [])
        return f"{nonempty}list of {inner}"
    if origin is dict:
        key = "name" if typing.get_origin(args[0]) is typing.Annotated else _type(args[0], [])
        value = "objects" if _is_model(args[1]) else ("anything" if args[1] is Any else _type(args[1], []))
        return f"{nonempty}map of {key} to {value}"
    if annotation is str:
        patterns = [m.pattern for m in metadata if getattr(m, "pattern", None)]
        return f"str matching `{patterns[0]}`" if patterns else f"{nonempty}str"
    names = {int: "int", float: "float", bool: "bool", Path: "path"}
    name = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    lower, upper = _bounds(metadata)
    if lower and not upper:
        # `int ≥ 1` reads better than `1 ≤ int`.
        bound, sign = lower.split(" ")[:2]
        return f"{name} {'≥' if sign == '≤' else '>'} {bound}"
    return f"{lower}{name}{upper}"


def _min_length(metadata: list[Any]) -> bool:
    return any(isinstance(m, annotated_types.MinLen) and m.min_length > 0 for m in metadata)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
        if not value:
            return ""  # the defaults in the object's own table
    if value is None:
        return "`null`"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return f"{value:.1f}"  # 300.0: the YAML reads as a float
    if isinstance(value, float | int) and not isinstance(value, bool):
        return _number(value)
    flow = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000)
    return f"`{flow.removesuffix('...' + chr(10)).strip()}`"


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")
