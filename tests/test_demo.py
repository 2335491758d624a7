"""`iomt-gateway demo` end to end, as `make demo` runs it: broker, replay, alerts."""

from __future__ import annotations

import json
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
    # Raised when the rules saw the condition, on the replay's clock: never after
    # it cleared, and close behind the evidence (however far ahead the replay
    # ran while the alert manager wrote the outbox).
    with sqlite3.connect(state / "outbox.db") as db:
        rows = db.execute(
            "SELECT raised_at, cleared_at, evidence FROM alerts"
        ).fetchall()
    for raised_at, cleared_at, evidence in rows:
        assert cleared_at is None or raised_at <= cleared_at
        latest = max((e["at"] for e in json.loads(evidence)), default=None)
        assert latest is None or 0 <= raised_at - latest <= 660
    with sqlite3.connect(state / "readings.db") as db:
        stored = db.execute("SELECT count(*) FROM readings").fetchone()[0]
    assert f"readings stored: {stored} " in output


def test_demo_ends_with_a_training_round_and_a_model_swap(
    demo: tuple[str, Path],
) -> None:
    output, state = demo
    from models import INITIAL_PATH

    epochs = re.findall(r"epoch (\d)/5  loss [\d.]+  epsilon so far ([\d.]+)", output)
    assert [e for e, _ in epochs] == ["1", "2", "3", "4", "5"]
    with sqlite3.connect(state / "privacy.db") as db:
        rounds = db.execute("SELECT status, epsilon_after FROM rounds").fetchall()
    assert len(rounds) == 1 and rounds[0][0] == "spent"
    spent = rounds[0][1]
    assert 0.95 <= spent <= 1.0
    assert float(epochs[-1][1]) == pytest.approx(spent, abs=1e-3)
    assert f"epsilon spent {spent:.3f} of 8 (delta 1e-05), left {8 - spent:.3f}" in (
        output
    )
    models = state / "models"
    assert (models / "current.tflite").read_bytes() != INITIAL_PATH.read_bytes()
    assert (models / "previous.tflite").read_bytes() == INITIAL_PATH.read_bytes()
    # The windows trained on are those of the two straps' records, labelled by
    # their reference annotations (records 100 and 123: 1 and 3 ectopic beats).
    windows, positives = re.search(
        r"(\d+) windows of 2 consenting patients \((\d+) with", output
    ).groups()
    assert 3700 < int(windows) < 3800 and int(positives) == 64


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
