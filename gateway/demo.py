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
from collections.abc import Iterator
from pathlib import Path

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.clock import Clock, ManualClock
from gateway.config import Config, load_config
from gateway.errors import ExitCode
from gateway.litert import CURRENT
from gateway.notify import Alert, redact
from gateway.report import alert_line, offset, summary_lines
from models import INITIAL_PATH
from sensors.replay import data_path

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.toml"


HEADER = "{time}  priority subject   category       reason"


class Timeline:
    """Prints each alert once, when its first delivery succeeds.

    Args:
        start: Time zero of the printed offsets.
        precise: Offsets as minutes and seconds (real-time demos), not hours and
            minutes (replays of days).
    """

    def __init__(self, start: float, *, precise: bool = False) -> None:
        self.start = start
        self.precise = precise
        self.clock: Clock | None = None
        self.seen: set[str] = set()

    def note(self, text: str) -> None:
        """Print a line of the demo's own story, at the current time."""
        print(f"{offset(time.time() - self.start, self.precise)}  ~ {text}", flush=True)

    def delivered(self, alert: Alert, target: str) -> None:
        """`AlertManager` hook: called after each successful delivery."""
        key = f"{alert.id}/{alert.escalation}"
        if key in self.seen:
            return
        self.seen.add(key)
        line = alert_line(alert, self.start, [redact(target)], precise=self.precise)
        if alert.escalation and self.clock is not None:
            # An escalation happens later than the alert it repeats: show when.
            late = offset(self.clock.now() - self.start, self.precise)
            line = late + line[len(late) :]
        print(line, flush=True)


@contextlib.contextmanager
def demo_setting(config: Path, keep: Path | None) -> Iterator[tuple[Config, int]]:
    """A loopback mosquitto and a state folder, and `config` pointed at both.

    Yields:
        The configuration, and the broker's port.

    Raises:
        BrokerError: mosquitto is not installed or does not start.
    """
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(LocalBroker(persistence=False))
        state = keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="iomt-demo-"))
        )
        cfg = load_config(
            config, gateway={"data_dir": str(state)}, mqtt={"port": broker.port}
        )
        yield cfg, broker.port


async def run_demo(
    *, config: Path | None = None, speed: float | None = None, keep: Path | None = None
) -> int:
    """Run the demo; returns the process exit code.

    Raises:
        BrokerError: mosquitto is not installed or does not start.
    """
    with demo_setting(config or DEMO_CONFIG, keep) as (cfg, port):
        start = time.time() // 60 * 60
        timeline = Timeline(start)
        agent = Agent(cfg, clock=ManualClock(start), on_alert=timeline.delivered)
        timeline.clock = agent.clock
        _header(port, speed)
        began = time.monotonic()
        await agent.start(live_ticks=False)
        try:
            await agent.replay(start=start, speed=speed)
            await agent.deliver_pending()
            print_summary(agent, time.monotonic() - began, keep)
        finally:
            await agent.stop()
        await asyncio.to_thread(training_round, cfg)
    return ExitCode.OK


def training_round(cfg: Config) -> None:
    """The demo's epilogue: learn on the gateway from what was just replayed.

    One DP-SGD round in a child process on the straps' RR windows (labelled by
    the records' reference annotations), charged to the gateway's privacy account,
    and the new model swapped in; AUROC on the two records before and after.
    """
    from gateway.learning.train import train_round

    models = cfg.path(cfg.learning.models_dir)
    records = [
        Path(r.file).name.removesuffix("_all.csv")
        for r in cfg.replay
        if r.source == "mitdb"
    ]
    print()
    print(
        "on-device learning: one DP-SGD round (opacus) on the straps' RR windows, "
        "in a child process"
    )

    def progress(p: dict[str, float]) -> None:
        print(
            f"  epoch {int(p['epoch'])}/{cfg.learning.epochs}  loss {p['loss']:.4f}  "
            f"epsilon so far {p['epsilon']:.3f}",
            flush=True,
        )

    installed = models / CURRENT
    before = _auroc(records, installed if installed.exists() else INITIAL_PATH)
    report = train_round(cfg, on_progress=progress)
    after = _auroc(records, models / CURRENT)
    print(
        f"  {report.windows} windows of {report.patients} consenting patients "
        f"({report.positives} with a ventricular ectopic beat)\n"
        f"  epsilon spent {report.epsilon_after:.3f} of {report.epsilon_max:g} "
        f"(delta {cfg.learning.delta:g}), left {report.epsilon_left:.3f}\n"
        f"  model swapped in atomically ({report.model.name}; the previous one kept "
        f"for rollback); AUROC on the replayed records {before:.3f} -> {after:.3f}"
    )


def _header(port: int, speed: float | None) -> None:
    pace = f"{speed:g}x real time" if speed else "as fast as possible"
    print(f"iomt-gateway demo: mosquitto on 127.0.0.1:{port}, replay {pace}")
    print(HEADER.format(time="+hh:mm"))


def print_summary(agent: Agent, elapsed: float, keep: Path | None) -> None:
    """Print what was stored and what was raised for whom."""
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
    print(f"ran for {elapsed:.1f} s")
    for line in lines:
        print(line)
    if keep is not None:
        print(f"state kept in {keep} (readings.db, outbox.db)")


def _auroc(records: list[str], model: Path) -> float:
    """Overall AUROC of a model on the shipped annotations of `records`."""
    import numpy as np

    from gateway.evaluate import auroc
    from gateway.litert import Scorer
    from models import features

    scorer = Scorer(model)
    folder = data_path("mitdb/100_all.csv").parent
    parts = [features.record_dataset(folder, r) for r in records]
    scores = np.concatenate([scorer.score(x) for x, _ in parts])
    value = auroc(scores, np.concatenate([y for _, y in parts]))
    return float("nan") if value is None else value
