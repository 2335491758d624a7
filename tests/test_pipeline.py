"""The pipeline's own duties: quarantine bounded and its warnings rate-limited."""

from __future__ import annotations

import logging

import pytest

from gateway.alarms import AlarmEvent
from gateway.clock import ManualClock
from gateway.pipeline import QUARANTINE_KEEP_BYTES, Pipeline
from gateway.readings import Reading
from gateway.rules import RuleEngine


class Sink:
    def __init__(self) -> None:
        self.quarantined: list[tuple[str, str, bytes]] = []

    def put(self, reading: Reading, on_commit: object = None) -> None:
        raise AssertionError("not expected")

    def quarantine(
        self, source: str, reason: str, payload: bytes, on_commit: object = None
    ) -> None:
        self.quarantined.append((source, reason, payload))


class NoAlarms:
    async def handle(self, event: AlarmEvent) -> None:
        raise AssertionError("not expected")


def test_quarantine_keeps_a_bounded_prefix_and_warns_once_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = Sink()
    pipeline = Pipeline(sink, RuleEngine(), NoAlarms(), ManualClock())
    big = bytes(range(256)) * 400
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        for _ in range(1000):
            pipeline.quarantine("mqtt:rooms/r1/co2", "not JSON", big)
        pipeline.quarantine("mqtt:rooms/r1/co2", "payload too large", b"x")
    assert pipeline.stats.quarantined == 1001
    assert len(sink.quarantined) == 1001
    assert sink.quarantined[0][2] == big[:QUARANTINE_KEEP_BYTES]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "quarantined input from mqtt:rooms/r1/co2: not JSON",
        "quarantined input from mqtt:rooms/r1/co2: payload too large",
    ]
