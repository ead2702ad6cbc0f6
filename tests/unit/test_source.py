"""Record decoding (every rejection reason), timestamps, and reading CSV/JSONL files."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.config import Mapping
from detector.errors import DetectorError, InputError
from detector.source import (
    REJECT_REASONS,
    BatchBuilder,
    RecordDecoder,
    Rejection,
    SampleBatch,
    detect_format,
    format_timestamp,
    format_timestamps,
    parse_timestamp,
    read_file,
)

FLOAT32_MAX = float(np.finfo(np.float32).max)
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z in milliseconds
T0_ISO = "2023-11-14T22:13:20Z"


def decoder(**mapping: Any) -> RecordDecoder:
    spec = {"entity": "host", "timestamp": "ts", "features": ["cpu", "mem"]} | mapping
    return RecordDecoder(Mapping.model_validate(spec), default_entity="stream")


def decoded(result: tuple[str, int, list[float]] | Rejection) -> tuple[str, int, list[float]]:
    assert not isinstance(result, Rejection), result
    return result


def rejected(result: tuple[str, int, list[float]] | Rejection, reason: str, position: int = 7) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    assert result.position == position
    assert result.detail
    return result


# --- good records ----------------------------------------------------------------------


def test_plain_record() -> None:
    entity, ts, values = decoded(decoder().decode({"host": "a", "ts": T0_ISO, "cpu": 0.5, "mem": 3}, 7, 0))
    assert entity == "a"
    assert ts == T0
    assert values == [0.5, 3.0]
    assert all(type(v) is float for v in values)


def test_nested_dotted_paths() -> None:
    dec = decoder(
        entity=["meta.host.name"],
        timestamp="meta.time",
        features=[{"name": "cpu", "field": "metrics.cpu.user"}, {"name": "mem", "field": "metrics.mem"}],
    )
    record = {"meta": {"host": {"name": "h1"}, "time": T0}, "metrics": {"cpu": {"user": 12.5}, "mem": 7}}
    assert decoded(dec.decode(record, 1, 0)) == ("h1", T0, [12.5, 7.0])


def test_literal_dotted_key_wins_over_nesting() -> None:
    dec = decoder(features=[{"name": "cpu", "field": "cpu.user"}], entity=[])
    both = {"ts": T0, "cpu.user": 1.0, "cpu": {"user": 2.0}}
    assert decoded(dec.decode(both, 1, 0))[2] == [1.0]
    nested_only = {"ts": T0, "cpu": {"user": 2.0}}
    assert decoded(dec.decode(nested_only, 1, 0))[2] == [2.0]


def test_path_through_a_non_object_is_missing() -> None:
    dec = decoder(features=[{"name": "cpu", "field": "cpu.user"}], entity=[])
    rejected(dec.decode({"ts": T0, "cpu": 5}, 7, 0), "missing_field")
    rejected(dec.decode({"ts": T0, "cpu": [1, 2]}, 7, 0), "missing_field")


def test_entity_composed_of_several_fields() -> None:
    dec = decoder(entity=["region", "host", "meta.rack"])
    record = {"region": "eu", "host": "web1", "meta": {"rack": 4}, "ts": T0, "cpu": 1, "mem": 2}
    assert decoded(dec.decode(record, 1, 0))[0] == "eu/web1/4"


@pytest.mark.parametrize(("value", "expected"), [(17, "17"), (0, "0"), (-3, "-3"), ("0", "0")])
def test_integer_entity(value: Any, expected: str) -> None:
    assert decoded(decoder().decode({"host": value, "ts": T0, "cpu": 1, "mem": 2}, 1, 0))[0] == expected


def test_no_entity_fields_uses_the_default_entity() -> None:
    dec = decoder(entity=[])
    assert decoded(dec.decode({"ts": T0, "cpu": 1, "mem": 2}, 1, 0))[0] == "stream"


def test_no_timestamp_field_uses_the_fallback() -> None:
    dec = decoder(timestamp=None)
    assert decoded(dec.decode({"host": "a", "cpu": 1, "mem": 2, "ts": "garbage"}, 3, 12345))[1] == 12345


def test_defaults_fill_missing_features() -> None:
    dec = decoder(features=["cpu", {"name": "mem", "default": -1.5}, {"name": "io", "default": 0}])
    for missing in ({}, {"mem": None}, {"mem": ""}, {"mem": "  "}):
        record = {"host": "a", "ts": T0, "cpu": 1} | missing
        assert decoded(dec.decode(record, 1, 0))[2] == [1.0, -1.5, 0.0], missing


@pytest.mark.parametrize("nan", [float("nan"), "nan", "NaN", " nan "])
def test_nan_is_missing_so_the_default_applies(nan: Any) -> None:
    dec = decoder(features=["cpu", {"name": "mem", "default": 9.0}])
    assert decoded(dec.decode({"host": "a", "ts": T0, "cpu": 1, "mem": nan}, 1, 0))[2] == [1.0, 9.0]


@pytest.mark.parametrize("nan", [float("nan"), "nan"])
def test_nan_without_default_is_non_finite(nan: Any) -> None:
    rejected(decoder().decode({"host": "a", "ts": T0, "cpu": 1, "mem": nan}, 7, 0), "non_finite")


def test_numeric_strings_are_numbers() -> None:
    # CSV cells are always strings; a JSON string holding a number is accepted the same way.
    record = {"host": "a", "ts": str(T0), "cpu": " 1.25 ", "mem": "-3e2"}
    assert decoded(decoder().decode(record, 1, 0)) == ("a", T0, [1.25, -300.0])


def test_float32_limits_are_accepted() -> None:
    record = {"host": "a", "ts": T0, "cpu": FLOAT32_MAX, "mem": -FLOAT32_MAX}
    values = decoded(decoder().decode(record, 1, 0))[2]
    assert np.isfinite(np.asarray(values, np.float32)).all()


# --- rejections -------------------------------------------------------------------------


def test_invalid_json() -> None:
    dec = decoder()
    rejected(dec.decode_bytes(b'{"host": "a", ', 7, 0), "invalid_json")
    rejected(dec.decode_bytes(b"\xff\xfe", 7, 0), "invalid_json")
    rejected(dec.decode_bytes(b'{"cpu": NaN}', 7, 0), "invalid_json")


@pytest.mark.parametrize("raw", [b"", b" ", b"\n", b"\t \r\n"])
def test_empty_message_is_empty_not_invalid_json(raw: bytes) -> None:
    # A Kafka tombstone (null value) arrives as b""; a blank JSONL line is `empty` too.
    rejected(decoder().decode_bytes(raw, 7, 0), "empty")


def test_decode_bytes_matches_decode() -> None:
    record = {"host": "a", "ts": T0_ISO, "cpu": 0.1, "mem": 2}
    dec = decoder()
    assert dec.decode_bytes(json.dumps(record).encode(), 1, 0) == dec.decode(record, 1, 0)


@pytest.mark.parametrize("raw", [b"[1, 2]", b"3", b'"text"', b"null", b"true"])
def test_not_an_object(raw: bytes) -> None:
    rejected(decoder().decode_bytes(raw, 7, 0), "not_an_object")


@pytest.mark.parametrize(
    "record",
    [
        {"ts": T0, "cpu": 1, "mem": 2},
        {"host": None, "ts": T0, "cpu": 1, "mem": 2},
        {"host": "", "ts": T0, "cpu": 1, "mem": 2},
        {"host": "a", "cpu": 1, "mem": 2},
        {"host": "a", "ts": None, "cpu": 1, "mem": 2},
        {"host": "a", "ts": "", "cpu": 1, "mem": 2},
        {"host": "a", "ts": T0, "cpu": 1},
        {"host": "a", "ts": T0, "cpu": 1, "mem": None},
        {"host": "a", "ts": T0, "cpu": "", "mem": 2},
    ],
)
def test_missing_field(record: dict[str, Any]) -> None:
    rejected(decoder().decode(record, 7, 0), "missing_field")


@pytest.mark.parametrize(
    "record",
    [
        {"host": "a", "ts": T0, "cpu": "high", "mem": 2},
        {"host": "a", "ts": T0, "cpu": "0x10", "mem": 2},
        {"host": "a", "ts": T0, "cpu": True, "mem": 2},
        {"host": "a", "ts": T0, "cpu": False, "mem": 2},
        {"host": "a", "ts": T0, "cpu": [1.0], "mem": 2},
        {"host": "a", "ts": T0, "cpu": {"v": 1.0}, "mem": 2},
        {"host": True, "ts": T0, "cpu": 1, "mem": 2},
        {"host": 1.5, "ts": T0, "cpu": 1, "mem": 2},
        {"host": ["a"], "ts": T0, "cpu": 1, "mem": 2},
        {"host": {"name": "a"}, "ts": T0, "cpu": 1, "mem": 2},
    ],
)
def test_wrong_type(record: dict[str, Any]) -> None:
    rejected(decoder().decode(record, 7, 0), "wrong_type")


def test_wrong_type_is_not_hidden_by_a_default() -> None:
    dec = decoder(features=["cpu", {"name": "mem", "default": 0}])
    rejected(dec.decode({"host": "a", "ts": T0, "cpu": 1, "mem": "n/a"}, 7, 0), "wrong_type")


@pytest.mark.parametrize(
    "value", [float("inf"), float("-inf"), "inf", "-Infinity", 1e39, -1e39, "1e39", 10**40, FLOAT32_MAX * 1.0001]
)
def test_non_finite(value: Any) -> None:
    rejected(decoder().decode({"host": "a", "ts": T0, "cpu": value, "mem": 2}, 7, 0), "non_finite")


def test_non_finite_from_json_overflow() -> None:
    rejected(decoder().decode_bytes(b'{"host": "a", "ts": 1, "cpu": 1e39, "mem": 2}', 7, 0), "non_finite")


def test_non_finite_default_does_not_rescue_infinity() -> None:
    dec = decoder(features=["cpu", {"name": "mem", "default": 0}])
    rejected(dec.decode({"host": "a", "ts": T0, "cpu": 1, "mem": float("inf")}, 7, 0), "non_finite")


@pytest.mark.parametrize(
    "ts", ["yesterday", "2024-13-01T00:00:00", True, [T0], {"t": T0}, float("inf"), "nan", 10**400]
)
def test_bad_timestamp(ts: Any) -> None:
    rejected(decoder().decode({"host": "a", "ts": ts, "cpu": 1, "mem": 2}, 7, 0), "bad_timestamp")


def test_bad_timestamp_for_the_configured_format() -> None:
    iso = decoder(timestamp_format="iso")
    rejected(iso.decode({"host": "a", "ts": T0, "cpu": 1, "mem": 2}, 7, 0), "bad_timestamp")
    unix = decoder(timestamp_format="unix_s")
    rejected(unix.decode({"host": "a", "ts": T0_ISO, "cpu": 1, "mem": 2}, 7, 0), "bad_timestamp")


def test_first_problem_wins_in_field_order() -> None:
    # Entity is checked before the timestamp, the timestamp before the features.
    dec = decoder()
    rejected(dec.decode({"ts": "bad", "cpu": "x"}, 7, 0), "missing_field")
    rejected(dec.decode({"host": "a", "ts": "bad", "cpu": "x"}, 7, 0), "bad_timestamp")


# --- future timestamps (mapping.max_future_s) ---------------------------------------------

NOW_S = T0 / 1000 + 3600.0  # the decoders' clock below: an hour after T0


def clocked(**mapping: Any) -> RecordDecoder:
    spec = {"entity": "host", "timestamp": "ts", "features": ["cpu"]} | mapping
    return RecordDecoder(Mapping.model_validate(spec), default_entity="stream", clock=lambda: NOW_S)


def test_future_limit_is_inclusive_and_measured_from_the_clock() -> None:
    dec = clocked(max_future_s=60)
    limit_ms = int(NOW_S * 1000) + 60_000
    assert decoded(dec.decode({"host": "a", "ts": limit_ms, "cpu": 1}, 7, 0))[1] == limit_ms
    message = rejected(dec.decode({"host": "a", "ts": limit_ms + 1, "cpu": 1}, 7, 0), "future_timestamp").detail
    assert str(limit_ms + 1) in message and "60 s ahead" in message
    rejected(dec.decode({"host": "a", "ts": "3000-01-01T00:00:00Z", "cpu": 1}, 7, 0), "future_timestamp")


def test_default_future_limit_is_a_day() -> None:
    dec = clocked()
    day_ms = int(NOW_S * 1000) + 86_400_000
    decoded(dec.decode({"host": "a", "ts": day_ms, "cpu": 1}, 7, 0))
    rejected(dec.decode({"host": "a", "ts": day_ms + 1, "cpu": 1}, 7, 0), "future_timestamp")


def test_null_future_limit_accepts_any_parseable_timestamp() -> None:
    far = 10**15  # the year 33658, in milliseconds
    assert decoded(clocked(max_future_s=None).decode({"host": "a", "ts": far, "cpu": 1}, 7, 0))[1] == far


def test_fallback_timestamps_are_not_checked_against_the_clock() -> None:
    # Without a timestamp field the row number or Kafka time stands in: not event data to police.
    dec = clocked(timestamp=None, max_future_s=1)
    assert decoded(dec.decode({"host": "a", "cpu": 1}, 7, 10**15))[1] == 10**15


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**15), 10**15), st.floats(0.001, 10**9))
def test_future_rejection_is_exactly_the_timestamps_past_the_limit(ts: int, limit_s: float) -> None:
    result = clocked(max_future_s=limit_s, timestamp_format="unix_ms").decode({"host": "a", "ts": ts, "cpu": 1}, 7, 0)
    if ts > NOW_S * 1000 + limit_s * 1000:
        rejected(result, "future_timestamp")
    else:
        assert decoded(result)[1] == ts


def test_a_far_future_sample_would_silence_its_entity_without_the_limit() -> None:
    """Why the limit exists: the window store drops every later sample of the entity."""
    from detector.window import Scaler, WindowStore

    times = [T0, 10**15, T0 + 60_000, T0 + 120_000]
    samples = SampleBatch(["a"] * 4, np.asarray(times, np.int64), np.ones((4, 1), np.float32), np.arange(4))
    store = WindowStore(2, 1, 1, Scaler(np.zeros(1, np.float32), np.ones(1, np.float32)))
    assert store.append(samples)[1].tolist() == [2, 3]
    dec = clocked(max_future_s=60)
    results = [dec.decode({"host": "a", "ts": t, "cpu": 1}, 0, 0) for t in times]
    assert [r.reason for r in results if isinstance(r, Rejection)] == ["future_timestamp"]


# --- timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14T22:13:20+00:00", T0),
        ("2023-11-14T22:13:20", T0),  # naive means UTC
        ("2023-11-14 22:13:20", T0),
        ("2023-11-15T00:13:20+02:00", T0),
        ("2023-11-14T17:13:20-05:00", T0),
        ("2023-11-14T22:13:20.123Z", T0 + 123),
        ("2023-11-14", T0 - (22 * 3600 + 13 * 60 + 20) * 1000),
        (1_700_000_000, T0),  # seconds
        (1_700_000_000.123, T0 + 123),
        (T0, T0),  # milliseconds
        (T0 + 0.4, T0),
        ("1700000000", T0),
        (" 1700000000123 ", T0 + 123),
        ("1.7e9", T0),
        (0, 0),
        (-86_400, -86_400_000),
    ],
)
def test_parse_timestamp_auto(value: Any, expected: int) -> None:
    assert parse_timestamp(value) == expected


def test_seconds_and_milliseconds_are_told_apart_at_1e11() -> None:
    assert parse_timestamp(99_999_999_999) == 99_999_999_999_000  # seconds (year 5138)
    assert parse_timestamp(100_000_000_000) == 100_000_000_000  # milliseconds (1973)
    assert parse_timestamp(-100_000_000_000) == -100_000_000_000


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (1_700_000_000, "unix_s", T0),
        (T0, "unix_s", T0 * 1000),
        (1_700_000_000, "unix_ms", 1_700_000_000),
        ("1700000000123", "unix_ms", T0 + 123),
        (T0_ISO, "iso", T0),
        (T0_ISO, "unix_ms", None),
        (T0_ISO, "unix_s", None),
        (1_700_000_000, "iso", None),
        ("1700000000", "iso", None),
    ],
)
def test_parse_timestamp_explicit_format(value: Any, fmt: Any, expected: int | None) -> None:
    assert parse_timestamp(value, fmt) == expected


@pytest.mark.parametrize(
    "value", [True, False, None, "", "abc", "nan", "inf", float("nan"), float("-inf"), [1], {}, 10**400, 1e300]
)
def test_parse_timestamp_rejects(value: Any) -> None:
    assert parse_timestamp(value) is None


def test_format_timestamp() -> None:
    assert format_timestamp(T0 + 7) == "2023-11-14T22:13:20.007Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(-1) == "1969-12-31T23:59:59.999Z"


MS_RANGE = st.integers(
    int(datetime(1, 1, 2, tzinfo=UTC).timestamp() * 1000), int(datetime(9999, 12, 30, tzinfo=UTC).timestamp() * 1000)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(MS_RANGE, max_size=20))
def test_format_timestamps_formats_each_as_format_timestamp(values: list[int]) -> None:
    # The daemon's scores file uses the vectorized form; replay and alerts the scalar one.
    assert format_timestamps(np.array(values, np.int64)) == [format_timestamp(v) for v in values]


@settings(max_examples=300, deadline=None)
@given(MS_RANGE)
def test_format_then_parse_round_trips(ms: int) -> None:
    text = format_timestamp(ms)
    assert len(text) == 24
    assert text.endswith("Z")
    assert parse_timestamp(text) == ms
    assert parse_timestamp(text, "iso") == ms


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**15), 10**15))
def test_unix_milliseconds_parse_exactly(ms: int) -> None:
    assert parse_timestamp(ms, "unix_ms") == ms
    assert parse_timestamp(str(ms), "unix_ms") == ms
    if abs(ms) >= 10**11:
        assert parse_timestamp(ms) == ms


# --- never raises ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**64), 10**39, 10**400, -(10**400)])
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "nan", "inf", "-1e39", "1e38", "3.5", " 42 ", T0_ISO, "2023-02-30", "1700000000"])
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)

# Mostly plausible values, so that records often get past the entity and timestamp checks
# and the later checks see arbitrary values too.
entities = st.sampled_from(["a", "b", 7]) | json_values
times = st.sampled_from([T0, T0_ISO, str(T0), 1_700_000_000.5, -(10**400), "1e400"]) | json_values
numbers = st.floats(-1e6, 1e6) | json_values
records = st.fixed_dictionaries(
    {},
    optional={
        "host": entities,
        "dc": entities,
        "ts": times,
        "cpu": numbers,
        "m": st.fixed_dictionaries({}, optional={"mem": numbers, "io": numbers}) | json_values,
        "m.io": numbers,
    },
)
MAPPINGS = [
    {"entity": ["host", "dc"], "timestamp": "ts", "features": ["cpu", {"name": "mem", "field": "m.mem"}]},
    {
        "entity": [],
        "timestamp": None,
        "features": [{"name": "cpu", "default": 0}, {"name": "io", "field": "m.io", "default": -1}],
    },
    {"entity": "host", "timestamp": "ts", "timestamp_format": "unix_ms", "features": ["cpu"]},
    {"entity": "dc", "timestamp": "ts", "timestamp_format": "iso", "features": [{"name": "x", "field": "m"}]},
]


def check_result(result: Any, dec: RecordDecoder, position: int) -> None:
    if isinstance(result, Rejection):
        assert result.reason in REJECT_REASONS
        assert result.reason != "out_of_order"  # only the window store decides that
        assert result.position == position
        assert isinstance(result.detail, str)
        assert result.detail
        return
    entity, ts, values = result
    assert isinstance(entity, str)
    assert entity
    assert isinstance(ts, int)
    assert not isinstance(ts, bool)
    assert len(values) == len(dec.mapping.features)
    for v in values:
        assert type(v) is float
        assert math.isfinite(v)
        assert -FLOAT32_MAX <= v <= FLOAT32_MAX
    assert np.isfinite(np.asarray(values, np.float32)).all()


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(MAPPINGS), json_values | records, st.integers(0, 10**6))
def test_decode_never_raises(mapping: dict[str, Any], record: Any, position: int) -> None:
    dec = RecordDecoder(Mapping.model_validate(mapping), default_entity="s")
    check_result(dec.decode(record, position, 5), dec, position)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(MAPPINGS),
    st.binary(max_size=64)
    | records.map(lambda r: json.dumps(r).encode())
    | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_decode_bytes_never_raises(mapping: dict[str, Any], raw: bytes) -> None:
    dec = RecordDecoder(Mapping.model_validate(mapping), default_entity="s")
    check_result(dec.decode_bytes(raw, 3, 5), dec, 3)


VALID = b'{"host": "a", "ts": 1700000000000, "cpu": 1.5, "mem": 2, "extra": [1, {"x": null}]}'


@st.composite
def damaged_records(draw: st.DrawFn) -> bytes:
    """A valid record cut short, or with bytes overwritten, inserted or deleted: such inputs get
    past the JSON parser far more often than random bytes do."""
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        edit = draw(st.sampled_from(["cut", "set", "insert", "delete"]))
        byte = draw(st.integers(0, 255) | st.sampled_from(list(b'{}[]",:.-e0 \\')))
        if edit == "cut":
            del raw[at:]
        elif edit == "set" and at < len(raw):
            raw[at] = byte
        elif edit == "insert":
            raw.insert(at, byte)
        elif at < len(raw):
            del raw[at]
    return bytes(raw)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([*MAPPINGS, {"entity": "host", "features": ["cpu", "mem"], "max_future_s": 1}]),
    damaged_records()
    | st.binary(min_size=0, max_size=4096)
    | st.sampled_from([b"", b" \n", b"\x00", b"\xef\xbb\xbf{}", VALID + b"\n", VALID * 2, b"{" * 5000]),
)
def test_any_bytes_decode_to_a_sample_or_a_rejection(mapping: dict[str, Any], raw: bytes) -> None:
    dec = RecordDecoder(Mapping.model_validate(mapping), default_entity="s", clock=lambda: NOW_S)
    check_result(dec.decode_bytes(raw, 11, 5), dec, 11)


json_safe_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_safe = st.recursive(
    json_safe_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(MAPPINGS),
    st.fixed_dictionaries(
        {},
        optional={
            "host": json_safe,
            "dc": json_safe,
            "ts": json_safe,
            "cpu": json_safe,
            "m": st.fixed_dictionaries({}, optional={"mem": json_safe, "io": json_safe}),
        },
    ),
)
def test_bytes_and_objects_decode_alike(mapping: dict[str, Any], record: dict[str, Any]) -> None:
    """A Kafka message (bytes) and the same record as an object give the same result."""
    dec = RecordDecoder(Mapping.model_validate(mapping), default_entity="s")
    assert dec.decode_bytes(json.dumps(record).encode(), 4, 9) == dec.decode(record, 4, 9)


@settings(max_examples=200, deadline=None)
@given(st.floats(-FLOAT32_MAX, FLOAT32_MAX, allow_nan=False), st.integers(T0, T0 + 10**9))
def test_csv_strings_and_json_numbers_decode_alike(value: float, ts: int) -> None:
    dec = decoder(features=["cpu"])
    from_json = dec.decode({"host": "a", "ts": ts, "cpu": value}, 1, 0)
    from_csv = dec.decode({"host": "a", "ts": str(ts), "cpu": repr(value)}, 1, 0)
    assert from_json == from_csv == ("a", ts, [value])


# --- the fast path for flat records -------------------------------------------------------


class GeneralOnly(RecordDecoder):
    """The decoder with its fast path turned off: the reference that path must match."""

    def _decode_flat(self, record: dict[str, Any], fallback_ts_ms: int) -> tuple[str, int, list[float]] | None:
        return None


class CountingDecoder(RecordDecoder):
    """Counts the records that went the general way (`decode`)."""

    general = 0

    def decode(self, record: Any, position: int, fallback_ts_ms: int) -> tuple[str, int, list[float]] | Rejection:
        self.general += 1
        return super().decode(record, position, fallback_ts_ms)


def same(a: tuple[str, int, list[float]] | Rejection, b: tuple[str, int, list[float]] | Rejection) -> bool:
    """Equal down to the types and float bits: 1 == 1.0, 0.0 == -0.0 and nan != nan would hide
    a difference (or invent one)."""
    if isinstance(a, Rejection) or isinstance(b, Rejection):
        return a == b
    return (
        type(a[0]) is type(b[0]) is str
        and type(a[1]) is type(b[1]) is int
        and a[:2] == b[:2]
        and all(type(v) is float for v in [*a[2], *b[2]])
        and [v.hex() for v in a[2]] == [v.hex() for v in b[2]]
    )


NOW_MS = int(NOW_S * 1000)


@st.composite
def fast_path_mappings(draw: st.DrawFn) -> dict[str, Any]:
    """Entity from 0, 1 or 2 fields, every timestamp format or none, defaults or not, the
    future limit set, unset (a day) or off; fields flat or dotted."""
    features = draw(st.lists(st.sampled_from(["cpu", "mem", "m.io", "m"]), min_size=1, max_size=3, unique=True))
    defaults = st.none() | st.sampled_from([0, -1.5, 1e30, math.nan])
    mapping: dict[str, Any] = {
        "entity": draw(st.lists(st.sampled_from(["host", "dc", "m.host"]), max_size=2, unique=True)),
        "timestamp": draw(st.sampled_from([None, "ts", "ts", "m.ts"])),
        "timestamp_format": draw(st.sampled_from(["auto", "iso", "unix_s", "unix_ms"])),
        "features": [
            {"name": f"f{i}", "field": path} | ({} if (d := draw(defaults)) is None else {"default": d})
            for i, path in enumerate(features)
        ],
    }
    limit = draw(st.sampled_from(["unset", None, 60.0, 86_400.0]))
    return mapping if limit == "unset" else mapping | {"max_future_s": limit}


# Values at the edges the fast path draws: exact ints (2**53), seconds vs milliseconds (1e11),
# the millisecond range (1e16), the float32 range, the future limits from NOW_S, and types
# it must leave to `decode` (bools, null, strings, containers).
EDGE_INTS = [
    0,
    1,
    -1,
    2**53,
    2**53 + 1,
    -(2**53),
    -(2**53) - 1,
    2**53 // 1000,
    2**53 // 1000 + 1,
    -(2**53 // 1000) - 1,
    10**11,
    10**11 - 1,
    -(10**11),
    10**16,
    10**16 - 1,
    2**63,
    2**64,
    10**39,
    -(10**400),
    T0,
    T0 // 1000,
    NOW_MS + 60_000,
    NOW_MS + 60_001,
    NOW_MS + 86_400_000,
    NOW_MS + 86_400_001,
    int(NOW_S) + 60,
    int(NOW_S) + 61,
    int(NOW_S) + 86_400,
    int(NOW_S) + 86_401,
    10**13 - 1,
    10**13,
    -(10**13),
]
EDGE_FLOATS = [
    -0.0,
    0.5,
    1e11,
    math.nextafter(1e11, 0),
    1e16,
    math.nextafter(1e16, 0),
    -1e16,
    T0 / 1000 + 0.5,
    NOW_S + 60.0,
    NOW_S + 60.0005,
    FLOAT32_MAX,
    -FLOAT32_MAX,
    math.nextafter(FLOAT32_MAX, math.inf),
    math.nan,
    math.inf,
    -math.inf,
    1e39,
]
EDGE_OTHERS = [
    None,
    True,
    False,
    "",
    " ",
    "a",
    "7",
    " 3.5 ",
    "nan",
    "1e39",
    T0_ISO,
    str(T0),
    "2023-11-14T22:13:20",
    {},
    [],
]
edge_ints = st.sampled_from(EDGE_INTS)
edge_floats = st.sampled_from(EDGE_FLOATS)
edge_values = (
    st.integers()
    | edge_ints
    | st.floats()
    | edge_floats
    | st.none()
    | st.booleans()
    | st.text(max_size=8)
    | st.sampled_from([*EDGE_OTHERS, "x.y"])
)
flat_values = (
    edge_values
    | st.lists(edge_values, max_size=2)
    | st.dictionaries(st.sampled_from(["io", "host", "ts"]), edge_values, max_size=3)
)
flat_keys = st.sampled_from(["host", "dc", "ts", "cpu", "mem", "m", "m.io", "m.host", "m.ts", "other"])

# What each field holds in a record that decodes, mostly: the fast path's own ground, up to
# its edges (exact ints, the seconds/milliseconds switch, the clock's future limits).
good_entities = st.text(min_size=1, max_size=4) | st.integers(-(10**20), 10**20)
good_times = (
    st.integers(-(10**16), 10**16)
    | st.integers(NOW_MS - 10**9, NOW_MS + 10**9)
    | st.integers(int(NOW_S) - 10**6, int(NOW_S) + 10**6)
    | st.floats(-1e17, 1e17)
    | st.floats(NOW_S - 1e6, NOW_S + 1e6)
    | st.sampled_from([T0_ISO, "2023-11-14T22:13:20", "2023-11-14 23:13:20+01:00", str(T0), " 1700000000.5 "])
    | edge_ints
    | edge_floats
)
good_numbers = (
    st.floats(-1e6, 1e6)
    | st.integers(-(10**6), 10**6)
    | st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, math.nextafter(FLOAT32_MAX, math.inf), 10**39, -0.0, None])
)


@st.composite
def mapped_records(draw: st.DrawFn, mapping: dict[str, Any]) -> dict[str, Any]:
    """A record for `mapping`: each mapped field with a plausible value, under its literal key
    or nested (a dotted path); then up to three fields overwritten with edge values or
    deleted. Random records alone would almost never get past the first field."""
    record: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        head, _, rest = path.partition(".")
        node = record.setdefault(head, {}) if rest and draw(st.booleans()) else None
        if isinstance(node, dict):
            node[rest] = value
        else:
            record[path] = value

    for path in mapping["entity"]:
        put(path, draw(good_entities))
    if mapping["timestamp"] is not None:
        put(mapping["timestamp"], draw(good_times))
    for feature in mapping["features"]:
        put(feature["field"], draw(good_numbers))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(flat_keys)
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(flat_values)
    return record


mappings_and_records = fast_path_mappings().flatmap(lambda m: st.tuples(st.just(m), mapped_records(m)))


@settings(max_examples=600, deadline=None)
@given(mappings_and_records, st.integers(0, 10**6), st.integers(-(10**13), 10**13))
def test_fast_path_returns_what_decode_does(
    case: tuple[dict[str, Any], dict[str, Any]], position: int, fallback: int
) -> None:
    mapping, record = case
    dec = RecordDecoder(Mapping.model_validate(mapping), default_entity="s", clock=lambda: NOW_S)
    flat = dec._decode_flat(record, fallback)
    if flat is not None:
        general = dec.decode(record, position, fallback)
        assert same(flat, general), (flat, general)


def test_fast_path_matches_decode_at_every_edge() -> None:
    """Each edge value in each field, under every timestamp format and future limit, with and
    without a default: all combinations, where the properties above only sample them."""
    good_ts = {"auto": T0, "iso": T0_ISO, "unix_s": T0 // 1000, "unix_ms": T0}
    checked = 0
    for fmt, limit, default in itertools.product(good_ts, ["unset", None, 60.0, 86_400.0], [None, 2.5]):
        mapping: dict[str, Any] = {
            "entity": ["host"],
            "timestamp": "ts",
            "timestamp_format": fmt,
            "features": [{"name": "cpu"} | ({} if default is None else {"default": default})],
        }
        if limit != "unset":
            mapping["max_future_s"] = limit
        dec = RecordDecoder(Mapping.model_validate(mapping), default_entity="s", clock=lambda: NOW_S)
        for value in [*EDGE_INTS, *EDGE_FLOATS, *EDGE_OTHERS]:
            for record in (
                {"host": value, "ts": good_ts[fmt], "cpu": 1},
                {"host": "a", "ts": value, "cpu": 1},
                {"host": "a", "ts": good_ts[fmt], "cpu": value},
            ):
                flat = dec._decode_flat(record, 0)
                if flat is not None:
                    general = dec.decode(record, 0, 0)
                    assert same(flat, general), (mapping, record, flat, general)
                    checked += 1
    assert checked > 2000, checked  # most combinations take the fast path (3,302 of 6,400)


def json_text(value: Any) -> str:
    return json.dumps(value)  # NaN and Infinity come out as such: not JSON, so invalid_json


# JSON number spellings that json.dumps never writes: overflow, underflow, exponents, -0.
odd_numbers = st.sampled_from(
    ["1e400", "-1e400", "1e-400", "-0", "-0.0", "1E5", "17e11", "1.7e12", "9007199254740993", "18446744073709551616"]
)


@st.composite
def spelled_records(draw: st.DrawFn, mapping: dict[str, Any]) -> bytes:
    """A record for `mapping` written key by key, so keys may repeat (the last wins) and
    numbers may be spelled in ways `json.dumps` does not."""
    pairs = [(k, json_text(v)) for k, v in draw(mapped_records(mapping)).items()]
    for _ in range(draw(st.integers(0, 2))):
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(flat_keys), draw(odd_numbers)))
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}").encode()


def messages(mapping: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return (
        spelled_records(mapping)
        | mapped_records(mapping).map(lambda r: json_text(r).encode())
        | json_values.map(lambda v: json.dumps(v).encode())
        | damaged_records()
        | st.binary(max_size=64)
        | st.sampled_from([b"", b" \n", b"[]", b"null", b"\xef\xbb\xbf{}", VALID])
    )


@settings(max_examples=400, deadline=None)
@given(fast_path_mappings().flatmap(lambda m: st.tuples(st.just(m), messages(m))), st.integers(-(10**13), 10**13))
def test_decode_bytes_with_and_without_the_fast_path_agree(case: tuple[dict[str, Any], bytes], fallback: int) -> None:
    mapping, raw = case
    spec = Mapping.model_validate(mapping)
    fast = RecordDecoder(spec, default_entity="s", clock=lambda: NOW_S)
    general = GeneralOnly(spec, default_entity="s", clock=lambda: NOW_S)
    a, b = fast.decode_bytes(raw, 5, fallback), general.decode_bytes(raw, 5, fallback)
    assert same(a, b), (a, b)


@pytest.mark.parametrize(
    ("mapping", "raw", "expected"),
    [
        # end_to_end.py's producer messages
        (
            {"entity": ["id"], "timestamp": "ts", "timestamp_format": "unix_ms", "features": ["value"]},
            b'{"id":"e7","ts":1700000000000,"value":-0.12345}',
            ("e7", T0, [-0.12345]),
        ),
        (
            {"entity": ["host", "dc"], "timestamp": "ts", "features": ["cpu", "mem"]},
            b'{"host": "a", "dc": 3, "ts": 1700000000.25, "cpu": 1, "mem": 2.5, "extra": {"x": [1]}}',
            ("a/3", T0 + 250, [1.0, 2.5]),
        ),
        (
            {"entity": "host", "timestamp": "ts", "features": ["cpu"]},
            b'{"host": "a", "ts": "2023-11-14T22:13:20Z", "cpu": 0}',
            ("a", T0, [0.0]),
        ),
        (
            {"entity": "host", "timestamp": "ts", "timestamp_format": "unix_s", "features": ["cpu"]},
            b'{"host": "a", "ts": 1700000000, "cpu": 1e38}',
            ("a", T0, [1e38]),
        ),
        (
            {"entity": [], "timestamp": None, "features": [{"name": "cpu", "default": 0}, "mem"]},
            b'{"cpu": null, "mem": 4}',
            ("s", 9, [0.0, 4.0]),
        ),
        (
            {"entity": "host", "timestamp": "ts", "features": [{"name": "cpu", "field": "cpu.user"}]},
            b'{"host": "a", "ts": 1700000000000, "cpu.user": 5}',
            ("a", T0, [5.0]),
        ),
    ],
)
def test_ordinary_records_take_the_fast_path(mapping: dict[str, Any], raw: bytes, expected: Any) -> None:
    # Without this the fast path could quietly stop being taken and every test above still pass.
    dec = CountingDecoder(Mapping.model_validate(mapping), default_entity="s")
    assert same(dec.decode_bytes(raw, 1, 9), expected)
    assert dec.general == 0


@pytest.mark.parametrize(
    ("raw", "general"),
    [
        (b'{"host": "a", "ts": 1700000000000, "cpu": 1, "m.io": 2}', 0),  # the control: ordinary
        (b'{"host": "a", "ts": 1700000000000, "cpu": 1, "m": {"io": 2}}', 1),  # nested: for `_lookup`
        (b'{"host": "a", "ts": 1700000000000, "cpu": "1.5", "m.io": 2}', 1),  # numeric text
        (b'{"host": "a", "ts": 1700000000000, "cpu": true, "m.io": 2}', 1),
        (b'{"host": "a", "ts": 1700000000000, "cpu": NaN, "m.io": 2}', 0),  # not JSON: no decode at all
        (b'{"host": "a", "ts": 1700000000000, "m.io": 2}', 1),  # missing, no default
        (b'{"host": "", "ts": 1700000000000, "cpu": 1, "m.io": 2}', 1),
        (b'{"host": "a", "ts": "", "cpu": 1, "m.io": 2}', 1),
        (b'{"host": "a", "ts": 9007199254740993, "cpu": 1, "m.io": 2}', 1),  # an int float() would round
        (b'{"host": "a", "ts": 3000000000000, "cpu": 1, "m.io": 2}', 1),  # too far ahead: `decode` rejects
        (b"[1]", 1),
    ],
)
def test_unusual_records_go_the_general_way(raw: bytes, general: int) -> None:
    mapping = {"entity": "host", "timestamp": "ts", "features": ["cpu", {"name": "io", "field": "m.io"}]}
    dec = CountingDecoder(Mapping.model_validate(mapping), default_entity="s", clock=lambda: NOW_S)
    dec.decode_bytes(raw, 1, 9)
    assert dec.general == general


# --- batches ------------------------------------------------------------------------------


def test_batch_builder_separates_samples_and_rejections() -> None:
    builder = BatchBuilder(2)
    builder.add(("a", 10, [1.0, 2.0]), 1)
    builder.add(Rejection(2, "wrong_type", "x"), 2)
    builder.add(("b", 20, [3.0, 4.0]), 3)
    assert len(builder) == 3
    batch, rejections = builder.build()
    assert batch.entities == ["a", "b"]
    assert batch.timestamps.dtype == np.int64
    assert batch.values.dtype == np.float32
    assert batch.values.shape == (2, 2)
    assert batch.positions.tolist() == [1, 3]
    assert [r.position for r in rejections] == [2]
    assert len(builder) == 0
    empty, none = builder.build()
    assert empty.values.shape == (0, 2)
    assert none == []


def test_sample_batch_take_and_concat() -> None:
    batch = SampleBatch(
        ["a", "b", "c"], np.array([1, 2, 3]), np.arange(6, dtype=np.float32).reshape(3, 2), np.array([5, 6, 7])
    )
    picked = batch.take(np.array([2, 0]))
    assert picked.entities == ["c", "a"]
    assert picked.values.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    masked = batch.take(np.array([False, True, True]))
    assert masked.positions.tolist() == [6, 7]
    both = SampleBatch.concat([picked, masked], 2)
    assert both.entities == ["c", "a", "b", "c"]
    assert len(SampleBatch.concat([], 2)) == 0
    assert SampleBatch.concat([], 2).values.shape == (0, 2)


# --- files ----------------------------------------------------------------------------------

CSV_TEXT = (
    "ts,host,cpu,mem\n"
    f"{T0_ISO},a,1.0,10\n"
    "2023-11-14T22:13:21Z,b,2.5,11\n"
    "2023-11-14T22:13:22Z,a,oops,12\n"
    "2023-11-14T22:13:23Z,b,4.0\n"
    "yesterday,a,5,14\n"
    "2023-11-14T22:13:25Z,,6,15\n"
    "2023-11-14T22:13:26Z,b,7,16\n"
)
CSV_REJECTED = [(3, "wrong_type"), (4, "missing_field"), (5, "bad_timestamp"), (6, "missing_field")]


def read_all(path: Path, dec: RecordDecoder | None = None, **kw: Any) -> tuple[SampleBatch, list[Rejection]]:
    dec = dec or decoder()
    batches, rejections = [], []
    for batch, rejected_rows in read_file(path, dec, len(dec.mapping.features), **kw):
        batches.append(batch)
        rejections.extend(rejected_rows)
    return SampleBatch.concat(batches, len(dec.mapping.features)), rejections


def check_csv_result(samples: SampleBatch, rejections: list[Rejection]) -> None:
    assert samples.entities == ["a", "b", "b"]
    assert samples.positions.tolist() == [1, 2, 7]
    assert samples.timestamps.tolist() == [T0, T0 + 1000, T0 + 6000]
    assert samples.values.tolist() == [[1.0, 10.0], [2.5, 11.0], [7.0, 16.0]]
    assert [(r.position, r.reason) for r in rejections] == CSV_REJECTED


def test_read_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(CSV_TEXT)
    check_csv_result(*read_all(path))


def test_read_gzipped_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(CSV_TEXT)
    check_csv_result(*read_all(path))


def test_read_tsv(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text(CSV_TEXT.replace(",", "\t"))
    check_csv_result(*read_all(path))


def test_read_csv_with_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + CSV_TEXT.replace("\n", "\r\n").encode())
    check_csv_result(*read_all(path))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_read_csv_blank_lines_are_rejected_rows(tmp_path: Path, newline: str) -> None:
    # Blank lines are never dropped silently: each is a row, rejected as `empty`, as in JSONL.
    # Rows count file lines after the header, so row N is line N + 1.
    path = tmp_path / "blank.csv"
    path.write_bytes("ts,host,cpu,mem\n\n1,a,1,1\n  \n\n2,a,2,2\n\t\n".replace("\n", newline).encode())
    samples, rejections = read_all(path)
    assert samples.positions.tolist() == [2, 5]
    assert samples.timestamps.tolist() == [1000, 2000]
    assert [(r.position, r.reason, r.detail) for r in rejections] == [
        (1, "empty", "empty line"),
        (3, "empty", "empty line"),
        (4, "empty", "empty line"),
        (6, "empty", "empty line"),
    ]


def test_read_csv_blank_lines_before_the_header(tmp_path: Path) -> None:
    # The header is the first non-blank line; rows count from the line after it.
    path = tmp_path / "lead.csv"
    path.write_text("\n\nts,host,cpu,mem\n1,a,1,1\n\n2,a,2,2\n")
    samples, rejections = read_all(path)
    assert samples.positions.tolist() == [1, 3]
    assert [(r.position, r.reason) for r in rejections] == [(2, "empty")]


def test_blank_lines_are_rejected_alike_in_csv_and_jsonl(tmp_path: Path) -> None:
    records = [{"ts": 1, "host": "a", "cpu": 1, "mem": 1}, None, {"ts": 2, "host": "a", "cpu": 2, "mem": 2}]
    (tmp_path / "d.csv").write_text(
        "ts,host,cpu,mem\n" + "\n".join("" if r is None else ",".join(map(str, r.values())) for r in records) + "\n"
    )
    (tmp_path / "d.jsonl").write_text("\n".join("" if r is None else json.dumps(r) for r in records) + "\n")
    csv_samples, csv_rejections = read_all(tmp_path / "d.csv")
    jsonl_samples, jsonl_rejections = read_all(tmp_path / "d.jsonl")
    assert csv_samples.positions.tolist() == jsonl_samples.positions.tolist() == [1, 3]
    assert csv_rejections == jsonl_rejections == [Rejection(2, "empty", "empty line")]


def test_read_csv_with_a_quoted_multiline_field(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('ts,host,cpu,mem,note\n1,a,1,1,"two\nlines"\n2,"b,c",2,2,x\n')
    samples, rejections = read_all(path)
    assert samples.entities == ["a", "b,c"]
    assert samples.positions.tolist() == [1, 2]
    assert rejections == []


def test_read_csv_without_timestamp_uses_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("cpu\n1\n2\nx\n4\n")
    dec = RecordDecoder(Mapping.model_validate({"timestamp": None, "features": ["cpu"]}), "s")
    samples, rejections = read_all(path, dec)
    assert samples.timestamps.tolist() == [1, 2, 4]
    assert samples.entities == ["s", "s", "s"]
    assert [(r.position, r.reason) for r in rejections] == [(3, "wrong_type")]


def jsonl_lines() -> list[bytes]:
    return [
        json.dumps({"host": "a", "ts": T0, "cpu": 1.0, "mem": 10}).encode(),
        b"",
        b"not json",
        json.dumps({"host": "b", "ts": T0_ISO, "cpu": 2, "mem": 11}).encode(),
        b"[1, 2, 3]",
        b"   ",
        json.dumps({"host": "a", "ts": T0 + 5, "cpu": 1e39, "mem": 1}).encode(),
        json.dumps({"host": "a", "ts": T0 + 9, "cpu": 3, "mem": 12}).encode(),
    ]


def check_jsonl_result(samples: SampleBatch, rejections: list[Rejection]) -> None:
    assert samples.entities == ["a", "b", "a"]
    assert samples.positions.tolist() == [1, 4, 8]
    assert samples.timestamps.tolist() == [T0, T0, T0 + 9]
    assert samples.values.tolist() == [[1.0, 10.0], [2.0, 11.0], [3.0, 12.0]]
    assert [(r.position, r.reason) for r in rejections] == [
        (2, "empty"),
        (3, "invalid_json"),
        (5, "not_an_object"),
        (6, "empty"),
        (7, "non_finite"),
    ]
    assert rejections[0].detail == "empty line"


def test_read_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(jsonl_lines()) + b"\n")
    check_jsonl_result(*read_all(path))


def test_read_gzipped_jsonl_with_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "data.ndjson.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + b"\r\n".join(jsonl_lines()) + b"\r\n")
    check_jsonl_result(*read_all(path))


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text(CSV_TEXT)
    check_csv_result(*read_all(path, fmt="csv"))
    with pytest.raises(InputError, match="cannot tell the format"):
        read_all(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.csv", "csv"),
        ("a.CSV", "csv"),
        ("a.tsv.gz", "csv"),
        ("a.b.csv.gz", "csv"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.json.gz", "jsonl"),
    ],
)
def test_detect_format(name: str, expected: str) -> None:
    assert detect_format(Path(name)) == expected


@pytest.mark.parametrize("name", ["a.txt", "a", "a.gz", "a.parquet", "a.csv.zip"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(CSV_TEXT)
    with pytest.raises(InputError, match="cannot tell the format"):
        read_all(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        read_all(tmp_path / "absent.csv")
    assert isinstance(info.value, DetectorError)
    assert str(tmp_path / "absent.csv") in str(info.value)


def test_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(InputError, match="empty CSV"):
        read_all(path)


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("ts,host,cpu,mem\n")
    samples, rejections = read_all(path)
    assert len(samples) == 0
    assert samples.values.shape == (0, 2)
    assert rejections == []


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        read_all(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    blob = gzip.compress(b"\n".join(jsonl_lines()) * 50)
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="cannot read"):
        read_all(path)


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_batching_does_not_change_the_result(tmp_path: Path, batch_rows: int, suffix: str) -> None:
    path = tmp_path / f"data.{suffix}"
    if suffix == "csv":
        path.write_text(CSV_TEXT)
    else:
        path.write_bytes(b"\n".join(jsonl_lines()) + b"\n")
    dec = decoder()
    chunks = list(read_file(path, dec, 2, batch_rows=batch_rows))
    # Every batch but the last holds exactly batch_rows rows (samples and rejections together).
    sizes = [len(b) + len(r) for b, r in chunks]
    assert all(s == batch_rows for s in sizes[:-1])
    assert 1 <= sizes[-1] <= batch_rows
    small_samples = SampleBatch.concat([b for b, _ in chunks], 2)
    small_rejections = [r for _, rs in chunks for r in rs]
    whole_samples, whole_rejections = read_all(path, dec)
    assert small_samples.entities == whole_samples.entities
    np.testing.assert_array_equal(small_samples.timestamps, whole_samples.timestamps)
    np.testing.assert_array_equal(small_samples.values, whole_samples.values)
    np.testing.assert_array_equal(small_samples.positions, whole_samples.positions)
    assert small_rejections == whole_rejections


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "", "c d"]),
            st.integers(0, 10**6),
            st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from(["x", "", "1e39"]),
        ),
        max_size=30,
    ),
    st.integers(1, 7),
)
def test_every_csv_row_is_a_sample_or_a_rejection(tmp_path_factory: Any, rows: list[Any], batch_rows: int) -> None:
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    path.write_text("ts,host,cpu\n" + "".join(f"{ts},{host},{value}\n" for host, ts, value in rows))
    dec = decoder(features=["cpu"])
    chunks = list(read_file(path, dec, 1, batch_rows=batch_rows))
    positions = sorted([int(p) for b, _ in chunks for p in b.positions] + [r.position for _, rs in chunks for r in rs])
    assert positions == list(range(1, len(rows) + 1))
    for batch, _ in chunks:
        assert np.isfinite(batch.values).all()
