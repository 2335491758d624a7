"""`iomt-gateway demo`: real recordings through the live code path, alerts printed.

The demo starts a mosquitto on a free loopback port, points a gateway with the
configuration in `config/demo.toml` at it, and replays MIT-BIH records 100 and 123
(as the 0x2A37 notifications a chest strap sends), 32 hours of MIMIC-III bedside
monitor trends, and a day of a real room's sensors (published to the broker as room
sensors would). Time is virtual: the replay drives the gateway's clock, so a day of
data takes seconds and every persistence delay and stale timer still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.errors import ExitCode
from gateway.notify import Alert, redact
from gateway.report import alert_line, summary_lines

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
DELIVERY_WAIT_S = 30.0


class Timeline:
    """Prints each alert once, when its first delivery succeeds."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.seen: set[str] = set()

    def delivered(self, alert: Alert, target: str) -> None:
        """`AlertManager` hook: called after each successful delivery."""
        key = f"{alert.id}/{alert.escalation}"
        if key in self.seen:
            return
        self.seen.add(key)
        print(alert_line(alert, self.start, [redact(target)]), flush=True)


async def run_demo(
    *, config: Path | None = None, speed: float | None = None, keep: Path | None = None
) -> int:
    """Run the demo; returns the process exit code.

    Raises:
        BrokerError: mosquitto is not installed or does not start.
    """
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(LocalBroker(persistence=False))
        state = keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="iomt-demo-"))
        )
        cfg = load_config(
            config or DEMO_CONFIG,
            gateway={"data_dir": str(state)},
            mqtt={"port": broker.port},
        )
        start = time.time() // 60 * 60
        timeline = Timeline(start)
        agent = Agent(cfg, clock=ManualClock(start), on_alert=timeline.delivered)
        _header(broker.port, speed)
        began = time.monotonic()
        await agent.start(live_ticks=False)
        try:
            await agent.replay(start=start, speed=speed)
            await _all_delivered(agent)
            _summary(agent, time.monotonic() - began, keep)
        finally:
            await agent.stop()
    return ExitCode.OK


def _header(port: int, speed: float | None) -> None:
    pace = f"{speed:g}x real time" if speed else "as fast as possible"
    print(f"iomt-gateway demo: mosquitto on 127.0.0.1:{port}, replay {pace}")
    print("time    priority subject   category       reason")


async def _all_delivered(agent: Agent) -> None:
    # Done when the outbox has nothing pending and every delivery it records has
    # also been reported to the timeline (the manager marks the row first).
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while time.monotonic() < deadline:
        states = [
            d.delivered_at is not None
            for r in agent.outbox.list_alerts(limit=100_000)
            for d in r.deliveries
        ]
        if all(states) and agent.alerts.stats.delivered >= len(states):
            return
        await asyncio.sleep(0.1)
    log.warning("some alerts were still undelivered after %.0f s", DELIVERY_WAIT_S)


def _summary(agent: Agent, elapsed: float, keep: Path | None) -> None:
    cfg = agent.config
    subjects = [p.label or p.ref for p in cfg.patients]
    subjects += [r.room for r in cfg.replay if r.room]
    lines = summary_lines(
        agent.outbox.list_alerts(limit=100_000),
        agent.store.counts_by_kind(),
        sum(agent.store.quarantine_counts().values()),
        subjects,
    )
    print()
    print(f"replayed in {elapsed:.1f} s")
    for line in lines:
        print(line)
    if keep is not None:
        print(f"state kept in {keep} (readings.db, outbox.db)")
