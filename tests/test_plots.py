"""The report pictures, drawn from a state folder the real agent filled.

The demo's MIMIC-III patient is replayed through the agent (real mosquitto, virtual
time); the rendered figure's alert markers must sit at the outbox's raise times, and
its shaded spans must cover every minute the monitor reported "sensor off".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.learning.privacy import PrivacyAccount
from gateway.outbox import Outbox
from gateway.plots import (
    gather_patient,
    parse_since,
    render_budget,
    render_patient,
    to_series,
    x_of,
)
from gateway.readings import TECHNICAL, Kind, Quality, Reading
from gateway.store import ReadingStore

MIMIC_CONFIG = """
[gateway]
id = "plot-gw"
data_dir = "{data_dir}"

[store]
retention_days = 3650

[mqtt]
port = {port}
client_id = "plot-gw"

[rules]
persistence_s = 60
clear_after_s = 120
min_score = 1
technical_persistence_s = 60
stale_after_s = 120

[[patients]]
ref = "p-c45b19"
label = "ICU 3"

[[replay]]
source = "mimic"
file = "data:mimic3wdb_s00001_numerics_per_minute.csv"
device = "monitor-s00001"
patient = "p-c45b19"
"""
REF = "p-c45b19"


@pytest.fixture(scope="module")
def mimic_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory after the demo's MIMIC recording went through the agent."""
    tmp = tmp_path_factory.mktemp("mimic")
    with LocalBroker(persistence=False) as broker:
        config = tmp / "gateway.toml"
        config.write_text(MIMIC_CONFIG.format(data_dir=tmp / "state", port=broker.port))
        cfg = load_config(config)
        start = time.time() // 60 * 60

        async def run() -> None:
            agent = Agent(cfg, clock=ManualClock(start))
            await agent.start(live_ticks=False)
            try:
                await agent.replay(start=start, speed=None)
                await agent.deliver_pending()
            finally:
                await agent.stop()

        asyncio.run(run())
    return tmp / "state"


@pytest.mark.broker
@pytest.mark.slow
def test_report_marks_alerts_at_outbox_times_and_shades_sensor_off(
    mimic_state: Path, tmp_path: Path
) -> None:
    with Outbox(mimic_state / "outbox.db") as outbox:
        records = outbox.list_alerts(limit=10_000)
    store = ReadingStore(mimic_state / "readings.db")
    report = gather_patient(store, records, REF, None, label="ICU 3")
    out = tmp_path / "report.png"
    fig = render_patient(report, out)

    # Every alert of the outbox is one marker, at its raise time.
    markers = [
        line
        for ax in fig.axes
        for line in ax.get_lines()
        if (line.get_gid() or "").startswith("alerts-")
    ]
    drawn = np.sort(np.concatenate([line.get_xdata() for line in markers]))
    raised = np.sort(x_of([r.alert.raised_at for r in records]))
    assert len(records) >= 10
    np.testing.assert_allclose(drawn, raised, rtol=0, atol=1e-9)
    gids = {line.get_gid() for line in markers}
    assert gids == {"alerts-low-technical", "alerts-low-physiological"}

    # The monitor's "sensor off" minutes all fall inside the shaded spans.
    for kind in (Kind.HEART_RATE, Kind.SPO2):
        off = [
            r.measured_at
            for r in store.readings(patient_ref=REF, kind=kind)
            if r.quality & TECHNICAL
        ]
        assert off, f"the recording has {kind} sensor-off minutes"
        spans = shaded(fig, f"sensor-off-{kind}")
        for t in x_of(off):
            assert any(lo <= t <= hi for lo, hi in spans), kind

    # Technical alarms are bars from raise to clear in the alert strip.
    (bars,) = [c for c in fig.axes[0].collections if c.get_gid() == "technical-alarm"]
    assert isinstance(bars, PolyCollection)
    technical = [r for r in records if str(r.alert.category) == "technical"]
    assert len(bars.get_paths()) == len(technical)
    assert out.stat().st_size < 200_000


def shaded(fig, gid: str) -> list[tuple[float, float]]:
    patches = [p for ax in fig.axes for p in ax.patches if p.get_gid() == gid]
    assert all(isinstance(p, Rectangle) for p in patches)
    return [(p.get_x(), p.get_x() + p.get_width()) for p in patches]


def test_sensor_off_spans_run_to_the_next_clean_reading() -> None:
    def hr(t: float, value: float) -> Reading:
        quality = Quality.NO_READING if value == 0 else Quality.OK
        return Reading("m", Kind.HEART_RATE, value, t, quality=quality)

    series = to_series([hr(0, 70), hr(60, 0), hr(120, 0), hr(180, 72), hr(240, 0)])
    assert series.sensor_off == [(60.0, 180.0), (240.0, 300.0)]
    assert list(series.times) == [0.0, 180.0]
    assert list(series.values) == [70.0, 72.0]


def test_report_without_scores_or_rr_says_so(tmp_path: Path) -> None:
    with ReadingStore(tmp_path / "r.db") as store:
        store.put(Reading("m", Kind.SPO2, 97, 1000.0, patient_ref="p-1"))
    report = gather_patient(ReadingStore(tmp_path / "r.db"), [], "p-1", None)
    fig = render_patient(report)
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert "no model scores stored" in texts
    assert "no RR intervals in this window (no HRV)" in texts
    (line,) = [
        ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "series-spo2"
    ]
    assert list(line.get_ydata()) == [97.0]


def test_budget_figure_draws_each_round_against_the_cap(tmp_path: Path) -> None:
    account = PrivacyAccount(tmp_path / "privacy.db", epsilon_max=8.0, delta=1e-5)
    for _ in range(3):
        account.finish(account.reserve(1.1, 0.01, 500), 500)
    rounds = account.history()
    account.close()
    fig = render_budget(rounds, 8.0, 1e-5, tmp_path / "budget.png")
    lines: dict[str, Line2D] = {
        ln.get_gid(): ln for ln in fig.axes[0].get_lines() if ln.get_gid()
    }
    spent = lines["epsilon-spent"].get_ydata()
    assert list(spent) == [r.epsilon_after for r in rounds]
    assert spent[0] < spent[1] < spent[2] < 8.0
    assert list(lines["epsilon-cap"].get_ydata()) == [8.0, 8.0]
    assert (tmp_path / "budget.png").stat().st_size > 0


def test_since_takes_durations() -> None:
    assert parse_since("90m", 10_000.0) == 10_000.0 - 5400
    assert parse_since("all", 0.0) is None
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday", 0.0)
