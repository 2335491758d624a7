"""`iomt-gateway demo` end to end, as `make demo` runs it: broker, replay, alerts."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    state = tmp_path_factory.mktemp("demo")
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--keep", str(state)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, state


def timeline(output: str) -> list[list[str]]:
    rows = [
        line for line in output.splitlines() if re.match(r"^\+\d\d:\d\d  [A-Z]", line)
    ]
    return [re.split(r"\s{2,}", row) for row in rows]


def test_demo_prints_the_alerts_the_recordings_call_for(demo: tuple[str, Path]) -> None:
    output, _ = demo
    rows = timeline(output)
    subjects = {row[2] for row in rows}
    assert subjects == {"ICU 3", "room-12"}  # Bed 1 (record 100), Bed 2: nothing
    assert "HIGH" not in {row[1] for row in rows}
    icu_technical = [r for r in rows if r[2] == "ICU 3" and r[3] == "technical"]
    assert len(icu_technical) == 14
    assert all("sensor off" in r[4] for r in icu_technical)
    assert "  Bed 1    none" in output and "  Bed 2    none" in output
    assert "quarantined input: 0" in output
    assert len(rows) == int(re.search(r"alerts raised: (\d+)", output).group(1))


def test_demo_timeline_matches_its_outbox_and_store(demo: tuple[str, Path]) -> None:
    output, state = demo
    with sqlite3.connect(state / "outbox.db") as db:
        alerts = db.execute("SELECT count(*) FROM alerts").fetchone()[0]
        undelivered = db.execute(
            "SELECT count(*) FROM deliveries WHERE delivered_at IS NULL"
        ).fetchone()[0]
    assert alerts == len(timeline(output)) and undelivered == 0
    with sqlite3.connect(state / "readings.db") as db:
        stored = db.execute("SELECT count(*) FROM readings").fetchone()[0]
    assert f"readings stored: {stored} " in output


def test_ble_demo_shows_every_alarm_path(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--ble", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reasons = [row[4] for row in timeline(run.stdout) if row[2] == "Bed 5"]
    assert reasons[0].startswith("Heart rate high: 138 bpm")
    assert reasons[1].startswith("ESCALATED Heart rate high: 138 bpm")
    assert set(reasons[2:]) == {
        "Heart rate: sensor off: the device reports no measurement",
        "Heart rate: no skin contact",
        "disconnected for 10 s",
        "no data from the device for 10 s",
    }
    with sqlite3.connect(tmp_path / "readings.db") as db:
        kinds = dict(db.execute("SELECT kind, count(*) FROM readings GROUP BY kind"))
    # The strap's data resumed after its drop: readings from after the reconnect.
    assert kinds["heart_rate"] > 60 and kinds["rr_interval"] > 60
    assert kinds["battery"] >= 2  # read on each connection
