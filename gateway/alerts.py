"""The alert manager: alarm events in, durable alerts out to the ERT.

Every alert is committed to the outbox (``synchronous=FULL``) before anyone is told
about it; a delivery task then works through the outbox's pending deliveries, retrying
each failed one with exponential backoff. Because the pending rows are the only queue,
an alert written just before a crash or power cut is delivered after the restart.

Two clocks are in play on purpose. Alert lifecycle times (raised, acknowledged,
escalated) follow the injected `Clock`, which replay drives. Delivery retries are real
network events, so they follow the wall clock and are stored as absolute epochs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.alarms import Action, AlarmEvent
from gateway.clock import Clock
from gateway.errors import DeliveryError
from gateway.notify import Alert, Notifier, redact
from gateway.outbox import OUTCOMES, Delivery, Outbox
from gateway.paho import MqttMessage

log = logging.getLogger(__name__)

T = TypeVar("T")

_ALERT_ID = re.compile(r"[0-9a-f]{32}")
_IDLE_POLL_S = 60.0
"""Longest sleep of the delivery task with nothing due (a safety net, not a need)."""


@dataclass(slots=True)
class AlertStats:
    """Counters since start, for the status command and tests."""

    raised: int = 0
    suppressed: int = 0
    superseded: int = 0
    cleared: int = 0
    delivered: int = 0
    failed_attempts: int = 0
    acknowledged: int = 0
    acks_malformed: int = 0
    acks_unknown: int = 0
    escalated: int = 0


class AlertObserver(Protocol):
    """Watches alerts for metrics: what happened, to which alert, at which target."""

    def alert_event(self, what: str, alert: Alert, target: str | None = None) -> None:
        """`what` is "raised", "delivered", "acknowledged" or "escalated"."""
        ...


def backoff_delay(
    attempts: int,
    initial_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the `attempts`-th consecutive failure.

    The base doubles from `initial_s` up to `max_s`; the wait is drawn between half
    the base and the base, so gateways that lost the same push service do not all
    retry in step when it comes back.

    >>> backoff_delay(1, 1.0, 300.0, rand=lambda: 1.0)
    1.0
    >>> backoff_delay(4, 1.0, 300.0, rand=lambda: 0.0)
    4.0
    >>> backoff_delay(30, 1.0, 300.0, rand=lambda: 1.0)
    300.0
    """
    base = min(max_s, initial_s * 2 ** min(attempts - 1, 32))
    return base / 2 + rand() * base / 2


class AlertManager:
    """Turns alarm events into alerts and gets them to the ERT.

    Args:
        outbox: The durable outbox.
        notifiers: Notifier per target, or a function choosing one for a target.
        targets: Where every alert goes first (``"mqtt"`` or apprise URLs).
        escalation_targets: Where a high alert goes when nobody acknowledged it.
        clock: The agent's clock (raise, acknowledge and escalation times).
        labels: What responders call a patient, from the pseudonymous ref.
        escalate_after_s: Unacknowledged time before a high alert is escalated.
        retry_initial_s: First retry delay after a failed delivery.
        retry_max_s: Longest retry delay.
        on_alert: Called with the alert and target after each delivery.

    Raises:
        ValueError: `notifiers` is a mapping that lacks one of the targets.
    """

    def __init__(
        self,
        outbox: Outbox,
        notifiers: Mapping[str, Notifier] | Callable[[str], Notifier],
        targets: Sequence[str],
        escalation_targets: Sequence[str],
        clock: Clock,
        labels: Callable[[str | None], str | None] = lambda ref: None,
        escalate_after_s: float = 120.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 300.0,
        on_alert: Callable[[Alert, str], None] | None = None,
    ) -> None:
        self._outbox = outbox
        self._notifier_for = _notifier_lookup(
            notifiers, [*targets, *escalation_targets]
        )
        self._targets = tuple(targets)
        self._escalation_targets = tuple(escalation_targets)
        self._clock = clock
        self._labels = labels
        self._escalate_after_s = escalate_after_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._on_alert = on_alert
        self.stats = AlertStats()
        self.observers: list[AlertObserver] = []
        self._wake = asyncio.Event()
        self._raise_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._ack_tasks: set[asyncio.Task[bool]] = set()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering, beginning with whatever a previous run left pending."""
        if self._task is not None:
            return
        self._wake.set()
        self._task = asyncio.create_task(self._deliver_forever(), name="alert-delivery")

    async def stop(self) -> None:
        """Stop delivering; pending deliveries stay in the outbox for the next run."""
        tasks = [*self._inflight.values(), *self._ack_tasks]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._inflight.clear()

    # -- events ---------------------------------------------------------------

    async def handle(self, event: AlarmEvent) -> Alert | None:
        """Raise or clear an alert for a rules event.

        Returns:
            The alert raised, or None for a clear or a suppressed repeat.
        """
        async with self._raise_lock:
            if event.action is Action.CLEAR:
                await self._clear(event)
                return None
            return await self._raise(event)

    async def _raise(self, event: AlarmEvent) -> Alert | None:
        current = await self._db(self._outbox.open_alert, event.condition)
        if current is not None and current.priority >= event.priority:
            self.stats.suppressed += 1
            return None

        # Raised at the gateway's time, not the sensor's: a sensor's clock may be
        # off, and escalation counts from when the ERT could first have known.
        alert = dataclasses.replace(
            Alert.from_event(event, uuid.uuid4().hex, self._labels(event.patient_ref)),
            raised_at=_gateway_time(event, self._clock),
        )
        supersedes = None if current is None else current.id
        # Committed (fsync'd) before the delivery task can see it.
        await self._db(
            self._outbox.insert, alert, self._targets, time.time(), supersedes
        )
        self.stats.raised += 1
        if supersedes is not None:
            self.stats.superseded += 1
            log.info("alert %s supersedes %s", alert.id, supersedes)
        log.info("alert %s raised, priority %s", alert.id, alert.priority.label)
        self._observe("raised", alert)
        self._wake.set()
        return alert

    async def _clear(self, event: AlarmEvent) -> None:
        cleared = await self._db(
            self._outbox.clear, event.condition, _gateway_time(event, self._clock)
        )
        if cleared is not None:
            self.stats.cleared += 1
            log.info("alert %s cleared", cleared)

    # -- acknowledgement ------------------------------------------------------

    async def acknowledge(
        self, alert_id: str, by: str | None, outcome: str | None
    ) -> bool:
        """Record that a responder acknowledged an alert (idempotent).

        Returns:
            True if this changed the alert (first ack, or a first outcome).

        Raises:
            ValueError: `outcome` is not "true_alarm", "false_alarm" or None.
        """
        changed = await self._db(
            self._outbox.acknowledge, alert_id, self._clock.now(), by, outcome
        )
        if changed:
            self.stats.acknowledged += 1
            log.info("alert %s acknowledged", alert_id)
            if self.observers:
                record = await self._db(self._outbox.get, alert_id)
                self._observe("acknowledged", record.alert if record else None)
        elif await self._db(self._outbox.get, alert_id) is None:
            self.stats.acks_unknown += 1
            log.warning("acknowledgement for an unknown alert id %.40r", alert_id)
        return changed

    def ack_handler(self) -> Callable[[MqttMessage], None]:
        """A handler for ``{prefix}/ack/+``: the last topic level is the alert id.

        The payload is empty or a JSON object with optional "by" and "outcome".
        """
        return self._on_ack_message

    def _on_ack_message(self, message: MqttMessage) -> None:
        parsed = _parse_ack(message)
        if parsed is None:
            self.stats.acks_malformed += 1
            log.warning(
                "ignored a malformed acknowledgement (%d bytes)", len(message.payload)
            )
            return
        task = asyncio.create_task(self.acknowledge(*parsed), name="alert-ack")
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Task[bool]) -> None:
        self._ack_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("recording an acknowledgement failed", exc_info=task.exception())

    # -- escalation -----------------------------------------------------------

    async def tick(self) -> None:
        """Escalate high alerts left unacknowledged for `escalate_after_s`.

        Call it periodically (every second or so). Each alert escalates once.
        """
        if not self._escalation_targets:
            return
        now = self._clock.now()
        overdue = await self._db(
            self._outbox.unescalated_high, now - self._escalate_after_s
        )
        for alert in overdue:
            await self._escalate(alert, now)

    async def _escalate(self, alert: Alert, now: float) -> None:
        escalated = await self._db(
            self._outbox.escalate,
            alert.id,
            self._escalation_targets,
            now,
            time.time(),
        )
        if escalated:
            self.stats.escalated += 1
            log.info("alert %s escalated, priority %s", alert.id, alert.priority.label)
            self._observe("escalated", alert)
            self._wake.set()

    # -- delivery -------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while True:
            try:
                await self._deliver_pass()
            except Exception:
                # The outbox failed (disk full, card gone): alerts must not stop
                # for good, so keep trying; the rows are still there.
                log.exception("alert delivery pass failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _deliver_pass(self) -> None:
        # Cleared before reading the outbox, so no wake-up is ever lost.
        self._wake.clear()
        for delivery in await self._db(self._outbox.due, time.time()):
            self._spawn(delivery)
        await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        now = time.time()
        next_at = await self._db(self._outbox.next_attempt_after, now)
        timeout = _IDLE_POLL_S if next_at is None else min(_IDLE_POLL_S, next_at - now)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # arrives as the event is set (CPython gh-86296), and stop() would hang.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self._wake.wait()

    @property
    def sending(self) -> int:
        """Delivery attempts under way (each finishes with its on_alert call)."""
        return len(self._inflight)

    def _spawn(self, delivery: Delivery) -> None:
        # A slow or hung target must not hold up the next alert: one task each.
        if delivery.key in self._inflight:
            return
        task = asyncio.create_task(
            self._attempt(delivery), name=f"alert-send-{delivery.alert.id[:8]}"
        )
        self._inflight[delivery.key] = task
        task.add_done_callback(lambda t: self._attempt_done(delivery.key, t))

    def _attempt_done(
        self, key: tuple[str, str, str], task: asyncio.Task[None]
    ) -> None:
        self._inflight.pop(key, None)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("alert delivery attempt crashed", exc_info=task.exception())

    async def _attempt(self, delivery: Delivery) -> None:
        alert, target = delivery.alert, delivery.target
        try:
            await self._notifier_for(target).send(alert, target)
        except DeliveryError as exc:
            await self._failed(delivery, str(exc))
            return
        except Exception as exc:
            # A notifier bug still counts as a failed attempt, or the row would be
            # retried at once, forever.
            log.exception("notifier for %s raised unexpectedly", redact(target))
            await self._failed(delivery, type(exc).__name__)
            return
        await self._db(self._outbox.mark_delivered, delivery.key, time.time())
        self.stats.delivered += 1
        log.info(
            "alert %s delivered to %s%s, priority %s",
            alert.id,
            redact(target),
            " (escalation)" if alert.escalation else "",
            alert.priority.label,
        )
        self._observe("delivered", alert, target)
        self._notify_delivered(alert, target)

    async def _failed(self, delivery: Delivery, error: str) -> None:
        self.stats.failed_attempts += 1
        attempts = delivery.attempts + 1
        delay = backoff_delay(attempts, self._retry_initial_s, self._retry_max_s)
        next_at = time.time() + delay
        await self._db(self._outbox.mark_failed, delivery.key, next_at, error)
        log.warning(
            "alert %s to %s: attempt %d failed (%s); retrying in %.3g s",
            delivery.alert.id,
            redact(delivery.target),
            attempts,
            error,
            delay,
        )

    def _observe(
        self, what: str, alert: Alert | None, target: str | None = None
    ) -> None:
        if alert is None:
            return
        for observer in self.observers:
            try:
                observer.alert_event(what, alert, target)
            except Exception:
                # Metrics must never stand between an alarm and the ERT.
                log.exception("alert observer failed on %s", what)

    def _notify_delivered(self, alert: Alert, target: str) -> None:
        if self._on_alert is None:
            return
        try:
            self._on_alert(alert, target)
        except Exception:
            # A faulty observer must not stop deliveries.
            log.exception("on_alert callback failed for alert %s", alert.id)

    @staticmethod
    async def _db(fn: Callable[..., T], *args: Any) -> T:
        # Outbox writes fsync; keep them off the event loop.
        return await asyncio.to_thread(fn, *args)


def _notifier_lookup(
    notifiers: Mapping[str, Notifier] | Callable[[str], Notifier],
    targets: Sequence[str],
) -> Callable[[str], Notifier]:
    if not isinstance(notifiers, Mapping):
        return notifiers
    missing = [redact(t) for t in targets if t not in notifiers]
    if missing:
        raise ValueError(f"no notifier for target(s): {', '.join(missing)}")
    return notifiers.__getitem__


def _gateway_time(event: AlarmEvent, clock: Clock) -> float:
    """When the rules produced the event, on the gateway's clock."""
    return clock.now() if event.detected_at is None else event.detected_at


def _parse_ack(message: MqttMessage) -> tuple[str, str | None, str | None] | None:
    """(alert id, by, outcome) from an ack message, or None if it is malformed."""
    alert_id = message.topic.rsplit("/", 1)[-1]
    if not _ALERT_ID.fullmatch(alert_id):
        return None
    if not message.payload.strip():
        return alert_id, None, None
    try:
        body = json.loads(message.payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    by, outcome = body.get("by"), body.get("outcome")
    if by is not None and not isinstance(by, str):
        return None
    if outcome is not None and outcome not in OUTCOMES:
        return None
    return alert_id, by, outcome
