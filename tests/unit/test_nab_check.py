"""scripts/nab_check.py: counting found windows and false positives on hand-built labels."""

import importlib.util
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "nab_check.py"
SERIES = "realKnownCause/example.csv"


@pytest.fixture(scope="module")
def nab_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nab_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nab_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def at(day: int, hour: int = 0) -> datetime:
    return datetime(2014, 1, day, hour, tzinfo=UTC)


def write_inputs(tmp_path: Path, firing_ends: list[str]) -> tuple[Path, Path]:
    labels = tmp_path / "data" / "nab" / "labels" / "combined_windows.json"
    labels.parent.mkdir(parents=True)
    windows = [["2014-01-02 00:00:00.000000", "2014-01-03 00:00:00.000000"], ["2014-01-10 00:00:00", "2014-01-11"]]
    labels.write_text(json.dumps({SERIES: windows}))
    alerts = tmp_path / "alerts.jsonl"
    lines = [{"status": "firing", "window_end": t} for t in firing_ends]
    lines.append({"status": "resolved", "window_end": "2014-01-20T00:00:00.000Z"})  # never counted
    alerts.write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    return tmp_path / "data", alerts


def test_check_counts_windows_with_a_firing_inside_and_firings_outside(nab_check: ModuleType) -> None:
    windows = [nab_check.Window(at(2), at(3)), nab_check.Window(at(10), at(11)), nab_check.Window(at(20), at(21))]
    firing = [at(1), at(2, 5), at(3), at(11, 1), at(15)]
    report = nab_check.check(windows, firing)
    assert report.found == [True, False, False]  # the end of a window is inside it; an hour later is not
    assert report.false_positives == [at(1), at(11, 1), at(15)]
    assert report.firing == 5
    slack = nab_check.check(windows, firing, slack=timedelta(hours=2))
    assert slack.found == [True, True, False]
    assert slack.false_positives == [at(1), at(15)]


def test_since_leaves_out_windows_that_end_before_it(nab_check: ModuleType) -> None:
    windows = [nab_check.Window(at(2), at(3)), nab_check.Window(at(10), at(11))]
    report = nab_check.check(windows, [at(2, 1)], since=at(5))
    assert report.windows == windows[1:]
    assert report.found == [False]
    assert report.false_positives == []  # inside a left-out window is still not a false positive


def test_main_prints_json_summary(nab_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, alerts = write_inputs(tmp_path, ["2014-01-02T12:00:00.000Z", "2014-01-05T00:00:00.000Z"])
    argv = ["--data-dir", str(data_dir), "--alerts", str(alerts), "--series", SERIES, "--json"]
    assert nab_check.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"series": SERIES, "windows": 2, "found": 1, "false_positives": 1, "firing": 2}


def test_main_text_report_and_bad_inputs(
    nab_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, alerts = write_inputs(tmp_path, ["2014-01-10T06:00:00.000Z"])
    assert nab_check.main(["--data-dir", str(data_dir), "--alerts", str(alerts), "--series", SERIES]) == 0
    out = capsys.readouterr().out
    assert "window 0: 2014-01-02 00:00 -> 2014-01-03 00:00  missed" in out
    assert "window 1: 2014-01-10 00:00 -> 2014-01-11 00:00  FOUND" in out
    assert "found 1/2 windows; 0 of 1 firing alerts outside windows" in out
    assert nab_check.main(["--data-dir", str(data_dir), "--alerts", str(alerts), "--series", "nope.csv"]) == 2
    assert nab_check.main(["--data-dir", str(tmp_path / "missing"), "--alerts", str(alerts), "--series", SERIES]) == 2
