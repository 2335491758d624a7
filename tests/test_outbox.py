"""The alert outbox over real SQLite files."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.alarms import Category, Evidence, Priority
from gateway.notify import Alert
from gateway.outbox import Outbox
from gateway.readings import Kind


def make_alert(
    condition: str = "p-17/heart_rate/high",
    priority: Priority = Priority.HIGH,
    raised_at: float = 1_700_000_000.0,
) -> Alert:
    return Alert(
        id=uuid.uuid4().hex,
        condition=condition,
        priority=priority,
        category=Category.PHYSIOLOGICAL,
        patient_ref="p-17",
        label="Bed 4",
        room="ward-2/4",
        device_id="AA:BB:CC:DD:EE:FF",
        reason="Heart rate >= 131 bpm",
        evidence=(
            Evidence(Kind.HEART_RATE, 134.0, "bpm", raised_at - 2.0),
            Evidence(Kind.HEART_RATE, 137.0, "bpm", raised_at - 1.0),
        ),
        raised_at=raised_at,
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as box:
        yield box


def other_connection(box: Outbox) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(box.path))


def test_durability_pragmas_are_wal_and_full(outbox: Outbox) -> None:
    assert outbox.pragmas() == {"journal_mode": "wal", "synchronous": 2}
    # WAL is a property of the file: a fresh connection sees it too.
    with other_connection(outbox) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_alert_round_trips_with_its_primary_deliveries(outbox: Outbox) -> None:
    alert = make_alert()
    outbox.insert(alert, ["mqtt", "json://127.0.0.1:9/"], next_attempt_at=10.0)

    record = outbox.get(alert.id)
    assert record is not None
    assert record.alert == alert
    assert record.state == "open"
    assert (record.acked_at, record.escalated_at, record.outcome) == (None, None, None)
    assert sorted((d.target, d.stage, d.attempts) for d in record.deliveries) == [
        ("json://127.0.0.1:9/", "primary", 0),
        ("mqtt", "primary", 0),
    ]
    assert outbox.open_alert(alert.condition) == alert


def test_insert_is_committed_when_it_returns(outbox: Outbox) -> None:
    alert = make_alert()
    outbox.insert(alert, ["mqtt"], next_attempt_at=10.0)

    with other_connection(outbox) as db:
        alerts = db.execute("SELECT id FROM alerts").fetchall()
        deliveries = db.execute("SELECT alert_id, target FROM deliveries").fetchall()
    assert alerts == [(alert.id,)]
    assert deliveries == [(alert.id, "mqtt")]


def test_alert_and_deliveries_are_one_transaction(outbox: Outbox) -> None:
    alert = make_alert()
    # The second delivery row violates the primary key, after the alert row went in.
    with pytest.raises(sqlite3.IntegrityError):
        outbox.insert(alert, ["mqtt", "mqtt"], next_attempt_at=10.0)

    assert outbox.get(alert.id) is None
    with other_connection(outbox) as db:
        assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)


def test_only_one_open_alert_per_condition(outbox: Outbox) -> None:
    outbox.insert(make_alert(), ["mqtt"], next_attempt_at=10.0)
    with pytest.raises(sqlite3.IntegrityError):
        outbox.insert(make_alert(), ["mqtt"], next_attempt_at=10.0)


def test_supersede_closes_the_old_alert_in_the_same_transaction(
    outbox: Outbox,
) -> None:
    old = make_alert(priority=Priority.MEDIUM)
    new = make_alert(priority=Priority.HIGH)
    outbox.insert(old, ["mqtt"], next_attempt_at=10.0)
    outbox.insert(new, ["mqtt"], next_attempt_at=10.0, supersedes=old.id)

    assert outbox.get(old.id).state == "superseded"  # type: ignore[union-attr]
    assert outbox.open_alert(new.condition) == new


def test_clear_marks_the_open_alert_and_returns_its_id(outbox: Outbox) -> None:
    alert = make_alert()
    outbox.insert(alert, ["mqtt"], next_attempt_at=10.0)

    assert outbox.clear(alert.condition, at=123.0) == alert.id
    assert outbox.clear(alert.condition, at=124.0) is None
    record = outbox.get(alert.id)
    assert (record.state, record.cleared_at) == ("cleared", 123.0)  # type: ignore[union-attr]
    assert outbox.open_alert(alert.condition) is None


def test_due_failed_and_delivered(outbox: Outbox) -> None:
    alert = make_alert()
    outbox.insert(alert, ["mqtt", "phone"], next_attempt_at=100.0)
    assert outbox.due(now=99.0) == []
    assert outbox.next_attempt_after(99.0) == 100.0

    due = outbox.due(now=100.0)
    assert sorted(d.target for d in due) == ["mqtt", "phone"]
    assert all(d.alert == alert for d in due)
    mqtt, phone = sorted(due, key=lambda d: d.target)

    outbox.mark_delivered(mqtt.key, at=100.5)
    assert outbox.mark_failed(phone.key, next_attempt_at=102.0, error="HTTP 500") == 1
    assert outbox.due(now=101.0) == []
    assert outbox.next_attempt_after(101.0) == 102.0
    (again,) = outbox.due(now=102.0)
    assert (again.target, again.attempts, again.last_error) == ("phone", 1, "HTTP 500")


def test_pending_deliveries_survive_reopening(tmp_path: Path) -> None:
    alert = make_alert()
    with Outbox(tmp_path / "outbox.db") as box:
        box.insert(alert, ["mqtt"], next_attempt_at=5.0)

    with Outbox(tmp_path / "outbox.db") as box:
        (pending,) = box.due(now=6.0)
    assert pending.alert == alert


def test_acknowledge_is_idempotent_and_may_add_an_outcome_later(
    outbox: Outbox,
) -> None:
    alert = make_alert()
    outbox.insert(alert, ["mqtt"], next_attempt_at=10.0)

    assert outbox.acknowledge(alert.id, at=50.0, by="nurse-3", outcome=None) is True
    assert outbox.acknowledge(alert.id, at=51.0, by="nurse-4", outcome=None) is False
    assert outbox.acknowledge(alert.id, 52.0, "nurse-4", "false_alarm") is True
    assert outbox.acknowledge(alert.id, 53.0, "nurse-4", "true_alarm") is False

    record = outbox.get(alert.id)
    assert record is not None
    assert (record.acked_at, record.acked_by, record.outcome) == (
        50.0,
        "nurse-3",
        "false_alarm",
    )
    assert outbox.acknowledge("0" * 32, at=1.0, by=None, outcome=None) is False


def test_acknowledge_rejects_an_unknown_outcome(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="outcome"):
        outbox.acknowledge("0" * 32, at=1.0, by=None, outcome="maybe")


def test_escalation_candidates_and_escalate_once(outbox: Outbox) -> None:
    high = make_alert("a/high", Priority.HIGH, raised_at=100.0)
    late = make_alert("b/high", Priority.HIGH, raised_at=200.0)
    medium = make_alert("c/medium", Priority.MEDIUM, raised_at=100.0)
    acked = make_alert("d/high", Priority.HIGH, raised_at=100.0)
    for alert in (high, late, medium, acked):
        outbox.insert(alert, ["mqtt"], next_attempt_at=0.0)
    outbox.acknowledge(acked.id, at=110.0, by=None, outcome=None)

    assert outbox.unescalated_high(raised_before=150.0) == [high]
    assert outbox.escalate(high.id, ["pager"], at=160.0, next_attempt_at=7.0) is True
    assert outbox.escalate(high.id, ["pager"], at=161.0, next_attempt_at=7.0) is False
    assert outbox.unescalated_high(raised_before=150.0) == []

    escalation = [d for d in outbox.due(now=7.0) if d.stage == "escalation"]
    assert [(d.alert.id, d.target, d.alert.escalation) for d in escalation] == [
        (high.id, "pager", True)
    ]


def test_list_alerts_newest_first_with_delivery_states(outbox: Outbox) -> None:
    first = make_alert("a/x", raised_at=100.0)
    second = make_alert("b/x", raised_at=200.0)
    outbox.insert(first, ["mqtt"], next_attempt_at=0.0)
    outbox.insert(second, ["mqtt"], next_attempt_at=0.0)
    outbox.mark_delivered((first.id, "mqtt", "primary"), at=101.0)

    records = outbox.list_alerts()
    assert [r.alert.id for r in records] == [second.id, first.id]
    assert [d.delivered_at for d in records[1].deliveries] == [101.0]
    assert [d.delivered_at for d in records[0].deliveries] == [None]
