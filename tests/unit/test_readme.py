"""The README does not drift from the code: every config field is in its reference table, its
example config is valid, and so is every config shipped in configs/."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from detector.config import Config, Stream, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs").glob("*.yml")])


def reference_rows() -> list[tuple[str, str]]:
    """(key cell, whole row) of each row of the table under `### Reference`."""
    start = README.index("### Reference")
    end = min(i for i in (README.find("\n## ", start), README.find("\n### ", start + 1), len(README)) if i > 0)
    rows = []
    for line in README[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= {"-", " "} and cells[0] != "key":
            rows.append((cells[0], line))
    return rows


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def submodels(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models inside a field's type (through Optional, unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return
    args = typing.get_args(annotation)
    if origin is dict:
        args = args[1:]  # the values, not the keys
    if origin is typing.Annotated or origin in (typing.Union, types.UnionType, list, tuple, dict):
        for arg in args[:1] if origin is typing.Annotated else args:
            yield from submodels(arg)


def tag_of(model: type[BaseModel]) -> str | None:
    """The discriminator value of a union member (`static` for StaticRule), if it has one."""
    for name in ("rule", "kind"):
        field = model.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is Literal:
            return str(typing.get_args(field.annotation)[0])
    return None


def config_fields(
    model: type[BaseModel] = Config, prefix: str = "", sections: frozenset[str] = frozenset()
) -> Iterator[tuple[str, str, frozenset[str], bool]]:
    """(path, field name, names a documenting row's key may start with, is a section) for every
    field. Stream fields are documented relative to the stream (`window.size`)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        about = sections or frozenset({path})
        subs = list(submodels(info.annotation))
        yield path, name, about, bool(subs)
        for sub in subs:
            if sub is Stream:
                yield from config_fields(Stream)
            else:
                tag = tag_of(sub) if len(subs) > 1 else None
                yield from config_fields(sub, path, about | ({tag} if tag else set()))


def is_documented(path: str, name: str, about: frozenset[str], section: bool, rows: list[tuple[str, str]]) -> bool:
    for key, row in rows:
        keys = ticked(key)
        if path in keys:
            return True
        if section and any(k.startswith(path + ".") for k in keys):
            return True  # `thresholds` is documented by its `thresholds.*` rows
        row_is_about = any(k in about or k.split(".")[0] in about for k in keys)
        if row_is_about and (
            any(t == name or t.endswith("." + name) for t in ticked(row)) or re.search(rf"\b{name}\b", key)
        ):
            return True
    return False


def test_walk_finds_nested_fields() -> None:
    # The walk itself must reach union members and list items, or the test below proves nothing.
    found = {(path, name) for path, name, _, _ in config_fields()}
    for expected in [
        ("streams", "streams"),
        ("scoring.batch_windows", "batch_windows"),
        ("input.topic", "topic"),
        ("input.format", "format"),
        ("mapping.features.default", "default"),
        ("thresholds.warning.factor", "factor"),
        ("thresholds.critical.warmup", "warmup"),
        ("training.trim_fraction", "trim_fraction"),
    ]:
        assert expected in found


def test_every_config_field_is_in_the_readme_reference() -> None:
    rows = reference_rows()
    assert len(rows) > 20
    missing = sorted(
        {path for path, name, about, section in config_fields() if not is_documented(path, name, about, section, rows)}
    )
    assert missing == [], f"README.md ### Reference lacks: {', '.join(missing)}"


def test_readme_drift_check_notices_a_missing_field() -> None:
    rows = [(key, row) for key, row in reference_rows() if "training.seed" not in key]
    fields = {path: (path, name, about, section) for path, name, about, section in config_fields()}
    assert not is_documented(*fields["training.seed"], rows)
    assert is_documented(*fields["training.grad_clip"], rows)


def test_readme_example_config_is_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README, flags=re.DOTALL)
    examples = [b for b in blocks if b.lstrip().startswith("streams:")]
    assert examples
    for block in examples:
        config, _ = parse_config(block, "README.md")
        assert config.streams


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    # Loading does not open data or checkpoints, so this needs no data folder.
    config = load_config(path)
    assert config.streams


def test_configs_folder_is_not_empty() -> None:
    assert CONFIGS
