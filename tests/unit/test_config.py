"""Config loading: typed frozen models, one error listing every problem by YAML path, ${ENV}."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.config import (
    MAX_ALERT_WINDOWS,
    Config,
    DynamicRule,
    FileInput,
    KafkaInput,
    QuantileRule,
    StaticRule,
    Stream,
    load_config,
    load_config_with_secrets,
    masked_dump,
    parse_config,
)
from detector.errors import ConfigError, DetectorError

FULL = """
streams:
  web:
    input: {kind: file, path: data/web.csv, format: csv}
    mapping:
      entity: [region, host]
      timestamp: ts
      timestamp_format: iso
      features:
        - {name: cpu, field: metrics.cpu}
        - {name: mem, default: 0.5}
      out_of_order: accept
    window: {size: 16, stride: 2}
    normalization: {method: standard, per_entity: true, min_scale: 0.001}
    model: {cell: gru, hidden_size: 8, num_layers: 2, dropout: 0.1, latent_size: 4, attention: true}
    training: {epochs: 3, batch_size: 16, learning_rate: 0.01, validation_split: 0.25, seed: 3, stride: 2}
    thresholds:
      warning: {rule: dynamic, method: rolling, k: 3, window: 50, warmup: 10}
      critical: {rule: static, value: 9.5}
    alerts: {n: 2, m: 4, cooldown_s: 60, resolve_after: 3, top_features: 1}
    checkpoint: models/web.pt
  orders:
    input: {kind: kafka, topic: orders}
    mapping: {entity: shop, features: [amount, latency]}
    thresholds:
      warning: {rule: quantile, q: 0.99}
      critical: {rule: quantile, q: 0.99, factor: 2}
scoring: {threads: 2, batch_windows: 256}
"""


def base() -> dict[str, Any]:
    """A minimal valid config as data, for tests that break one thing at a time."""
    return {
        "streams": {
            "web": {
                "input": {"kind": "kafka", "topic": "metrics"},
                "mapping": {"entity": "host", "features": ["cpu", "mem"]},
            }
        }
    }


def problems_of(data: Any) -> list[str]:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.problems


def only_problem(data: Any) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def write(tmp_path: Path, text: str, name: str = "detector.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- valid configs ---------------------------------------------------------------------


def test_full_config_loads_every_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert list(config.streams) == ["web", "orders"]
    web = config.streams["web"]
    assert isinstance(web.input, FileInput)
    assert web.input.format == "csv"
    assert web.mapping.entity == ["region", "host"]
    assert web.mapping.timestamp == "ts"
    assert web.mapping.timestamp_format == "iso"
    assert web.mapping.feature_names == ["cpu", "mem"]
    assert web.mapping.features[0].path == "metrics.cpu"
    assert web.mapping.features[1].path == "mem"
    assert web.mapping.features[1].default == 0.5
    assert web.mapping.out_of_order == "accept"
    assert (web.window.size, web.window.stride) == (16, 2)
    assert web.normalization.method == "standard"
    assert web.normalization.per_entity is True
    assert web.model.cell == "gru"
    assert web.model.attention is True
    assert (web.model.hidden_size, web.model.latent_size, web.model.num_layers) == (8, 4, 2)
    assert web.training.epochs == 3
    assert web.training.stride == 2
    assert isinstance(web.thresholds.warning, DynamicRule)
    assert web.thresholds.warning.method == "rolling"
    assert isinstance(web.thresholds.critical, StaticRule)
    assert web.thresholds.critical.value == 9.5
    assert (web.alerts.n, web.alerts.m, web.alerts.resolve_windows) == (2, 4, 3)

    orders = config.streams["orders"]
    assert isinstance(orders.input, KafkaInput)
    assert orders.input.topic == "orders"
    assert orders.mapping.entity == ["shop"]
    assert isinstance(orders.thresholds.critical, QuantileRule)
    assert orders.thresholds.critical.factor == 2.0
    assert config.scoring.threads == 2
    assert config.scoring.batch_windows == 256


def test_defaults_fill_a_minimal_stream() -> None:
    config, secrets = parse_config(yaml.safe_dump(base()))
    stream = config.streams["web"]
    assert secrets == set()
    assert stream.mapping.timestamp == "timestamp"
    assert stream.window.size == 64
    assert isinstance(stream.thresholds.warning, QuantileRule)
    assert stream.thresholds.warning.q == 0.995
    assert stream.thresholds.critical is None
    assert stream.alerts.resolve_windows == stream.alerts.m
    assert stream.checkpoint is None
    assert config.scoring.threads is None


def test_dynamic_rule_defaults_are_the_system_metrics_warning_rule() -> None:
    # "Defaults are what wins": a bare `{rule: dynamic}` is the warning rule NAB chose.
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "system-metrics.yaml")
    warning = shipped.streams["metrics"].thresholds.warning
    assert isinstance(warning, DynamicRule)
    assert DynamicRule(rule="dynamic") == warning


@pytest.mark.parametrize(
    ("getter", "attr", "value"),
    [
        (lambda c: c, "scoring", None),
        (lambda c: c.streams["web"], "window", None),
        (lambda c: c.streams["web"].window, "size", 3),
        (lambda c: c.streams["web"].mapping, "features", []),
        (lambda c: c.streams["web"].mapping.features[0], "name", "x"),
        (lambda c: c.streams["web"].thresholds.warning, "k", 0.5),
        (lambda c: c.streams["web"].input, "path", Path("x")),
        (lambda c: c.streams["web"].alerts, "n", 1),
        (lambda c: c.scoring, "threads", 1),
    ],
)
def test_models_are_frozen(tmp_path: Path, getter: Any, attr: str, value: Any) -> None:
    config = load_config(write(tmp_path, FULL))
    target = getter(config)
    before = getattr(target, attr)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(target, attr, value)
    assert getattr(target, attr) == before


def test_feature_shorthand_and_entity_string() -> None:
    data = base()
    data["streams"]["web"]["mapping"] = {
        "entity": "host",
        "features": ["cpu", {"name": "disk", "field": "io.disk", "default": 0}, "mem"],
    }
    config, _ = parse_config(yaml.safe_dump(data))
    mapping = config.streams["web"].mapping
    assert mapping.entity == ["host"]
    assert mapping.feature_names == ["cpu", "disk", "mem"]
    assert [f.path for f in mapping.features] == ["cpu", "io.disk", "mem"]
    assert [f.default for f in mapping.features] == [None, 0.0, None]


def test_entity_absent_means_no_entity_fields() -> None:
    data = base()
    del data["streams"]["web"]["mapping"]["entity"]
    config, _ = parse_config(yaml.safe_dump(data))
    assert config.streams["web"].mapping.entity == []


def test_timestamp_null_means_no_timestamp_field() -> None:
    data = base()
    data["streams"]["web"]["mapping"]["timestamp"] = None
    config, _ = parse_config(yaml.safe_dump(data))
    assert config.streams["web"].mapping.timestamp is None


# --- problems, each with its YAML path, all at once ---------------------------------


def test_every_problem_is_reported_at_once() -> None:
    text = """
streams:
  web:
    input: {kind: nope, topic: x}
    mapping: {features: [cpu, {name: ""}, cpu]}
    window: {size: 1}
    thresholds:
      warning: {rule: quantile, q: 2}
      critical: {rule: bogus}
    alerts: {n: 5, m: 3}
    colour: blue
  api:
    input: {kind: kafka, topic: api}
scoring: {threads: 0}
"""
    problems = problems_of(text)
    paths = sorted(p.split(": ", 1)[0] for p in problems)
    assert paths == sorted(
        [
            "streams.web.input.kind",
            "streams.web.mapping.features[1].name",
            "streams.web.window.size",
            "streams.web.thresholds.warning.q",
            "streams.web.thresholds.critical.rule",
            "streams.web.alerts",
            "streams.web.colour",
            "streams.api.mapping",
            "scoring.threads",
        ]
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="conf.yaml")
    message = str(info.value)
    assert message.startswith("invalid config conf.yaml: 9 problem(s)")
    assert all(f"  - {p}" in message for p in problems)
    assert isinstance(info.value, DetectorError)


def test_window_size_path_and_message() -> None:
    data = base()
    data["streams"]["web"]["window"] = {"size": 1}
    assert only_problem(data) == "streams.web.window.size: Input should be greater than or equal to 2"


def test_regime_after_must_be_positive() -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {"warning": {"rule": "dynamic", "regime_after": 0}}
    assert only_problem(data) == (
        "streams.web.thresholds.warning.regime_after: Input should be greater than or equal to 1"
    )


def test_missing_required_key() -> None:
    data = base()
    del data["streams"]["web"]["mapping"]
    assert only_problem(data) == "streams.web.mapping: Field required"


def test_missing_key_inside_a_union_member_has_no_tag_in_path() -> None:
    data = base()
    data["streams"]["web"]["input"] = {"kind": "file"}
    assert only_problem(data) == "streams.web.input.path: Field required"


def test_list_index_in_path() -> None:
    data = base()
    data["streams"]["web"]["mapping"]["features"] = ["cpu", {"name": "mem", "default": "lots"}]
    problem = only_problem(data)
    assert problem.startswith("streams.web.mapping.features[1].default: ")
    assert "number" in problem


def test_empty_feature_list() -> None:
    data = base()
    data["streams"]["web"]["mapping"]["features"] = []
    assert only_problem(data).startswith("streams.web.mapping.features: ")


def test_a_pot_risk_outside_the_fitted_tail_is_refused_at_its_path() -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {"warning": {"rule": "pot", "q": 0.05, "level": 0.98}}
    problem = only_problem(data)
    assert problem.startswith("streams.web.thresholds.warning: "), problem
    assert "q 0.05 must be below 1 - level (0.02)" in problem


@pytest.mark.parametrize(
    ("where", "value", "path", "tag"),
    [
        (("thresholds",), {"warning": {"rule": "median"}}, "streams.web.thresholds.warning.rule", "'median'"),
        (("thresholds",), {"warning": {"q": 0.9}}, "streams.web.thresholds.warning.rule", "'rule'"),
        (("input",), {"kind": "rabbitmq", "topic": "x"}, "streams.web.input.kind", "'rabbitmq'"),
        (("input",), {"topic": "x"}, "streams.web.input.kind", "'kind'"),
    ],
)
def test_bad_or_missing_union_tag_points_at_the_tag(where: tuple[str, ...], value: Any, path: str, tag: str) -> None:
    data = base()
    data["streams"]["web"][where[0]] = value
    problem = only_problem(data)
    assert problem.startswith(f"{path}: "), problem
    assert tag in problem


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("thresholds", {"warning": {"rule": "quantile", "q": 1.5}}, "streams.web.thresholds.warning.q"),
        ("thresholds", {"warning": {"rule": "static", "value": -1}}, "streams.web.thresholds.warning.value"),
        (
            "thresholds",
            {"warning": {"rule": "static", "value": 1}, "critical": {"rule": "dynamic", "k": 0}},
            "streams.web.thresholds.critical.k",
        ),
        ("input", {"kind": "kafka", "topic": ""}, "streams.web.input.topic"),
        ("input", {"kind": "file", "path": "x.csv", "format": "xml"}, "streams.web.input.format"),
        ("input", {"kind": "kafka", "topic": "t", "path": "x"}, "streams.web.input.path"),
    ],
)
def test_union_member_paths_have_no_tag(section: str, value: Any, path: str) -> None:
    data = base()
    data["streams"]["web"][section] = value
    problem = only_problem(data)
    assert problem.startswith(f"{path}: "), problem
    for tag in ("quantile", "static", "dynamic", "kafka", "file"):
        assert f".{tag}." not in problem.split(": ", 1)[0]


def test_a_dynamic_critical_with_a_lower_min_ratio_than_its_warning_is_refused() -> None:
    data = base()
    rule = {"rule": "dynamic", "k": 4.0, "min_ratio": 1.5}
    data["streams"]["web"]["thresholds"] = {"warning": rule, "critical": {**rule, "k": 8.0, "min_ratio": 1.2}}
    assert "critical min_ratio 1.2 must be at least the warning min_ratio 1.5" in only_problem(data)
    data["streams"]["web"]["thresholds"]["critical"]["min_ratio"] = 2.0
    Config.model_validate(data)


def test_cooldown_breakout_must_exceed_one() -> None:
    data = base()
    data["streams"]["web"]["alerts"] = {"cooldown_breakout": 1}
    assert only_problem(data).startswith("streams.web.alerts.cooldown_breakout: Input should be greater than 1")


def test_n_greater_than_m() -> None:
    data = base()
    data["streams"]["web"]["alerts"] = {"n": 4, "m": 3}
    assert only_problem(data) == "streams.web.alerts: Value error, n (4) must be <= m (3)"


@pytest.mark.parametrize(
    ("warning", "critical", "message"),
    [
        (
            {"rule": "static", "value": 5},
            {"rule": "static", "value": 1},
            "critical value 1 must be above the warning value 5",
        ),
        (
            {"rule": "static", "value": 2},
            {"rule": "static", "value": 2},
            "critical value 2 must be above the warning value 2",
        ),
        (
            {"rule": "quantile", "q": 0.99},
            {"rule": "quantile", "q": 0.9},
            "critical (q 0.9, factor 1) is never above warning (q 0.99, factor 1)",
        ),
        (
            {"rule": "quantile", "q": 0.99, "factor": 2},
            {"rule": "quantile", "q": 0.99, "factor": 1.5},
            "critical (q 0.99, factor 1.5) is never above warning (q 0.99, factor 2)",
        ),
        (
            {"rule": "quantile", "q": 0.99, "factor": 2},
            {"rule": "quantile", "q": 0.99, "factor": 2},
            "is never above warning",
        ),
        (
            {"rule": "dynamic", "k": 4},
            {"rule": "dynamic", "k": 3},
            "critical k 3 must be above the warning k 4 (same ewma statistics)",
        ),
        (
            {"rule": "dynamic", "method": "rolling", "window": 50, "k": 3},
            {"rule": "dynamic", "method": "rolling", "window": 50, "k": 3},
            "critical k 3 must be above the warning k 3 (same rolling statistics)",
        ),
        (
            {"rule": "dynamic", "k": 4, "regime_after": 70},
            {"rule": "dynamic", "k": 4, "regime_after": 70},
            "critical k 4 must be above the warning k 4 (same ewma statistics)",
        ),
        ({"rule": "sigma", "k": 8}, {"rule": "sigma", "k": 6}, "critical k 6 must be above the warning k 8"),
        ({"rule": "pot", "q": 1e-4}, {"rule": "pot", "q": 1e-3}, "critical q 0.001 must be below the warning q 0.0001"),
        ({"rule": "pot", "q": 1e-4}, {"rule": "pot", "q": 1e-4}, "critical q 0.0001 must be below the warning q"),
    ],
)
def test_critical_never_above_warning_is_refused(warning: Any, critical: Any, message: str) -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {"warning": warning, "critical": critical}
    problem = only_problem(data)
    assert problem.startswith("streams.web.thresholds.critical: "), problem
    assert message in problem


@pytest.mark.parametrize(
    ("warning", "critical"),
    [
        # q * factor would call these "below"; they are not: a higher factor on a lower quantile.
        ({"rule": "quantile", "q": 0.999}, {"rule": "quantile", "q": 0.99, "factor": 1.005}),
        ({"rule": "quantile", "q": 0.99, "factor": 2}, {"rule": "quantile", "q": 0.999, "factor": 1.5}),
        ({"rule": "quantile", "q": 0.99}, {"rule": "quantile", "q": 0.999}),
        ({"rule": "static", "value": 1}, {"rule": "static", "value": 1.5}),
        ({"rule": "dynamic", "k": 3}, {"rule": "dynamic", "k": 5}),
        ({"rule": "sigma", "k": 8}, {"rule": "sigma", "k": 12}),
        ({"rule": "pot", "q": 1e-3}, {"rule": "pot", "q": 1e-4}),
        # Tails fitted from different quantiles: q alone does not order them.
        ({"rule": "pot", "q": 1e-4}, {"rule": "pot", "q": 1e-3, "level": 0.9}),
        # A dynamic rule's population threshold is sigma's, but its own statistics may be lower.
        ({"rule": "sigma", "k": 8}, {"rule": "dynamic", "k": 4}),
        # Different statistics: k alone does not order them.
        ({"rule": "dynamic", "k": 4}, {"rule": "dynamic", "k": 3, "alpha": 0.1}),
        ({"rule": "dynamic", "k": 4}, {"rule": "dynamic", "k": 3, "warmup": 10}),
        ({"rule": "dynamic", "k": 4}, {"rule": "dynamic", "k": 3, "regime_after": 50}),
        ({"rule": "dynamic", "k": 4, "method": "rolling"}, {"rule": "dynamic", "k": 3}),
        # Mixed kinds are allowed: which is higher depends on the trained model's errors.
        ({"rule": "quantile", "q": 0.99}, {"rule": "static", "value": 0.001}),
        ({"rule": "static", "value": 5}, {"rule": "quantile", "q": 0.5}),
        ({"rule": "dynamic", "k": 4}, {"rule": "static", "value": 0.1}),
    ],
)
def test_critical_that_may_be_above_warning_is_allowed(warning: Any, critical: Any) -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {"warning": warning, "critical": critical}
    config, _ = parse_config(yaml.safe_dump(data))
    assert config.streams["web"].thresholds.critical is not None


def test_critical_is_checked_against_the_default_warning() -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {"critical": {"rule": "quantile", "q": 0.99}}
    assert "warning (q 0.995, factor 1)" in only_problem(data)


def test_invalid_warning_gives_no_second_problem_about_critical() -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {
        "warning": {"rule": "quantile", "q": 2},
        "critical": {"rule": "quantile", "q": 0.5},
    }
    assert only_problem(data).startswith("streams.web.thresholds.warning.q: ")


def test_duplicate_feature_names() -> None:
    data = base()
    data["streams"]["web"]["mapping"]["features"] = ["cpu", "mem", {"name": "cpu", "field": "x"}, "mem", "io"]
    problem = only_problem(data)
    assert problem.startswith("streams.web.mapping.features: ")
    assert "duplicate feature names: cpu, mem" in problem


@pytest.mark.parametrize("name", ["bad name", "web/1", "ünï", ""])
def test_bad_stream_name(name: str) -> None:
    data = base()
    data["streams"] = {name: data["streams"]["web"]}
    problem = only_problem(data)
    assert problem.startswith(f"streams.{name}: "), problem
    assert "[key]" not in problem
    assert "pattern" in problem


def test_non_string_stream_name_is_not_shown_as_a_list_index() -> None:
    problem = only_problem("streams:\n  1:\n    input: {kind: kafka, topic: t}\n    mapping: {features: [a]}\n")
    assert problem.startswith("streams.1: "), problem


def test_no_streams() -> None:
    assert only_problem({"streams": {}}).startswith("streams: ")
    assert only_problem({"scoring": {}}) == "streams: Field required"


@pytest.mark.parametrize(
    ("where", "path"),
    [
        ((), "colour"),
        (("streams", "web"), "streams.web.colour"),
        (("streams", "web", "mapping"), "streams.web.mapping.colour"),
        (("streams", "web", "input"), "streams.web.input.colour"),
    ],
)
def test_unknown_keys_are_rejected(where: tuple[str, ...], path: str) -> None:
    data = base()
    node = data
    for key in where:
        node = node[key]
    node["colour"] = "blue"
    assert only_problem(data) == f"{path}: Extra inputs are not permitted"


def test_unknown_key_in_threshold_rule() -> None:
    data = base()
    data["streams"]["web"]["thresholds"] = {"warning": {"rule": "quantile", "q": 0.9, "qq": 1}}
    assert only_problem(data) == "streams.web.thresholds.warning.qq: Extra inputs are not permitted"


def test_invalid_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("streams: [unclosed\n", source="x.yaml")
    assert info.value.source == "x.yaml"
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("not valid YAML: ")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_root_must_be_a_mapping(text: str) -> None:
    assert only_problem(text) == "<root>: expected a mapping with a `streams` key"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0].startswith("cannot read: ")


def test_binary_file_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"streams:\n  \xff\xfe\x00:\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not UTF-8" in info.value.problems[0]


# --- environment interpolation and masking -----------------------------------------


def test_env_interpolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOPIC", "prod-metrics")
    monkeypatch.setenv("WINDOW", "12")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    text = """
streams:
  web:
    input: {kind: kafka, topic: "${TOPIC}"}
    mapping: {features: ["${UNSET_VAR:-cpu}", "x_${TOPIC}_y"]}
    window: {size: "${WINDOW}"}
    alerts: {n: "${UNSET_VAR:-2}"}
"""
    config, secrets = load_config_with_secrets(write(tmp_path, text))
    stream = config.streams["web"]
    assert isinstance(stream.input, KafkaInput)
    assert stream.input.topic == "prod-metrics"
    assert stream.window.size == 12
    assert stream.alerts.n == 2
    assert stream.mapping.feature_names == ["cpu", "x_prod-metrics_y"]
    assert secrets == {
        "streams.web.input.topic",
        "streams.web.mapping.features[0]",
        "streams.web.mapping.features[1]",
        "streams.web.window.size",
        "streams.web.alerts.n",
    }


def test_empty_default_and_set_but_empty_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    data = base()
    data["streams"]["web"]["input"]["topic"] = "a${UNSET_VAR:-}b${EMPTY}c"
    config, _ = parse_config(yaml.safe_dump(data))
    assert config.streams["web"].input.topic == "abc"  # type: ignore[union-attr]


def test_env_value_is_not_interpolated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTER", "${INNER}")
    monkeypatch.setenv("INNER", "nope")
    data = base()
    data["streams"]["web"]["input"]["topic"] = "${OUTER}"
    config, _ = parse_config(yaml.safe_dump(data))
    assert config.streams["web"].input.topic == "${INNER}"  # type: ignore[union-attr]


def test_missing_env_var_names_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOPIC", raising=False)
    monkeypatch.delenv("NO_SUCH_FEATURE", raising=False)
    data = base()
    data["streams"]["web"]["input"]["topic"] = "${NO_SUCH_TOPIC}"
    data["streams"]["web"]["mapping"]["features"] = ["cpu", "${NO_SUCH_FEATURE}"]
    problems = problems_of(data)
    assert "streams.web.input.topic: environment variable NO_SUCH_TOPIC is not set" in problems
    assert "streams.web.mapping.features[1]: environment variable NO_SUCH_FEATURE is not set" in problems


def test_masked_dump_hides_interpolated_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SECRET_TOPIC", "hunter2-topic")
    monkeypatch.setenv("SECRET_PATH", "secret-dir/data.csv")
    text = """
streams:
  web.v1:
    input: {kind: kafka, topic: "${SECRET_TOPIC}"}
    mapping: {features: [cpu]}
  files:
    input: {kind: file, path: "${SECRET_PATH}"}
    mapping: {features: [cpu, {name: mem, field: "${SECRET_TOPIC}.mem"}]}
"""
    config, secrets = load_config_with_secrets(write(tmp_path, text))
    dumped = masked_dump(config, secrets)
    assert "hunter2" not in dumped
    assert "secret-dir" not in dumped
    shown = yaml.safe_load(dumped)
    assert shown["streams"]["web.v1"]["input"]["topic"] == "***"
    assert shown["streams"]["files"]["input"]["path"] == "***"
    assert shown["streams"]["files"]["mapping"]["features"][1]["field"] == "***"
    # Everything else is shown as the effective value.
    assert shown["streams"]["files"]["mapping"]["features"][0]["name"] == "cpu"
    assert shown["streams"]["web.v1"]["window"]["size"] == 64
    # Masking works on a copy: the config itself keeps the real values.
    assert config.streams["web.v1"].input.topic == "hunter2-topic"  # type: ignore[union-attr]


def test_masked_dump_without_secrets_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    dumped = masked_dump(config, set())
    assert "***" not in dumped
    again, _ = parse_config(dumped)
    assert again == config


# --- paths and the layout hash --------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    config = load_config(write(folder, FULL))
    web = config.streams["web"]
    assert isinstance(web.input, FileInput)
    assert web.input.path == folder / "data" / "web.csv"
    assert web.checkpoint == folder / "models" / "web.pt"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    data = base()
    data["streams"]["web"]["input"] = {"kind": "file", "path": "/data/in.csv"}
    data["streams"]["web"]["checkpoint"] = "/models/web.pt"
    config = load_config(write(tmp_path, yaml.safe_dump(data)))
    assert config.streams["web"].input.path == Path("/data/in.csv")  # type: ignore[union-attr]
    assert config.streams["web"].checkpoint == Path("/models/web.pt")


def test_parse_config_without_base_dir_keeps_relative_paths() -> None:
    config, _ = parse_config(FULL)
    assert config.streams["web"].checkpoint == Path("models/web.pt")


def stream_with(**changes: Any) -> Stream:
    data = base()
    stream = copy.deepcopy(data["streams"]["web"])
    for dotted, value in changes.items():
        node = stream
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    config, _ = parse_config(yaml.safe_dump({"streams": {"web": stream}}))
    return config.streams["web"]


def test_layout_hash_is_stable() -> None:
    assert stream_with().layout_hash() == stream_with().layout_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", stream_with().layout_hash())


@pytest.mark.parametrize(
    "change",
    [
        {"mapping__features": ["cpu", "mem", "io"]},
        {"mapping__features": ["mem", "cpu"]},
        {"window__size": 32},
        {"window__stride": 4},
        {"model__cell": "gru"},
        {"model__hidden_size": 8},
        {"model__latent_size": 2},
        {"normalization__method": "standard"},
        {"normalization__relative_min_scale": 0.01},
        {"time_of_day__use": "auto"},
        {"time_of_week__use": "auto"},
        {"time_of_week__use": "always"},
        {"model__ensemble": 3},
        {"model__ensemble": 3, "model__ensemble_score": "median"},
    ],
)
def test_layout_hash_changes_with_what_the_model_depends_on(change: dict[str, Any]) -> None:
    assert stream_with(**change).layout_hash() != stream_with().layout_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"thresholds__warning": {"rule": "static", "value": 3}},
        {"thresholds__critical": {"rule": "quantile", "q": 0.999}},
        {"alerts__n": 1},
        {"alerts__cooldown_s": 5},
        {"checkpoint": "other.pt"},
        {"input": {"kind": "kafka", "topic": "other"}},
        {"mapping__entity": ["region", "host"]},
    ],
)
def test_layout_hash_ignores_what_needs_no_retraining(change: dict[str, Any]) -> None:
    assert stream_with(**change).layout_hash() == stream_with().layout_hash()


# --- Config.stream -----------------------------------------------------------------------


def test_stream_lookup(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.stream("orders")[0] == "orders"
    with pytest.raises(ConfigError, match="several streams configured, pick one of: web, orders"):
        config.stream(None)
    with pytest.raises(ConfigError, match="no stream named 'nope'; configured: web, orders"):
        config.stream("nope")
    single, _ = parse_config(yaml.safe_dump(base()))
    name, stream = single.stream(None)
    assert name == "web"
    assert stream is single.streams["web"]


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(-5, 5000),
    n=st.one_of(st.integers(-2, 70), st.integers(MAX_ALERT_WINDOWS - 5, MAX_ALERT_WINDOWS + 5)),
    m=st.one_of(st.integers(-2, 70), st.integers(MAX_ALERT_WINDOWS - 5, MAX_ALERT_WINDOWS + 5)),
    q=st.floats(-1, 2, allow_nan=False),
)
def test_problems_match_the_invalid_fields(size: int, n: int, m: int, q: float) -> None:
    """Whatever mix of valid and invalid values, each bad field is named once, the rest never."""
    data = base()
    web = data["streams"]["web"]
    web["window"] = {"size": size}
    web["alerts"] = {"n": n, "m": m}
    web["thresholds"] = {"warning": {"rule": "quantile", "q": q}}
    expected = set()
    if not 2 <= size <= 4096:
        expected.add("streams.web.window.size")
    n_ok, m_ok = 1 <= n <= MAX_ALERT_WINDOWS, 1 <= m <= MAX_ALERT_WINDOWS
    if not n_ok:
        expected.add("streams.web.alerts.n")
    if not m_ok:
        expected.add("streams.web.alerts.m")
    if n_ok and m_ok and n > m:
        expected.add("streams.web.alerts")
    if not 0 < q < 1:
        expected.add("streams.web.thresholds.warning.q")
    text = yaml.safe_dump(data)
    if not expected:
        config, _ = parse_config(text)
        assert config.streams["web"].window.size == size
        return
    paths = [p.split(": ", 1)[0] for p in problems_of(text)]
    assert sorted(paths) == sorted(expected)


@settings(max_examples=50, deadline=None)
@given(
    value=st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=30
    )
)
def test_any_env_value_is_substituted_verbatim_and_masked(value: str) -> None:
    data = base()
    data["streams"]["web"]["input"]["topic"] = "${DETECTOR_TEST_TOPIC}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTOR_TEST_TOPIC", value)
        config, secrets = parse_config(yaml.safe_dump(data))
    assert config.streams["web"].input.topic == value  # type: ignore[union-attr]
    shown = yaml.safe_load(masked_dump(config, secrets))
    assert shown["streams"]["web"]["input"]["topic"] == "***"


def test_config_model_validate_directly_rejects_bad_types() -> None:
    with pytest.raises(pydantic.ValidationError):
        Config.model_validate({"streams": {"web": {"input": 5, "mapping": {"features": ["a"]}}}})


def test_score_last_steps_must_fit_the_window() -> None:
    data = base()
    data["streams"]["web"]["window"] = {"size": 8}
    data["streams"]["web"]["model"] = {"score_last_steps": 9}
    assert only_problem(data) == "streams.web: Value error, model.score_last_steps (9) must be <= window.size (8)"
    data["streams"]["web"]["model"] = {"score_last_steps": 8}
    parse_config(yaml.safe_dump(data))


def test_model_options_added_later_change_the_layout_only_when_set() -> None:
    # Unset, the hash must equal the one checkpoints trained before the options existed carry.
    stream = parse_config(yaml.safe_dump(base()))[0].streams["web"]
    model = stream.model.model_dump()
    del model["score_last_steps"], model["ensemble"], model["ensemble_score"]
    parts = {
        "features": stream.mapping.feature_names,
        "window": stream.window.model_dump(exclude={"idle_evict_after_s"}),  # added later, like score_last_steps
        "normalization": stream.normalization.model_dump(exclude={"relative_min_scale"}),  # added later too
        "model": model,
    }
    before = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    assert stream.layout_hash() == before
    data = base()
    for change in ({"score_last_steps": 1}, {"ensemble": 3}):
        data["streams"]["web"]["model"] = change
        assert parse_config(yaml.safe_dump(data))[0].streams["web"].layout_hash() != before
    # One model has nothing to combine: the ensemble score does not touch its layout.
    data["streams"]["web"]["model"] = {"ensemble_score": "median"}
    assert parse_config(yaml.safe_dump(data))[0].streams["web"].layout_hash() == before


def test_an_ensemble_combined_by_the_median_keeps_the_hash_of_ensembles_from_before_the_option() -> None:
    # Ensembles were median-combined before `ensemble_score` existed: their checkpoints stay
    # valid for a median config, and a mean config (the default) must retrain them.
    median = stream_with(model__ensemble=3, model__ensemble_score="median")
    model = median.model.model_dump()
    del model["score_last_steps"], model["ensemble_score"]
    parts = {
        "features": median.mapping.feature_names,
        "window": median.window.model_dump(exclude={"idle_evict_after_s"}),
        "normalization": median.normalization.model_dump(exclude={"relative_min_scale"}),
        "model": model,
    }
    before = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    assert median.layout_hash() == before
    assert stream_with(model__ensemble=3).layout_hash() != before


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"use": "sometimes"}, "streams.web.time_of_day.use: Input should be 'auto', 'always' or 'never'"),
        ({"min_autocorrelation": 1.5}, "streams.web.time_of_day.min_autocorrelation: Input should be less than"),
        ({"min_days": 0.5}, "streams.web.time_of_day.min_days: Input should be greater than or equal to 1"),
        ({"days": 2}, "streams.web.time_of_day.days: Extra inputs are not permitted"),
    ],
)
def test_time_of_day_errors_name_the_yaml_path(section: dict[str, Any], problem: str) -> None:
    data = base()
    data["streams"]["web"]["time_of_day"] = section
    assert only_problem(data).startswith(problem)


def test_ensemble_errors_name_the_yaml_path() -> None:
    data = base()
    data["streams"]["web"]["model"] = {"ensemble": 2, "ensemble_score": "median"}
    assert only_problem(data).startswith(
        "streams.web.model: Value error, ensemble must be odd with ensemble_score median (got 2)"
    )
    data["streams"]["web"]["model"] = {"ensemble": 2}
    assert parse_config(yaml.safe_dump(data))[0].streams["web"].model.ensemble == 2  # a mean of two is fine
    data["streams"]["web"]["model"] = {"ensemble": 3, "ensemble_score": "max"}
    assert only_problem(data).startswith("streams.web.model.ensemble_score: Input should be 'mean' or 'median'")
    data["streams"]["web"]["model"] = {"ensemble": 3}
    data["streams"]["web"]["retraining"] = {"enabled": True}
    assert "retraining.enabled fine-tunes one model; model.ensemble is 3" in only_problem(data)
    assert stream_with(model__ensemble=1).layout_hash() == stream_with().layout_hash()


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"use": "weekends"}, "streams.web.time_of_week.use: Input should be 'auto', 'always' or 'never'"),
        ({"min_gain": 0}, "streams.web.time_of_week.min_gain: Input should be greater than 0"),
        ({"min_gain": 1.5}, "streams.web.time_of_week.min_gain: Input should be less than or equal to 1"),
        ({"min_weeks": 1}, "streams.web.time_of_week.min_weeks: Input should be greater than or equal to 2"),
        ({"min_days": 14}, "streams.web.time_of_week.min_days: Extra inputs are not permitted"),
    ],
)
def test_time_of_week_errors_name_the_yaml_path(section: dict[str, Any], problem: str) -> None:
    data = base()
    data["streams"]["web"]["time_of_week"] = section
    assert only_problem(data).startswith(problem)


def test_a_bearer_token_variable_that_is_not_set_names_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_ALERT_TOKEN", raising=False)
    data = base()
    data["sinks"] = {
        "webhooks": [{"url": "http://hook"}, {"url": "http://hook", "bearer_token_env": "NO_SUCH_ALERT_TOKEN"}],
        "alertmanager": [{"url": "http://am", "bearer_token_env": "NO_SUCH_ALERT_TOKEN"}],
    }
    problems = problems_of(data)
    assert len(problems) == 2, problems
    assert problems[0].startswith("sinks.alertmanager[0].bearer_token_env: ")
    assert problems[1].startswith("sinks.webhooks[1].bearer_token_env: ")
    assert all("environment variable NO_SUCH_ALERT_TOKEN is not set" in p for p in problems)


def test_a_bearer_token_is_a_variable_name_not_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_TOKEN", "s3cr3t")
    data = base()
    data["sinks"] = {"webhooks": [{"url": "http://hook", "bearer_token_env": "Bearer s3cr3t"}]}
    assert only_problem(data).startswith("sinks.webhooks[0].bearer_token_env: String should match pattern")
    data["sinks"] = {
        "webhooks": [{"url": "http://hook", "bearer_token_env": "ALERT_TOKEN", "headers": {"authorization": "x"}}]
    }
    assert "either `bearer_token_env` or an Authorization header" in only_problem(data)
    data["sinks"] = {"webhooks": [{"url": "http://hook", "bearer_token_env": "ALERT_TOKEN"}]}
    config, _ = parse_config(yaml.safe_dump(data))
    assert config.sinks.webhooks[0].bearer_token_env == "ALERT_TOKEN"
    assert "s3cr3t" not in masked_dump(config, set())


def test_check_config_never_shows_a_bearer_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector.cli import EXIT_OK, EXIT_USAGE, main

    data = base()
    data["sinks"] = {"alertmanager": [{"url": "http://am", "bearer_token_env": "ALERT_TOKEN"}]}
    path = tmp_path / "sinks.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("ALERT_TOKEN", raising=False)
    assert main(["check-config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "sinks.alertmanager[0].bearer_token_env" in err and "ALERT_TOKEN is not set" in err
    monkeypatch.setenv("ALERT_TOKEN", "s3cr3t-t0ken")
    assert main(["check-config", "--show", str(path)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "s3cr3t" not in captured.out + captured.err
    assert yaml.safe_load(captured.out)["sinks"]["alertmanager"][0]["bearer_token_env"] == "ALERT_TOKEN"
