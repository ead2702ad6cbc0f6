"""Turning raw records into samples: the stream's field mapping, and file input.

A record is a JSON object (a Kafka message, a JSONL line) or a CSV row. `RecordDecoder`
applies the stream's `mapping` to one record and returns either a decoded sample or a
`Rejection` with a reason from `REJECT_REASONS`. Bad records are data, not errors: callers
count them and report them (file row, or Kafka offset), and never drop them silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from detector.config import Mapping
from detector.errors import InputError

# Bounded set: these are also metric label values.
REJECT_REASONS = (
    "empty",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "non_finite",
    "bad_timestamp",
    "future_timestamp",
    "out_of_order",
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Unix timestamps below this are seconds, above it milliseconds (1e11 s is the year 5138).
_SECONDS_LIMIT = 1e11
# Every int up to this converts to float exactly.
_EXACT_INT = 2**53


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that could not be used. `position` is the file row (1-based) or Kafka offset."""

    position: int
    reason: str
    detail: str


@dataclass
class SampleBatch:
    """Decoded samples in arrival order.

    Shape:
        timestamps: (N,) int64 milliseconds since the Unix epoch (UTC)
        values: (N, D) float32, raw (not normalized)
        positions: (N,) int64 file rows or Kafka offsets
    """

    entities: list[str]
    timestamps: np.ndarray
    values: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.entities)

    def take(self, index: np.ndarray) -> SampleBatch:
        """The rows at `index` (an int array or boolean mask), in that order."""
        rows = np.arange(len(self))[index]
        return SampleBatch(
            entities=[self.entities[i] for i in rows],
            timestamps=self.timestamps[rows],
            values=self.values[rows],
            positions=self.positions[rows],
        )

    @staticmethod
    def concat(batches: list[SampleBatch], n_features: int) -> SampleBatch:
        if not batches:
            return SampleBatch([], np.empty(0, np.int64), np.empty((0, n_features), np.float32), np.empty(0, np.int64))
        return SampleBatch(
            entities=[e for b in batches for e in b.entities],
            timestamps=np.concatenate([b.timestamps for b in batches]),
            values=np.concatenate([b.values for b in batches]),
            positions=np.concatenate([b.positions for b in batches]),
        )


@dataclass
class BatchBuilder:
    """Accumulates decoded samples and rejections, then hands them over as a batch."""

    n_features: int
    entities: list[str] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entities) + len(self.rejections)

    def add(self, decoded: tuple[str, int, list[float]] | Rejection, position: int) -> None:
        if isinstance(decoded, Rejection):
            self.rejections.append(decoded)
            return
        entity, ts, values = decoded
        self.entities.append(entity)
        self.timestamps.append(ts)
        self.values.append(values)
        self.positions.append(position)

    def build(self) -> tuple[SampleBatch, list[Rejection]]:
        batch = SampleBatch(
            entities=self.entities,
            timestamps=np.asarray(self.timestamps, dtype=np.int64),
            values=np.asarray(self.values, dtype=np.float32).reshape(len(self.entities), self.n_features),
            positions=np.asarray(self.positions, dtype=np.int64),
        )
        rejections = self.rejections
        self.entities, self.timestamps, self.values, self.positions, self.rejections = [], [], [], [], []
        return batch, rejections


class RecordDecoder:
    """Applies a stream's field mapping to one record.

    `decode` never raises on bad data: it returns a `Rejection` instead. `clock` (seconds since
    the epoch) is what `mapping.max_future_s` measures event times against.
    """

    def __init__(self, mapping: Mapping, default_entity: str, clock: Callable[[], float] = time.time) -> None:
        self.mapping = mapping
        self.default_entity = default_entity
        self.clock = clock
        self._features = [(f.name, f.path, f.default) for f in mapping.features]
        self._max_future_ms = None if mapping.max_future_s is None else mapping.max_future_s * 1000.0
        # For `_decode_flat`, as plain attributes: a pydantic field costs twice as much to read,
        # on every record. A default fills in there only for a key without a dot: for a dotted
        # one an absent key may still be a nested path, which only `_lookup` resolves.
        self._flat_entity = tuple(mapping.entity)
        self._flat_timestamp = mapping.timestamp
        self._flat_format = mapping.timestamp_format
        self._flat_features = [
            (f.path, None if "." in f.path or f.default is None else float(f.default)) for f in mapping.features
        ]

    def decode_bytes(self, raw: bytes, position: int, fallback_ts_ms: int) -> tuple[str, int, list[float]] | Rejection:
        """Decode one message. An empty value (a Kafka tombstone, a blank line) is `empty`, as
        in files, not `invalid_json`."""
        if not raw or raw.isspace():
            return Rejection(position, "empty", "empty message")
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return Rejection(position, "invalid_json", str(exc)[:200])
        if type(record) is dict:
            flat = self._decode_flat(record, fallback_ts_ms)
            if flat is not None:
                return flat
        return self.decode(record, position, fallback_ts_ms)

    def _decode_flat(self, record: dict[str, Any], fallback_ts_ms: int) -> tuple[str, int, list[float]] | None:
        """What `decode` returns for an ordinary record, or None: then ask `decode`.

        Ordinary: every mapped field a top-level key holding a value of exactly the type wanted
        (a non-empty string or an int entity; an int, float or string timestamp that parses
        and is not too far ahead; int or float features in the float32 range, or null where
        a default applies). A Kafka message almost always is, and this takes a third of
        `decode`'s time on it (the daemon decodes every message it reads).

        It only accepts, never rejects: `decode` stays the one place that decides rejections
        and their messages, and the equivalence properties in tests/unit/test_source.py hold
        this to returning exactly what `decode` would. `type(x) is`, not `isinstance`: a bool
        is an int, and anything unusual should go the general way.
        """
        get = record.get
        value: Any  # dict.get's `Any | None` would make every check below a type error
        if self._flat_entity:
            parts = []
            for path in self._flat_entity:
                value = get(path)
                kind = type(value)
                if kind is str and value:
                    parts.append(value)
                elif kind is int:
                    parts.append(str(value))
                else:
                    return None
            entity = parts[0] if len(parts) == 1 else "/".join(parts)
        else:
            entity = self.default_entity
        ts = fallback_ts_ms
        if self._flat_timestamp is not None:
            fmt = self._flat_format
            value = get(self._flat_timestamp)
            kind = type(value)
            if kind is int and fmt != "iso" and -_EXACT_INT <= value <= _EXACT_INT:
                # `parse_timestamp`'s arithmetic (float(), * 1000.0, round()) is exact for these
                # ints, so it is done in ints, which costs half as much. A larger int goes to
                # `decode`: float() would round it, or overflow.
                if fmt == "unix_ms" or (fmt == "auto" and abs(value) >= _SECONDS_LIMIT):
                    parsed = value
                elif -_EXACT_INT <= value * 1000 <= _EXACT_INT:
                    parsed = value * 1000
                else:
                    parsed = _ms_from_number(float(value), fmt)
            elif kind is str:
                parsed = parse_timestamp(value, fmt)  # what `decode` calls for a non-empty string
            elif kind is float and fmt != "iso":
                parsed = _ms_from_number(value, fmt)
            else:
                return None
            if parsed is None:
                return None
            limit = self._max_future_ms
            if limit is not None and parsed > self.clock() * 1000.0 + limit:
                return None
            ts = parsed
        values: list[float] = []
        for path, default in self._flat_features:
            value = get(path)
            kind = type(value)
            if kind is float:
                # Also false for NaN, which `decode` treats as missing.
                if not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                    return None
            elif kind is int:
                if not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                    return None
                value = float(value)
            elif value is None and default is not None:
                value = default  # absent or null, as in `decode`; a default is not range-checked there either
            else:
                return None
            values.append(value)
        return entity, ts, values

    def decode(self, record: Any, position: int, fallback_ts_ms: int) -> tuple[str, int, list[float]] | Rejection:
        if not isinstance(record, dict):
            return Rejection(position, "not_an_object", f"expected a JSON object, got {type(record).__name__}")
        entity = self._entity(record, position)
        if isinstance(entity, Rejection):
            return entity
        ts = fallback_ts_ms
        if self.mapping.timestamp is not None:
            raw_ts = _lookup(record, self.mapping.timestamp)
            parsed = self._timestamp(raw_ts, position)
            if isinstance(parsed, Rejection):
                return parsed
            # One far-future sample would make every later sample of its entity "out of order";
            # only the event-time field is checked (a row number or Kafka time is not data).
            if self._max_future_ms is not None and parsed > self.clock() * 1000.0 + self._max_future_ms:
                return Rejection(
                    position,
                    "future_timestamp",
                    f"timestamp {str(raw_ts)[:64]!r} is more than {self.mapping.max_future_s:g} s ahead of the clock",
                )
            ts = parsed
        values: list[float] = []
        for name, path, default in self._features:
            value = _number(_lookup(record, path))
            if value is None or (isinstance(value, float) and math.isnan(value)):
                # A NaN in a metrics pipeline almost always means "no value"; treat it as missing.
                if default is None:
                    reason = "missing_field" if value is None else "non_finite"
                    return Rejection(position, reason, f"feature {name!r} (field {path!r}) has no value")
                value = default
            elif isinstance(value, str):
                return Rejection(position, "wrong_type", f"feature {name!r} (field {path!r}) is not a number")
            elif not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                return Rejection(position, "non_finite", f"feature {name!r} (field {path!r}) is {value!r}")
            values.append(float(value))
        return entity, ts, values

    def _entity(self, record: dict[str, Any], position: int) -> str | Rejection:
        if not self.mapping.entity:
            return self.default_entity
        parts = []
        for path in self.mapping.entity:
            value = _lookup(record, path)
            if value is None or value == "":
                return Rejection(position, "missing_field", f"entity field {path!r} is missing")
            if isinstance(value, bool) or not isinstance(value, str | int):
                return Rejection(position, "wrong_type", f"entity field {path!r} must be a string or integer")
            parts.append(str(value))
        return "/".join(parts)

    def _timestamp(self, value: Any, position: int) -> int | Rejection:
        if value is None or value == "":
            return Rejection(position, "missing_field", f"timestamp field {self.mapping.timestamp!r} is missing")
        fmt = self.mapping.timestamp_format
        parsed = parse_timestamp(value, fmt)
        if parsed is None:
            return Rejection(position, "bad_timestamp", f"cannot parse timestamp {str(value)[:64]!r} as {fmt}")
        return parsed


def parse_timestamp(value: Any, fmt: Literal["auto", "iso", "unix_s", "unix_ms"] = "auto") -> int | None:
    """Milliseconds since the epoch, or None. Naive ISO times are taken as UTC."""
    if isinstance(value, bool):
        return None
    number = _number(value) if fmt != "iso" else None
    if isinstance(number, float | int):
        try:
            number = float(number)  # a Python int can exceed the float range
        except OverflowError:
            return None
        return _ms_from_number(number, fmt)
    if fmt in ("unix_s", "unix_ms") or not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000.0)


def _ms_from_number(number: float, fmt: Literal["auto", "iso", "unix_s", "unix_ms"]) -> int | None:
    """A numeric timestamp in milliseconds, or None; shared by `parse_timestamp` and `_decode_flat`."""
    if not math.isfinite(number):
        return None
    in_ms = fmt == "unix_ms" or (fmt == "auto" and abs(number) >= _SECONDS_LIMIT)
    ms = number if in_ms else number * 1000.0
    return round(ms) if abs(ms) < 1e16 else None


def format_timestamp(ms: int) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2013-12-02T21:15:00.000Z."""
    moment = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    # Not strftime("%Y"): it does not zero-pad years before 1000 on glibc, which is not ISO 8601.
    return f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def format_timestamps(ms: np.ndarray) -> list[str]:
    """`format_timestamp` of each element, for years 1-9999, without a Python call per value
    (numpy formats the lot: ≈ 0.3 µs a timestamp against ≈ 3 µs).

    Shape:
        ms: (N,) int64 milliseconds since the Unix epoch
    """
    stamps: list[str] = np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms", timezone="UTC").tolist()
    return stamps


def _lookup(record: dict[str, Any], path: str) -> Any:
    # A literal key wins over a dotted path, so `"cpu.user": 1` works as well as nesting.
    if path in record:
        return record[path]
    node: Any = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | int | str | None:
    """A number from JSON or CSV; a non-numeric string comes back as the string itself."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return value
    return str(type(value).__name__)


# --- files -------------------------------------------------------------------------------


def detect_format(path: Path, fmt: str = "auto") -> Literal["csv", "jsonl"]:
    if fmt in ("csv", "jsonl"):
        return fmt  # type: ignore[return-value]
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".csv", ".tsv"):
        return "csv"
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise InputError(f"{path}: cannot tell the format from the extension; use .csv or .jsonl")


def read_file(
    path: Path, decoder: RecordDecoder, n_features: int, fmt: str = "auto", batch_rows: int = 4096
) -> Iterator[tuple[SampleBatch, list[Rejection]]]:
    """Decode a CSV or JSONL file (optionally gzipped) in batches of about `batch_rows` rows.

    Positions are 1-based rows. In JSONL a row is a file line. In CSV the header is row 0 and
    rows count the records after it, so row N is file line N + 1 unless a quoted value spans
    lines. Blank (whitespace-only) lines are rows too: each comes back as an `empty`
    rejection, in both formats. When the mapping has no timestamp field, the row number
    stands in for the timestamp (in milliseconds).
    """
    kind = detect_format(path, fmt)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    builder = BatchBuilder(n_features)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as raw:
            if kind == "csv":
                # utf-8-sig: a byte-order mark (Excel exports) must not become part of the first column name.
                text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
                tsv = path.name.lower().removesuffix(".gz").endswith(".tsv")
                # csv.reader, not DictReader: DictReader skips blank lines, which would drop
                # them silently and shift every later row number.
                reader = csv.reader(text, delimiter="\t" if tsv else ",")
                header = next((cells for cells in reader if not _blank(cells)), None)
                if header is None:
                    raise InputError(f"{path}: empty CSV (no header row)")
                for row_no, cells in enumerate(reader, start=1):
                    if _blank(cells):
                        builder.add(Rejection(row_no, "empty", "empty line"), row_no)
                    else:
                        builder.add(decoder.decode(dict(zip(header, cells, strict=False)), row_no, row_no), row_no)
                    if len(builder) >= batch_rows:
                        yield builder.build()
            else:
                for row_no, line in enumerate(raw, start=1):
                    if row_no == 1:
                        line = line.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not JSON
                    if line.strip():
                        builder.add(decoder.decode_bytes(line, row_no, row_no), row_no)
                    else:
                        builder.add(Rejection(row_no, "empty", "empty line"), row_no)
                    if len(builder) >= batch_rows:
                        yield builder.build()
    except (OSError, EOFError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    if len(builder):
        yield builder.build()


def _blank(cells: list[str]) -> bool:
    """A CSV line with nothing but whitespace on it (csv.reader gives [] for an empty one)."""
    return not cells or (len(cells) == 1 and not cells[0].strip())
