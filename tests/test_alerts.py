"""The alert manager with in-memory notifiers, a manual clock and a real outbox."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.alarms import Action, AlarmEvent, Category, Evidence, Priority
from gateway.alerts import AlertManager, backoff_delay
from gateway.clock import ManualClock
from gateway.notify import Alert, MemoryNotifier, iso_utc, redact
from gateway.outbox import AlertRecord, Outbox
from gateway.paho import MqttMessage
from gateway.readings import Kind
from tests.waiting import until

T0 = 1_700_000_000.0
HR_HIGH = "p-17/heart_rate/high"


def event(
    condition: str = HR_HIGH,
    priority: Priority = Priority.HIGH,
    action: Action = Action.RAISE,
    at: float = T0,
) -> AlarmEvent:
    return AlarmEvent(
        condition=condition,
        action=action,
        category=Category.PHYSIOLOGICAL,
        priority=priority,
        reason="Heart rate >= 131 bpm",
        at=at,
        patient_ref="p-17",
        room="ward-2/4",
        device_id="AA:BB:CC:DD:EE:FF",
        evidence=(Evidence(Kind.HEART_RATE, 137.0, "bpm", at - 1.0),),
        detected_at=at,  # as the pipeline stamps it: the gateway's clock then
    )


class Harness:
    """A manager over a real outbox, two primary targets and one escalation target."""

    def __init__(self, path: Path, **options: object) -> None:
        self.outbox = Outbox(path)
        self.clock = ManualClock(T0)
        self.mqtt = MemoryNotifier()
        self.phone = MemoryNotifier()
        self.pager = MemoryNotifier()
        self.delivered: list[tuple[str, str]] = []
        self.manager = AlertManager(
            self.outbox,
            {"mqtt": self.mqtt, "phone": self.phone, "pager": self.pager},
            targets=["mqtt", "phone"],
            escalation_targets=["pager"],
            clock=self.clock,
            labels={"p-17": "Bed 4"}.get,
            on_alert=lambda alert, target: self.delivered.append((alert.id, target)),
            **options,  # type: ignore[arg-type]
        )

    def run(self, scenario: Callable[[Harness], Awaitable[None]]) -> None:
        async def main() -> None:
            await self.manager.start()
            try:
                await scenario(self)
            finally:
                await self.manager.stop()

        asyncio.run(main())


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "outbox.db", retry_initial_s=0.05, retry_max_s=0.2)
    yield h
    h.outbox.close()


def test_raise_is_stored_then_delivered_to_every_target(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        alert = await h.manager.handle(event())
        assert alert is not None
        await until(lambda: len(h.delivered) == 2)

        assert sorted(h.delivered) == [(alert.id, "mqtt"), (alert.id, "phone")]
        assert [a for a, _ in h.mqtt.sent] == [alert]
        assert alert.label == "Bed 4"
        assert alert.priority is Priority.HIGH
        await until(lambda: all(d.delivered_at for d in record(h, alert).deliveries))

    harness.run(scenario)
    assert harness.manager.stats.raised == 1
    assert harness.manager.stats.delivered == 2


def record(h: Harness, alert: Alert) -> AlertRecord:
    found = h.outbox.get(alert.id)
    assert found is not None
    return found


def test_repeat_raise_of_an_open_condition_is_suppressed(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        first = await h.manager.handle(event())
        assert await h.manager.handle(event(at=T0 + 5)) is None
        assert await h.manager.handle(event(priority=Priority.MEDIUM)) is None
        await until(lambda: len(h.delivered) == 2)

        assert [r.alert.id for r in h.outbox.list_alerts()] == [first.id]  # type: ignore[union-attr]

    harness.run(scenario)
    assert harness.manager.stats.suppressed == 2
    assert harness.manager.stats.raised == 1


def test_clear_then_raise_gives_a_new_alert(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        first = await h.manager.handle(event())
        assert await h.manager.handle(event(action=Action.CLEAR, at=T0 + 30)) is None
        second = await h.manager.handle(event(at=T0 + 60))
        assert first is not None and second is not None
        assert second.id != first.id
        await until(lambda: len(h.delivered) == 4)

        assert (record(h, first).state, record(h, first).cleared_at) == (
            "cleared",
            T0 + 30,
        )
        assert record(h, second).state == "open"

    harness.run(scenario)
    assert harness.manager.stats.cleared == 1
    # A clear is not news on the phone: only the two raises were sent.
    assert len(harness.phone.sent) == 2


def test_upgrade_supersedes_the_open_alert(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        medium = await h.manager.handle(event(priority=Priority.MEDIUM))
        high = await h.manager.handle(event(priority=Priority.HIGH, at=T0 + 10))
        assert medium is not None and high is not None
        await until(lambda: len(h.delivered) == 4)

        assert record(h, medium).state == "superseded"
        assert record(h, high).state == "open"
        assert h.outbox.open_alert(HR_HIGH) == high

    harness.run(scenario)
    assert harness.manager.stats.superseded == 1


def test_failed_target_is_retried_with_backoff_then_delivered(
    harness: Harness,
) -> None:
    harness.phone.fail_remaining = 2

    async def scenario(h: Harness) -> None:
        started = time.time()
        alert = await h.manager.handle(event())
        await until(lambda: len(h.phone.sent) == 1)
        took = time.time() - started

        (phone,) = [d for d in record(h, alert).deliveries if d.target == "phone"]
        assert phone.attempts == 2
        assert phone.last_error == "delivery to phone failed: told to fail"
        assert phone.delivered_at is not None
        # Two waits: >= 0.025 s then >= 0.05 s (half the doubling base, jitter).
        assert took >= 0.075

    harness.run(scenario)
    assert harness.phone.attempts == 3
    assert harness.mqtt.attempts == 1
    assert harness.manager.stats.failed_attempts == 2


def test_unacknowledged_high_alert_escalates_exactly_once(
    harness: Harness,
) -> None:
    async def scenario(h: Harness) -> None:
        alert = await h.manager.handle(event())
        h.clock.advance(119.0)
        await h.manager.tick()
        assert h.pager.sent == []

        h.clock.advance(2.0)
        await h.manager.tick()
        await h.manager.tick()
        await until(lambda: len(h.pager.sent) == 1)
        await asyncio.sleep(0.1)

        (sent, target) = h.pager.sent[0]
        assert (sent.id, sent.escalation, target) == (alert.id, True, "pager")
        assert len(h.pager.sent) == 1
        assert record(h, alert).escalated_at == T0 + 121.0
        # The primary targets are not told again.
        assert len(h.phone.sent) == 1

    harness.run(scenario)
    assert harness.manager.stats.escalated == 1


def test_acknowledged_alert_is_not_escalated(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        alert = await h.manager.handle(event())
        h.clock.advance(30.0)
        assert await h.manager.acknowledge(alert.id, "nurse-3", None) is True
        assert await h.manager.acknowledge(alert.id, "nurse-3", None) is False
        h.clock.advance(600.0)
        await h.manager.tick()

        assert record(h, alert).acked_at == T0 + 30.0
        assert record(h, alert).escalated_at is None

    harness.run(scenario)
    assert harness.pager.attempts == 0
    assert harness.manager.stats.acknowledged == 1


def test_medium_alert_is_never_escalated(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        await h.manager.handle(event(priority=Priority.MEDIUM))
        h.clock.advance(3600.0)
        await h.manager.tick()

    harness.run(scenario)
    assert harness.pager.attempts == 0
    assert harness.manager.stats.escalated == 0


def ack_message(alert_id: str, payload: bytes) -> MqttMessage:
    return MqttMessage(f"ert/ack/{alert_id}", payload, 1, 1, False, False)


def test_ack_messages_are_recorded_and_malformed_ones_counted(
    harness: Harness,
) -> None:
    async def scenario(h: Harness) -> None:
        alert = await h.manager.handle(event())
        assert alert is not None
        handler = h.manager.ack_handler()
        for bad in (b"{not json", b"[1]", b'{"outcome": "maybe"}', b'{"by": 7}'):
            handler(ack_message(alert.id, bad))
        handler(ack_message("not-an-alert-id", b""))
        handler(ack_message("f" * 32, b""))  # well formed, but no such alert
        handler(ack_message(alert.id, b'{"by": "nurse-3", "outcome": "true_alarm"}'))
        await until(lambda: h.manager.stats.acknowledged == 1)
        await until(lambda: h.manager.stats.acks_unknown == 1)

        stored = record(h, alert)
        assert (stored.acked_by, stored.outcome) == ("nurse-3", "true_alarm")

    harness.run(scenario)
    assert harness.manager.stats.acks_malformed == 5


def test_pending_deliveries_are_picked_up_on_start(tmp_path: Path) -> None:
    first = Harness(tmp_path / "outbox.db")

    async def raise_without_delivering() -> Alert | None:
        return await first.manager.handle(event())

    alert = asyncio.run(raise_without_delivering())
    first.outbox.close()
    assert alert is not None

    second = Harness(tmp_path / "outbox.db")

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.delivered) == 2)

    second.run(scenario)
    second.outbox.close()
    assert sorted(second.delivered) == [(alert.id, "mqtt"), (alert.id, "phone")]


def test_mapping_without_a_target_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box, pytest.raises(ValueError, match="no"):
        AlertManager(
            box, {"mqtt": MemoryNotifier()}, ["mqtt", "phone"], [], ManualClock()
        )


@given(
    attempts=st.integers(min_value=1, max_value=200),
    rand=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_doubles_within_jitter_and_is_capped(
    attempts: int, rand: float
) -> None:
    delay = backoff_delay(attempts, 1.0, 300.0, rand=lambda: rand)
    base = min(300.0, 2.0 ** (attempts - 1))
    assert base / 2 <= delay <= base


def test_alert_json_schema() -> None:
    alert = Alert.from_event(event(), "ab" * 16, label="Bed 4")
    document = json.loads(alert.to_json())

    assert document == {
        "id": "ab" * 16,
        "priority": "high",
        "category": "physiological",
        "patient_ref": "p-17",
        "label": "Bed 4",
        "room": "ward-2/4",
        "device_id": "AA:BB:CC:DD:EE:FF",
        "reason": "Heart rate >= 131 bpm",
        "evidence": [
            {
                "kind": "heart_rate",
                "value": 137.0,
                "unit": "bpm",
                "measured_at": "2023-11-14T22:13:19.000Z",
            }
        ],
        "raised_at": "2023-11-14T22:13:20.000Z",
        "condition": HR_HIGH,
        "escalation": False,
    }
    assert iso_utc(T0) == document["raised_at"]


def test_phone_text_names_the_label_not_the_pseudonym() -> None:
    labelled = Alert.from_event(event(), "ab" * 16, label="Bed 4")
    unlabelled = Alert.from_event(event(), "cd" * 16, label=None)

    assert labelled.title() == "HIGH: Bed 4"
    assert "p-17" not in labelled.title() + labelled.body()
    assert "heart_rate 137 bpm" in labelled.body()
    assert "ab" * 16 in labelled.body()
    assert unlabelled.title() == "HIGH: p-17"


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ("mqtt", "mqtt"),
        ("json://127.0.0.1:8080/hook?token=s3cret", "json://127.0.0.1"),
        ("ntfys://ntfy.example.org/ward-2-secret-topic", "ntfys://ntfy.example.org"),
        ("pover://userkey@apptoken", "pover://"),
        ("tgram://123456:ABCdef/987", "tgram://"),
    ],
)
def test_redact_keeps_no_tokens(target: str, shown: str) -> None:
    assert redact(target) == shown


def test_docstring_examples() -> None:
    import doctest

    import gateway.alerts
    import gateway.notify

    for module in (gateway.alerts, gateway.notify):
        assert doctest.testmod(module).failed == 0
