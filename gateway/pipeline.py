"""The pipeline every reading goes through: store, rules, alerts.

`ingest()` is synchronous and cheap: it enqueues the reading for the store's batch
writer and runs the rules in memory. Alarm events go through one queue to the alert
manager, in order, so the outbox write (fsync) never stalls ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.alarms import AlarmEvent
from gateway.clock import Clock
from gateway.readings import Reading
from gateway.rules import RuleEngine

log = logging.getLogger(__name__)

QUARANTINE_KEEP_BYTES = 4096
QUARANTINE_LOG_EVERY_S = 60.0

Ack = Callable[[], None]


class ReadingSink(Protocol):
    """The store, as the pipeline sees it."""

    def put(self, reading: Reading, on_commit: Ack | None = None) -> None:
        """Queue a reading for the next batch."""
        ...

    def quarantine(
        self, source: str, reason: str, payload: bytes, on_commit: Ack | None = None
    ) -> None:
        """Keep rejected input with its reason."""
        ...


class Deriver(Protocol):
    """Something that makes readings from readings (the rhythm scorer)."""

    def feed(self, reading: Reading) -> Reading | None:
        """Return a derived reading when one is due."""
        ...

    def forget(self, device_id: str) -> None:
        """Drop what is kept about a device that was removed."""
        ...


class AlarmSink(Protocol):
    """The alert manager, as the pipeline sees it."""

    async def handle(self, event: AlarmEvent) -> object:
        """Turn an event into an alert in the outbox."""
        ...


class PipelineObserver(Protocol):
    """Watches what goes through, for status and metrics (times and counts only)."""

    def reading_in(self, reading: Reading, source: str) -> None:
        """A reading was taken in from `source` ("ble", "mqtt", "replay")."""
        ...

    def quarantined_in(self, source: str, reason: str) -> None:
        """An input from `source` was quarantined for `reason`."""
        ...


@dataclass(slots=True)
class PipelineStats:
    """Counters for status and metrics."""

    readings: int = 0
    quarantined: int = 0
    events: int = 0


class Pipeline:
    """Readings in; stored, evaluated, and alarm events handed on in order.

    Args:
        store: Where readings and quarantined input go.
        rules: The rule engine.
        alarms: Where alarm events go (the alert manager).
        clock: The time readings are taken to arrive at.
        deriver: Makes derived readings (rhythm scores) that are stored and
            evaluated like measured ones.
    """

    def __init__(
        self,
        store: ReadingSink,
        rules: RuleEngine,
        alarms: AlarmSink,
        clock: Clock,
        deriver: Deriver | None = None,
    ) -> None:
        self.store = store
        self.deriver = deriver
        self.rules = rules
        self.alarms = alarms
        self.clock = clock
        self.stats = PipelineStats()
        self.observers: list[PipelineObserver] = []
        self._events: asyncio.Queue[AlarmEvent] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._quarantine_log: dict[str, tuple[int, float]] = {}

    def start(self) -> None:
        """Start the task that hands events to the alert manager."""
        self._task = asyncio.create_task(self._dispatch(), name="pipeline-dispatch")

    async def stop(self) -> None:
        """Hand over the events still queued, then stop."""
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain(self) -> None:
        """Wait until every event so far has reached the alert manager."""
        await self._events.join()

    def ingest(
        self, reading: Reading, on_commit: Ack | None = None, *, source: str = "ble"
    ) -> None:
        """Take one reading: queue it for the store, evaluate the rules.

        `source` names the transport for metrics; wearables' links leave it "ble".
        """
        self.stats.readings += 1
        for observer in self.observers:
            observer.reading_in(reading, source)
        self.store.put(reading, on_commit)
        self._emit(self.rules.evaluate(reading, self.clock.now()))
        derived = self.deriver.feed(reading) if self.deriver is not None else None
        if derived is not None:
            self.ingest(derived, source="model")

    def quarantine(
        self, source: str, reason: str, payload: bytes, on_commit: Ack | None = None
    ) -> None:
        """Keep rejected input with its reason; it is counted, never dropped.

        At most `QUARANTINE_KEEP_BYTES` of a payload are kept, so that a flood of
        oversized garbage cannot fill the card; a warning is logged for the first
        of each reason, then at most once a minute per reason with a count.
        """
        self.stats.quarantined += 1
        for observer in self.observers:
            observer.quarantined_in(source, reason)
        self._warn_quarantined(source, reason)
        kept = payload[:QUARANTINE_KEEP_BYTES]
        self.store.quarantine(source, reason, kept, on_commit)

    def _warn_quarantined(self, source: str, reason: str) -> None:
        now = time.monotonic()
        seen, last = self._quarantine_log.get(reason, (0, -math.inf))
        if now - last < QUARANTINE_LOG_EVERY_S:
            self._quarantine_log[reason] = (seen + 1, last)
            return
        self._quarantine_log[reason] = (0, now)
        more = f" ({seen} more like it since the last warning)" if seen else ""
        log.warning("quarantined input from %s: %s%s", source, reason, more)

    def tick(self, now: float | None = None) -> None:
        """Let the rules find silent streams as of `now` (the clock's time)."""
        at = self.clock.now() if now is None else now
        self._emit(self.rules.tick(at), at)

    def link_state(
        self, device_id: str, patient_ref: str | None, connected: bool
    ) -> None:
        """A wearable's link went down or came back (technical alarm after a delay)."""
        self._emit(
            self.rules.link_state(device_id, patient_ref, connected, self.clock.now())
        )

    def retire(self, device_id: str) -> None:
        """Stop watching a device removed on purpose (end of a recording)."""
        self._emit(self.rules.retire(device_id))
        if self.deriver is not None:
            self.deriver.forget(device_id)

    def _emit(self, events: list[AlarmEvent], now: float | None = None) -> None:
        # Stamped now: the alert manager may get to an event later (an outbox
        # fsync, a replay running ahead), and the alert's times must not drift.
        detected_at = self.clock.now() if now is None else now
        for event in events:
            self.stats.events += 1
            self._events.put_nowait(replace(event, detected_at=detected_at))

    async def _dispatch(self) -> None:
        while True:
            event = await self._events.get()
            try:
                await self._hand_over(event)
            finally:
                self._events.task_done()

    async def _hand_over(self, event: AlarmEvent) -> None:
        # An alarm must not be lost: if the outbox cannot take it (disk full,
        # read-only mount), keep trying; later events wait behind it, in order.
        delay = 0.5
        while True:
            try:
                await self.alarms.handle(event)
                return
            except Exception:
                log.exception("alarm event not stored; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
