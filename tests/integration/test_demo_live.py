"""`make demo` end to end: generated data, training, the local broker, the daemon subprocess.

The demo always starts its own broker (it is the newcomer's first command), so this test
does too, whatever DETECTOR_TEST_BOOTSTRAP says.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_live_demo_catches_the_incidents_and_dead_letters_the_garbage(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "detector", "demo", "--workdir", str(workdir), "--speed", "200"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "daemon stopped on SIGTERM with exit code 0" in out
    assert "the daemon has committed every record" in out

    recall = re.search(r"recall (\d+)% \((\d+) of (\d+) incidents\)", out)
    assert recall is not None, out[-2000:]
    found, total = int(recall.group(2)), int(recall.group(3))
    assert total == 11
    assert found >= 9, out[-3000:]

    # Three glitched host rows and three garbage messages, each dead-lettered with its reason.
    dead = dict(re.findall(r"dead letters \((\w+)\): (\d+)", out))
    assert {k: int(v) for k, v in dead.items()} == {
        "bad_timestamp": 1,
        "invalid_json": 2,
        "missing_field": 1,
        "not_an_object": 1,
        "wrong_type": 1,
    }

    alerts = [json.loads(line) for line in (workdir / "alerts.jsonl").read_text().splitlines()]
    firing = [a for a in alerts if a["status"] == "firing"]
    assert firing
    assert len({a["id"] for a in alerts}) == len(alerts)  # no event twice on the alerts topic
    assert {a["stream"] for a in firing} == {"hosts", "payments"}
