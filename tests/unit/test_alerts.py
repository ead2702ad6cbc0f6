"""AlertPolicy on hand-built severity sequences, alert JSON, and the log / JSON-lines sinks."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.alerts import Alert, AlertPolicy, JsonLinesSink, LogSink, alert_id
from detector.config import AlertPolicy as PolicyConfig
from detector.threshold import CRITICAL, NONE, WARNING

FEATURES = ("cpu", "mem", "disk")
STEP_MS = 1000
T0_MS = 1_386_018_900_000  # 2013-12-02T21:15:00Z


class Driver:
    """Feeds windows to a policy; window k of the whole run ends at T0 + k·STEP (event time)."""

    def __init__(self, stream: str = "web", version: str = "v1", **config: object) -> None:
        self.policy = AlertPolicy(stream, PolicyConfig.model_validate(config), FEATURES, version)
        self.clock = 0
        self.slot_of: dict[str, int] = {}

    def feed(
        self,
        severities: list[int],
        entities: list[str] | str = "host-a",
        gap_windows: int = 0,
        scores: list[float] | None = None,
    ) -> tuple[list[Alert], list[str | None], np.ndarray]:
        """Returns the events, the per-window firing ids, and the window end times. Scores
        default to 0.5 / 2 / 5 (none / warning / critical) against thresholds 1 / 1 / 4."""
        n = len(severities)
        names = [entities] * n if isinstance(entities, str) else list(entities)
        slots = np.array([self.slot_of.setdefault(e, len(self.slot_of)) for e in names], np.int64)
        self.clock += gap_windows
        index = self.clock + np.arange(n)  # position in the whole run
        self.clock += n
        end_ms = T0_MS + (index + 1) * STEP_MS
        sev = np.asarray(severities, np.int8)
        if scores is None:
            score = np.where(sev == NONE, 0.5, np.where(sev == WARNING, 2.0, 5.0)) + index * 1e-3
        else:
            score = np.asarray(scores, np.float64)
        thresholds = np.where(sev == CRITICAL, 4.0, 1.0)
        per_feature = np.tile(np.array([0.1, 0.3, 0.2]), (n, 1)) * score[:, None]
        events, ids = self.policy.update(
            slots, names, sev, score, thresholds, per_feature, end_ms - 15 * STEP_MS, end_ms
        )
        return events, ids, end_ms


def window_of(event: Alert, end_ms: np.ndarray) -> int:
    return int(np.flatnonzero(end_ms == event.window_end_ms)[0])


# --- N of M --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "pattern", "fires_at"),
    [
        (3, 5, [1, 0, 1, 0, 1], 4),
        (3, 5, [1, 0, 0, 0, 1, 0, 0, 1], None),
        (3, 5, [1, 1, 1], 2),
        (3, 5, [1, 1, 0, 0, 0, 0, 1], None),  # the first two left the last 5 before the third came
        (3, 5, [0, 1, 1, 0, 0, 1], 5),
        (3, 5, [1, 0, 0, 0, 1, 1, 0, 1], 7),  # at 4 and 5 only two of the last five
        (1, 1, [0, 0, 1], 2),
        (5, 5, [1, 1, 1, 1, 0, 1, 1, 1, 1, 1], 9),
        (2, 3, [2, 0, 0, 1, 0, 1], 5),
    ],
)
def test_fires_exactly_when_n_of_last_m_are_anomalous(n: int, m: int, pattern: list[int], fires_at: int | None) -> None:
    driver = Driver(n=n, m=m, cooldown_s=0)
    events, ids, end_ms = driver.feed(pattern)
    if fires_at is None:
        assert events == []
        assert ids == [None] * len(pattern)
        return
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", fires_at)]
    assert ids == [None] * fires_at + [events[0].id] * (len(pattern) - fires_at)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    m=st.sampled_from([1, 7, 63, 64, 65, 200, 700]),
    rate=st.floats(0.05, 0.95),
)
def test_first_firing_matches_a_plain_sliding_count_for_long_m(data: st.DataObject, m: int, rate: float) -> None:
    """The bitmask history agrees with counting the last m windows in a list, also past 64 bits."""
    n = data.draw(st.integers(1, m))
    length = data.draw(st.integers(1, 3 * m + 5))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pattern = np.where(rng.random(length) < rate, rng.choice([WARNING, CRITICAL], length, p=[0.8, 0.2]), NONE)
    events, _, end_ms = Driver(n=n, m=m, cooldown_s=0).feed(pattern.tolist())
    expected = next(
        (i for i in range(length) if pattern[i] != NONE and np.count_nonzero(pattern[max(0, i - m + 1) : i + 1]) >= n),
        None,
    )
    if expected is None:
        assert events == []
        return
    first = events[0]
    assert (first.status, window_of(first, end_ms)) == ("firing", expected)
    worst = int(pattern[max(0, expected - m + 1) : expected + 1].max())
    assert first.severity == ("critical" if worst == CRITICAL else "warning")


def test_long_m_forgets_a_window_exactly_m_windows_later() -> None:
    # n = m = 300: one normal window among 300 blocks firing until it has left the last 300.
    pattern = [1] * 150 + [0] + [1] * 450
    events, _, end_ms = Driver(n=300, m=300, cooldown_s=0).feed(pattern)
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", 450)]


def test_result_does_not_depend_on_how_windows_are_split_into_calls() -> None:
    pattern = [1, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    whole = Driver(cooldown_s=2)
    all_events, all_ids, _ = whole.feed(pattern)
    split = Driver(cooldown_s=2)
    events, ids = [], []
    for lo, hi in [(0, 1), (1, 4), (4, 4), (4, 12), (12, 15)]:
        e, i, _ = split.feed(pattern[lo:hi])
        events += e
        ids += i
    assert len(all_events) == 4
    assert events == all_events
    assert ids == all_ids


def test_one_alert_per_incident_while_active() -> None:
    events, ids, _ = Driver(n=3, m=5).feed([1] * 30)
    assert len(events) == 1
    assert set(ids[2:]) == {events[0].id}
    assert ids[:2] == [None, None]


def test_firing_event_contents() -> None:
    events, _, end_ms = Driver(n=2, m=3).feed([0, 1, 1])
    (alert,) = events
    assert alert.status == "firing"
    assert alert.stream == "web"
    assert alert.entity == "host-a"
    assert alert.severity == "warning"
    assert alert.window_end_ms == end_ms[2]
    assert alert.window_start_ms == end_ms[2] - 15 * STEP_MS
    assert alert.score == pytest.approx(2.002)
    assert alert.threshold == 1.0
    assert alert.model_version == "v1"
    assert alert.resolves is None
    assert [name for name, _ in alert.top_features] == ["mem", "disk", "cpu"]
    assert alert.id == alert_id("web", "host-a", int(end_ms[2]))


# --- severity and escalation ---------------------------------------------------------------


def test_firing_carries_worst_severity_among_last_m() -> None:
    events, _, _ = Driver(n=3, m=5).feed([2, 0, 1, 1])
    assert [(e.status, e.severity) for e in events] == [("firing", "critical")]


def test_worst_severity_only_looks_at_the_last_m_windows() -> None:
    # The critical window is six windows back when the entity fires: it no longer counts.
    events, _, end_ms = Driver(n=3, m=5).feed([2, 0, 0, 0, 0, 0, 1, 1, 1])
    assert [(e.severity, window_of(e, end_ms)) for e in events] == [("warning", 8)]


def test_escalation_from_warning_to_critical_fires_again_with_new_id() -> None:
    events, ids, end_ms = Driver(n=3, m=5).feed([1, 1, 1, 1, 2, 2, 1, 2])
    assert [(e.status, e.severity, window_of(e, end_ms)) for e in events] == [
        ("firing", "warning", 2),
        ("firing", "critical", 4),
    ]
    first, escalated = events
    assert first.id != escalated.id
    assert escalated.threshold == 4.0  # the critical threshold
    assert ids == [None, None, first.id, first.id, escalated.id, escalated.id, escalated.id, escalated.id]


def test_no_second_firing_for_warning_after_critical() -> None:
    events, _, _ = Driver(n=3, m=5).feed([2, 2, 2, 1, 1, 2, 1])
    assert len(events) == 1
    assert events[0].severity == "critical"


# --- resolve -------------------------------------------------------------------------------


def test_resolves_after_m_normal_windows_by_default() -> None:
    driver = Driver(n=3, m=5, cooldown_s=0)
    events, ids, end_ms = driver.feed([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", 2), ("resolved", 7)]
    firing, resolved = events
    assert resolved.resolves == firing.id
    assert resolved.id == alert_id("web", "host-a", int(end_ms[7]), "resolved")
    assert resolved.id != firing.id
    assert resolved.severity == "warning"
    assert ids == [None, None] + [firing.id] * 5 + [None] * 3


def test_resolve_after_setting_and_streak_reset() -> None:
    events, _, end_ms = Driver(n=3, m=5, resolve_after=2, cooldown_s=0).feed([1, 1, 1, 0, 1, 0, 0, 0])
    # The anomalous window at 4 breaks the normal run: 4 neither fires again nor resolves.
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", 2), ("resolved", 6)]


def test_resolve_after_escalation_points_at_the_latest_firing_id() -> None:
    events, _, _ = Driver(n=3, m=5).feed([1, 1, 1, 2, 0, 0, 0, 0, 0])
    warning, critical, resolved = events
    assert resolved.status == "resolved"
    assert resolved.resolves == critical.id
    assert resolved.severity == "critical"
    assert warning.id != critical.id


def test_escalation_names_what_it_replaces_and_the_resolve_ends_every_id() -> None:
    # A consumer that tracks open alerts by id must be able to close both: the escalation
    # says which id it supersedes, and the resolve lists every id of the incident.
    events, _, _ = Driver(n=3, m=5).feed([1, 1, 1, 2, 0, 0, 0, 0, 0])
    warning, critical, resolved = (e.to_dict() for e in events)
    assert "replaces" not in warning and "ends" not in warning
    assert critical["replaces"] == warning["id"]
    assert resolved["resolves"] == critical["id"]
    assert resolved["ends"] == [warning["id"], critical["id"]]
    # Without an escalation the resolve ends just the one id.
    events, _, _ = Driver(n=3, m=5).feed([1, 1, 1, 0, 0, 0, 0, 0])
    firing, resolved_alone = events
    assert resolved_alone.ends == (firing.id,)
    assert firing.replaces is None


def test_firing_score_and_threshold_match_the_severity_reported() -> None:
    # The critical window is two windows back when the entity fires on a warning window: the
    # alert says critical, so its score and threshold are those of the critical window.
    events, _, end_ms = Driver(n=3, m=5).feed([2, 0, 1, 1])
    (alert,) = events
    assert alert.severity == "critical"
    assert alert.score == pytest.approx(5.0)  # the critical window's score (Driver: 5 + index·1e-3)
    assert alert.threshold == 4.0  # the critical threshold, not the warning one (1.0)
    assert alert.score > alert.threshold
    assert alert.window_end_ms == end_ms[3]  # still the window that fired


# --- reconfigure -----------------------------------------------------------------------------


def test_reconfigure_keeps_an_open_incident_and_resolves_it_under_the_new_rules() -> None:
    driver = Driver(n=3, m=5, cooldown_s=0)
    (firing,), _, _ = driver.feed([1, 1, 1, 0, 0])
    driver.policy = driver.policy.reconfigured(PolicyConfig(n=2, m=4, resolve_after=3, cooldown_s=0))
    events, ids, _ = driver.feed([0, 0, 0])
    # The two normal windows before the reload count towards the new resolve_after (3).
    assert [(e.status, e.resolves, e.ends) for e in events] == [("resolved", firing.id, (firing.id,))]
    assert ids == [None] * 3


def test_reconfigure_keeps_escalation_ids_and_severity() -> None:
    driver = Driver(n=3, m=5)
    warning, critical = driver.feed([1, 1, 1, 2])[0]
    driver.policy = driver.policy.reconfigured(PolicyConfig(n=3, m=5, resolve_after=2))
    events, _, _ = driver.feed([2, 1, 0, 0])
    # No second firing for the same incident after the reload, and the resolve ends both ids.
    ((resolved),) = events
    assert resolved.severity == "critical"
    assert resolved.ends == (warning.id, critical.id)


@pytest.mark.parametrize(("new_m", "fires"), [(3, False), (8, True)])
def test_reconfigure_truncates_or_extends_the_history_to_the_new_m(new_m: int, fires: bool) -> None:
    # Two anomalous windows four and five windows back, then one now: with m = 3 only the
    # latest counts; with m = 8 all three are within the last m and n = 3 fires.
    driver = Driver(n=3, m=6)
    assert driver.feed([1, 1, 0, 0, 0])[0] == []
    driver.policy = driver.policy.reconfigured(PolicyConfig(n=3, m=new_m))
    events, _, _ = driver.feed([1])
    assert bool(events) == fires


def test_reconfigure_applies_the_new_cooldown_from_the_last_resolve() -> None:
    driver = Driver(n=1, m=1, cooldown_s=100)
    events, _, end_ms = driver.feed([1, 0])
    resolved_at = int(end_ms[1])
    assert [e.status for e in events] == ["firing", "resolved"]
    driver.policy = driver.policy.reconfigured(PolicyConfig(n=1, m=1, cooldown_s=5))
    events, _, end_ms = driver.feed([1] * 10)
    assert [e.status for e in events] == ["firing"]
    assert events[0].window_end_ms == resolved_at + 5_000


# --- cooldown ------------------------------------------------------------------------------


def test_cooldown_blocks_firing_until_event_time_has_passed() -> None:
    driver = Driver(n=3, m=5, cooldown_s=10)
    events, _, end_ms = driver.feed([1, 1, 1, 0, 0, 0, 0, 0])
    resolved_at = int(end_ms[7])
    assert events[-1].status == "resolved"
    # Anomalous from the next window on: quiet until resolved_at + 10 s.
    events, ids, end_ms = driver.feed([1] * 12)
    assert [e.status for e in events] == ["firing"]
    assert events[0].window_end_ms == resolved_at + 10_000
    assert all(i is None for i, end in zip(ids, end_ms, strict=True) if end < resolved_at + 10_000)


def test_cooldown_counts_event_time_not_windows() -> None:
    driver = Driver(n=3, m=5, cooldown_s=60)
    driver.feed([1, 1, 1, 0, 0, 0, 0, 0])
    # The next windows come an hour later (event time): the cooldown is long over.
    events, _, end_ms = driver.feed([1, 1, 1], gap_windows=3600)
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", 2)]


def test_without_cooldown_it_can_fire_again_right_after_resolve() -> None:
    events, _, end_ms = Driver(n=3, m=5, cooldown_s=0).feed([1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1])
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", 2), ("resolved", 7), ("firing", 10)]
    assert events[2].id != events[0].id


def test_a_higher_severity_fires_through_the_cooldown_of_a_lower_one() -> None:
    driver = Driver(n=1, m=1, resolve_after=2, cooldown_s=3600)
    events, _, _ = driver.feed([1, 0, 0])
    assert [(e.status, e.severity) for e in events] == [("firing", "warning"), ("resolved", "warning")]
    # Within the warning incident's cooldown: more warnings stay quiet, a critical window fires.
    events, _, end_ms = driver.feed([1, 1, 2, 2, 0, 0])
    assert [(e.status, e.severity, window_of(e, end_ms)) for e in events] == [
        ("firing", "critical", 2),
        ("resolved", "critical", 5),
    ]
    # Within the critical incident's cooldown nothing fires, not even critical.
    events, _, _ = driver.feed([1, 2, 2])
    assert events == []


def test_cooldown_breakout_fires_on_a_far_higher_score_only() -> None:
    def run(**config: object) -> list[tuple[str, int]]:
        driver = Driver(n=1, m=1, resolve_after=2, cooldown_s=3600, **config)
        # An incident peaking at score 2.5 (thresholds 1), then warnings during its cooldown.
        driver.feed([1, 1, 0, 0], scores=[1.5, 2.5, 0.5, 0.5])
        events, _, end_ms = driver.feed([1, 0, 1, 1], scores=[7.0, 0.5, 7.5, 9.0])
        return [(e.status, window_of(e, end_ms)) for e in events]

    assert run() == []  # the cooldown holds
    assert run(cooldown_breakout=3) == [("firing", 2)]  # 7.5 ≥ 3·2.5; 7.0 was not
    assert run(cooldown_breakout=4) == []  # 9 < 4·2.5


def test_cooldown_breakout_compares_against_the_incident_that_resolved() -> None:
    driver = Driver(n=1, m=1, resolve_after=1, cooldown_s=3600, cooldown_breakout=2)
    driver.feed([1, 0], scores=[3.0, 0.5])
    # 6.5 breaks out of the first incident's cooldown; the second incident peaks at 6.5, so
    # breaking out of its cooldown takes 13.
    events, _, end_ms = driver.feed([1, 0, 1, 1], scores=[6.5, 0.5, 12.0, 13.0])
    assert [(e.status, window_of(e, end_ms)) for e in events] == [("firing", 0), ("resolved", 1), ("firing", 3)]


# --- entities and ids ----------------------------------------------------------------------


def test_entities_are_independent() -> None:
    a = [1, 1, 1, 0, 0, 0, 0, 0]
    b = [0, 1, 0, 1, 0, 0, 1, 0]  # never 3 of 5
    interleaved = Driver(n=3, m=5, cooldown_s=0)
    severities = [s for pair in zip(a, b, strict=True) for s in pair]
    events, ids, _ = interleaved.feed(severities, ["host-a", "host-b"] * len(a))
    assert {e.entity for e in events} == {"host-a"}
    assert [e.status for e in events] == ["firing", "resolved"]
    assert ids[1::2] == [None] * len(b)
    # host-b's normal windows do not count towards host-a's resolve: it still takes 5 of host-a's own.
    assert events[1].window_end_ms == T0_MS + 15 * STEP_MS

    both = Driver(n=2, m=3, cooldown_s=0)
    events, _, end_ms = both.feed([1, 1, 1, 0, 1, 1], ["x", "y", "x", "y", "y", "y"])
    assert [(e.entity, e.status, window_of(e, end_ms)) for e in events] == [("x", "firing", 2), ("y", "firing", 4)]


def test_alert_id_is_stable_and_distinguishes_its_inputs() -> None:
    base = alert_id("web", "host-a", 1000)
    assert base == alert_id("web", "host-a", 1000)
    assert len(base) == 24
    int(base, 16)
    others = {
        alert_id("db", "host-a", 1000),
        alert_id("web", "host-b", 1000),
        alert_id("web", "host-a", 1001),
        alert_id("web", "host-a", 1000, "resolved"),
        alert_id("web", "host-a1", 100),  # no ambiguity from concatenation
        alert_id("web\x00host-a", "", 1000),
    }
    assert base not in others
    assert len(others) == 6


def test_same_windows_give_same_ids_across_policies() -> None:
    pattern = [1, 1, 1, 2, 0, 0, 0, 0, 0, 1, 1, 1]
    first, _, _ = Driver(cooldown_s=0).feed(pattern)
    again, _, _ = Driver(cooldown_s=0).feed(pattern)
    other_stream, _, _ = Driver(stream="db", cooldown_s=0).feed(pattern)
    assert [e.id for e in first] == [e.id for e in again]
    assert len({e.id for e in first}) == len(first) == 4
    assert not {e.id for e in first} & {e.id for e in other_stream}


# --- JSON and sinks ------------------------------------------------------------------------

EXPECTED_KEYS = {
    "id",
    "status",
    "stream",
    "entity",
    "severity",
    "window_start",
    "window_end",
    "score",
    "threshold",
    "top_features",
    "model_version",
    "cold_start",
}


def sample_alerts() -> list[Alert]:
    driver = Driver(n=1, m=1, top_features=2, cooldown_s=0, version="web-20240101T000000Z-abcd1234")
    policy = driver.policy
    one = np.ones(1)
    end = np.array([T0_MS + 60_000])
    firing, _ = policy.update(
        np.array([0]), ["host-a"], np.array([CRITICAL], np.int8), 7.25 * one, 4.5 * one,
        np.array([[0.1, 0.9, 0.5]]), end - 60_000, end,
    )  # fmt: skip
    resolved, _ = policy.update(
        np.array([0]), ["host-a"], np.array([NONE], np.int8), 0.125 * one, 1.0 * one,
        np.array([[0.2, 0.05, 0.3]]), end, end + 1234,
    )  # fmt: skip
    return firing + resolved


def test_to_dict_has_every_field() -> None:
    firing, resolved = sample_alerts()
    data = json.loads(json.dumps(firing.to_dict()))
    assert set(data) == EXPECTED_KEYS
    assert data == {
        "id": alert_id("web", "host-a", T0_MS + 60_000),
        "status": "firing",
        "stream": "web",
        "entity": "host-a",
        "severity": "critical",
        "window_start": "2013-12-02T21:15:00.000Z",
        "window_end": "2013-12-02T21:16:00.000Z",
        "score": 7.25,
        "threshold": 4.5,
        "top_features": [{"name": "mem", "error": 0.9}, {"name": "disk", "error": 0.5}],
        "model_version": "web-20240101T000000Z-abcd1234",
        "cold_start": False,
    }
    data = json.loads(json.dumps(resolved.to_dict()))
    assert set(data) == EXPECTED_KEYS | {"resolves", "ends"}
    assert data["status"] == "resolved"
    assert data["resolves"] == firing.id
    assert data["ends"] == [firing.id]
    assert data["window_end"] == "2013-12-02T21:16:01.234Z"
    assert [f["name"] for f in data["top_features"]] == ["disk", "cpu"]


def test_to_dict_keeps_small_scores_distinguishable() -> None:
    # Reconstruction errors of a well-fitted model can be tiny; the JSON must still show that
    # the score is above the threshold.
    alert = sample_alerts()[0]
    tiny = replace(alert, score=3.2e-7, threshold=2.1e-7)
    data = tiny.to_dict()
    assert data["score"] > data["threshold"] > 0
    assert data["score"] == pytest.approx(3.2e-7, rel=1e-5)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_numbers_become_null_in_every_json_sink(
    bad: float, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alert = replace(sample_alerts()[0], score=bad, threshold=np.inf, top_features=(("mem", bad), ("cpu", 0.5)))
    data = alert.to_dict()
    assert data["score"] is None and data["threshold"] is None
    assert data["top_features"] == [{"name": "mem", "error": None}, {"name": "cpu", "error": 0.5}]

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in alert JSON"))

    path = tmp_path / "alerts.jsonl"
    sink = JsonLinesSink(path)
    sink.emit([alert])
    sink.close()
    assert strict(path.read_text()) == data
    with caplog.at_level(logging.INFO, logger="detector.alerts"):
        LogSink().emit([alert])
    assert strict(caplog.records[-1].getMessage()) == data


def test_top_features_are_sorted_by_error_and_limited() -> None:
    driver = Driver(n=1, m=1, top_features=3)
    events, _ = driver.policy.update(
        np.array([0]), ["h"], np.array([WARNING], np.int8), np.ones(1), np.zeros(1),
        np.array([[0.2, 0.7, 0.4]]), np.array([0]), np.array([1000]),
    )  # fmt: skip
    assert events[0].top_features == (("mem", 0.7), ("disk", 0.4), ("cpu", 0.2))


def test_log_sink_writes_one_json_line_per_alert(caplog: pytest.LogCaptureFixture) -> None:
    alerts = sample_alerts()
    sink = LogSink()
    with caplog.at_level(logging.INFO, logger="detector.alerts"):
        sink.emit(alerts)
        sink.emit([])
    sink.close()
    records = [r for r in caplog.records if r.name == "detector.alerts"]
    assert len(records) == 2
    assert all(r.levelno == logging.WARNING for r in records)
    assert [json.loads(r.getMessage()) for r in records] == [a.to_dict() for a in alerts]


def test_json_lines_sink_writes_every_alert_and_creates_folders(tmp_path: Path) -> None:
    alerts = sample_alerts()
    path = tmp_path / "out" / "nested" / "alerts.jsonl"
    sink = JsonLinesSink(path)
    sink.emit(alerts[:1])
    # Flushed per batch: readable before close.
    assert [json.loads(line) for line in path.read_text().splitlines()] == [alerts[0].to_dict()]
    sink.emit(alerts[1:])
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [a.to_dict() for a in alerts]
    assert path.read_text().endswith("\n")
