"""The README does not drift from the code: its configuration reference is exactly the one
generated from the config models, its example config is valid, and so is every config shipped
in configs/."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from detector import cli
from detector.config import Config, DynamicRule, Retry, StaticRule, load_config, parse_config
from detector.errors import DetectorError
from detector.reference import (
    END_MARKER,
    START_MARKER,
    UPDATE_COMMAND,
    readme_block,
    render_reference,
    sections,
    update_readme,
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs").glob("*.yml")])


def test_readme_reference_is_the_generated_one() -> None:
    assert readme_block(README) == render_reference(), (
        f"README.md's configuration reference is stale: run `{UPDATE_COMMAND}` "
        "(descriptions live in detector/config.py)"
    )


def reachable_models(model: type[BaseModel] = Config) -> Iterator[type[BaseModel]]:
    """Every model inside Config's field types (through Optional, unions, lists, dict values),
    found independently of `detector.reference` so a walk that misses one is caught."""
    yield model
    for info in model.model_fields.values():
        yield from _models_in(info.annotation)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from reachable_models(annotation)
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return
    if origin is dict:
        args = args[1:]
    if origin is typing.Annotated:
        args = args[:1]
    if origin is typing.Annotated or origin in (typing.Union, types.UnionType, list, dict):
        for arg in args:
            yield from _models_in(arg)


def test_reference_has_a_section_for_every_model() -> None:
    models = set(reachable_models())
    assert {StaticRule, DynamicRule, Retry} <= models  # the walk reaches union members and list items
    assert {s.model for s in sections()} == models


def test_every_field_and_section_is_described() -> None:
    undescribed = [
        f"{model.__name__}.{name}"
        for model in set(reachable_models())
        for name, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert undescribed == []
    assert [m.__name__ for m in set(reachable_models()) if not (m.__doc__ or "").strip()] == []


def test_reference_rows_name_every_field_with_type_and_default() -> None:
    text = render_reference()
    for section in sections():
        for name in section.model.model_fields:
            assert re.search(rf"^\| `{name}` \|", text, flags=re.MULTILINE), name
    # Constraints, literals, optionals and defaults come out readable.
    assert "| `size` | 2 ≤ int ≤ 4096 | 64 | samples per window |" in text
    assert "| `cell` | `lstm` \\| `gru` \\| `rnn` | `lstm` |" in text
    assert "| `grad_clip` | float > 0 or `null` | 1.0 |" in text
    assert "| `features` | non-empty list of objects | required |" in text
    assert (
        "| `warning` | object, `rule`: `static` \\| `quantile` \\| `sigma` \\| `pot` \\| `dynamic` "
        "| `{rule: quantile, q: 0.995}` |" in text
    )
    # Each union member has its own table, and a reused model is listed once with all its paths.
    assert "#### `streams.<name>.input` with `kind: file`" in text
    assert "#### `sinks.alertmanager[].retry`, `sinks.webhooks[].retry`" in text
    # Caveats that used to live only in the hand-written table.
    assert "Mixed rule kinds" in text
    assert "Not `latest` on Tansu" in text


def test_update_readme_rewrites_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START_MARKER}\n| stale | table |\n{END_MARKER}\nafter\n")
    assert readme_block(readme.read_text()) != render_reference()
    assert update_readme(readme) is True
    text = readme.read_text()
    assert readme_block(text) == render_reference()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{END_MARKER}\nafter\n")
    assert update_readme(readme) is False
    assert readme.read_text() == text


def test_readme_without_markers_is_an_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no reference here\n")
    with pytest.raises(DetectorError, match="config-reference:start"):
        update_readme(readme)
    assert cli.main(["config-reference", "--update-readme", "--readme", str(readme)]) == cli.EXIT_USAGE


def test_cli_prints_and_updates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config-reference"]) == cli.EXIT_OK
    assert capsys.readouterr().out == render_reference()
    readme = tmp_path / "README.md"
    readme.write_text(f"{START_MARKER}\n{END_MARKER}\n")
    assert cli.main(["config-reference", "--update-readme", "--readme", str(readme)]) == cli.EXIT_OK
    assert "updated" in capsys.readouterr().err
    assert readme_block(readme.read_text()) == render_reference()


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
