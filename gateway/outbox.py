"""The alert outbox: every alert and its deliveries, durable before any is sent.

The outbox is its own SQLite file, apart from the readings store, because it runs
with ``synchronous=FULL``: an alert committed here survives a power cut, and a
restarted agent delivers whatever the last one did not (see `Outbox.due`).

Methods block on fsync; the alert manager calls them through `asyncio.to_thread`.
One connection is shared by those worker threads, serialised by a lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from gateway.alarms import Category, Evidence, Priority
from gateway.errors import StoreError
from gateway.notify import Alert
from gateway.readings import Kind

OUTCOMES = ("true_alarm", "false_alarm")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    condition TEXT NOT NULL,
    priority INTEGER NOT NULL,
    category TEXT NOT NULL,
    patient_ref TEXT,
    label TEXT,
    room TEXT,
    device_id TEXT,
    reason TEXT NOT NULL,
    evidence TEXT NOT NULL,
    raised_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'cleared', 'superseded')),
    cleared_at REAL,
    acked_at REAL,
    acked_by TEXT,
    outcome TEXT CHECK (outcome IN ('true_alarm', 'false_alarm')),
    escalated_at REAL
);
-- At most one open alert per condition: de-duplication holds even across restarts.
CREATE UNIQUE INDEX IF NOT EXISTS alerts_open_condition
    ON alerts (condition) WHERE state = 'open';
CREATE TABLE IF NOT EXISTS deliveries (
    alert_id TEXT NOT NULL REFERENCES alerts (id),
    target TEXT NOT NULL,
    stage TEXT NOT NULL CHECK (stage IN ('primary', 'escalation')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    last_error TEXT,
    PRIMARY KEY (alert_id, target, stage)
);
CREATE INDEX IF NOT EXISTS deliveries_pending
    ON deliveries (next_attempt_at) WHERE delivered_at IS NULL;
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One alert to one target at one stage, as stored.

    Attributes:
        alert: The alert (with `escalation` set for the escalation stage).
        target: Notifier target (``"mqtt"`` or an apprise URL).
        stage: ``"primary"`` or ``"escalation"``.
        attempts: Failed attempts so far.
        next_attempt_at: Wall-clock epoch of the next attempt.
        delivered_at: Wall-clock epoch of delivery, None while pending.
        last_error: The last failure's message, None if none.
    """

    alert: Alert
    target: str
    stage: str
    attempts: int
    next_attempt_at: float
    delivered_at: float | None = None
    last_error: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """The row's primary key."""
        return (self.alert.id, self.target, self.stage)


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert with its lifecycle and delivery states, for the CLI and tests."""

    alert: Alert
    state: str
    cleared_at: float | None
    acked_at: float | None
    acked_by: str | None
    outcome: str | None
    escalated_at: float | None
    deliveries: tuple[Delivery, ...]


class Outbox:
    """The durable alert outbox over one SQLite file (WAL, ``synchronous=FULL``).

    Args:
        path: The SQLite file; created with its schema if missing.

    Raises:
        StoreError: The file cannot be opened or initialised.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: fsync the WAL on every commit, so a committed alert is on the card.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"alert outbox {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def pragmas(self) -> dict[str, object]:
        """The durability settings in force (journal mode, synchronous level)."""
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
            sync = self._db.execute("PRAGMA synchronous").fetchone()[0]
        return {"journal_mode": mode, "synchronous": sync}

    # -- raise, clear, acknowledge -------------------------------------------

    def insert(
        self,
        alert: Alert,
        targets: Sequence[str],
        next_attempt_at: float,
        supersedes: str | None = None,
    ) -> None:
        """Store an open alert and its primary deliveries in one transaction.

        Args:
            alert: The new alert.
            targets: Where it goes first.
            next_attempt_at: Wall-clock epoch of the first attempt.
            supersedes: Id of an open alert for the same condition that this one
                replaces (marked 'superseded' in the same transaction).

        Raises:
            sqlite3.IntegrityError: Another alert is open for the condition, or a
                target is listed twice; nothing is stored.
        """
        with self._transaction() as db:
            if supersedes is not None:
                db.execute(
                    "UPDATE alerts SET state = 'superseded' "
                    "WHERE id = ? AND state = 'open'",
                    (supersedes,),
                )
            db.execute(
                "INSERT INTO alerts (id, condition, priority, category, patient_ref, "
                "label, room, device_id, reason, evidence, raised_at, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open')",
                _alert_row(alert),
            )
            _insert_deliveries(db, alert.id, targets, "primary", next_attempt_at)

    def open_alert(self, condition: str) -> Alert | None:
        """The open alert for `condition`, if there is one."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM alerts WHERE condition = ? AND state = 'open'",
                (condition,),
            ).fetchone()
        return None if row is None else _alert_from_row(row)

    def clear(self, condition: str, at: float) -> str | None:
        """Mark the open alert for `condition` cleared; return its id, if any."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE alerts SET state = 'cleared', cleared_at = ? "
                "WHERE condition = ? AND state = 'open' RETURNING id",
                (at, condition),
            ).fetchone()
        return None if row is None else str(row[0])

    def acknowledge(
        self, alert_id: str, at: float, by: str | None, outcome: str | None
    ) -> bool:
        """Record an acknowledgement; return whether anything changed.

        The first acknowledgement wins. A later one may still add the outcome
        (true or false alarm) if none was recorded: it labels on-device learning.

        Raises:
            ValueError: `outcome` is not one of `OUTCOMES` or None.
        """
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        with self._transaction() as db:
            acked = db.execute(
                "UPDATE alerts SET acked_at = ?, acked_by = ?, outcome = ? "
                "WHERE id = ? AND acked_at IS NULL",
                (at, by, outcome, alert_id),
            ).rowcount
            if acked or outcome is None:
                return bool(acked)
            return bool(
                db.execute(
                    "UPDATE alerts SET outcome = ? WHERE id = ? AND outcome IS NULL",
                    (outcome, alert_id),
                ).rowcount
            )

    # -- escalation -----------------------------------------------------------

    def unescalated_high(self, raised_before: float) -> list[Alert]:
        """Open high-priority alerts raised before then, unacknowledged, unescalated."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM alerts "
                "WHERE state = 'open' AND priority >= ? AND raised_at <= ? "
                "AND acked_at IS NULL AND escalated_at IS NULL ORDER BY raised_at",
                (int(Priority.HIGH), raised_before),
            ).fetchall()
        return [_alert_from_row(row) for row in rows]

    def escalate(
        self, alert_id: str, targets: Sequence[str], at: float, next_attempt_at: float
    ) -> bool:
        """Mark an alert escalated and add its escalation deliveries, once only.

        Returns:
            True if this call escalated it; False if it already was (or is acked).
        """
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE alerts SET escalated_at = ? "
                "WHERE id = ? AND escalated_at IS NULL AND acked_at IS NULL",
                (at, alert_id),
            ).rowcount
            if changed:
                _insert_deliveries(db, alert_id, targets, "escalation", next_attempt_at)
        return bool(changed)

    # -- delivery -------------------------------------------------------------

    def due(self, now: float, limit: int = 100) -> list[Delivery]:
        """Undelivered deliveries whose next attempt is at or before `now`.

        Deliveries are attempted whatever the alert's state since: an alert
        cleared or superseded before it got through was still news to the ERT.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT a.*, d.target, d.stage, d.attempts, d.next_attempt_at, "
                "d.delivered_at, d.last_error "
                "FROM deliveries d JOIN alerts a ON a.id = d.alert_id "
                "WHERE d.delivered_at IS NULL AND d.next_attempt_at <= ? "
                "ORDER BY a.priority DESC, d.next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_delivery_of(_alert_from_row(row), row) for row in rows]

    def pending(self) -> int:
        """Deliveries not yet made."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE delivered_at IS NULL"
            ).fetchone()
        return int(row[0])

    def next_attempt_after(self, now: float) -> float | None:
        """The earliest pending attempt strictly after `now`, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM deliveries "
                "WHERE delivered_at IS NULL AND next_attempt_at > ?",
                (now,),
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def mark_delivered(self, key: tuple[str, str, str], at: float) -> None:
        """Record that a delivery got through."""
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET delivered_at = ? "
                "WHERE alert_id = ? AND target = ? AND stage = ?",
                (at, *key),
            )

    def mark_failed(
        self, key: tuple[str, str, str], next_attempt_at: float, error: str
    ) -> int:
        """Record a failed attempt; return the number of attempts so far."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, "
                "last_error = ? WHERE alert_id = ? AND target = ? AND stage = ? "
                "RETURNING attempts",
                (next_attempt_at, error, *key),
            ).fetchone()
        return 0 if row is None else int(row[0])

    # -- reading back ---------------------------------------------------------

    def get(self, alert_id: str) -> AlertRecord | None:
        """One alert with its lifecycle and deliveries."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM alerts WHERE id = ?", (alert_id,)
            ).fetchone()
            return None if row is None else self._record_from_row(row)

    def list_alerts(self, limit: int = 1000) -> list[AlertRecord]:
        """The latest alerts, newest first, each with its delivery states."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM alerts ORDER BY raised_at DESC LIMIT ?", (limit,)
            ).fetchall()
            return [self._record_from_row(row) for row in rows]

    def _record_from_row(self, row: sqlite3.Row) -> AlertRecord:
        alert = _alert_from_row(row)
        deliveries = self._db.execute(
            "SELECT * FROM deliveries WHERE alert_id = ? ORDER BY stage DESC, target",
            (alert.id,),
        ).fetchall()
        return AlertRecord(
            alert=alert,
            state=row["state"],
            cleared_at=row["cleared_at"],
            acked_at=row["acked_at"],
            acked_by=row["acked_by"],
            outcome=row["outcome"],
            escalated_at=row["escalated_at"],
            deliveries=tuple(_delivery_of(alert, d) for d in deliveries),
        )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a transaction never fails
        # half-way on a lock upgrade.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def _insert_deliveries(
    db: sqlite3.Connection,
    alert_id: str,
    targets: Sequence[str],
    stage: str,
    next_attempt_at: float,
) -> None:
    db.executemany(
        "INSERT INTO deliveries (alert_id, target, stage, attempts, next_attempt_at) "
        "VALUES (?, ?, ?, 0, ?)",
        [(alert_id, target, stage, next_attempt_at) for target in targets],
    )


def _alert_row(alert: Alert) -> tuple[object, ...]:
    evidence = [
        {"kind": str(e.kind), "value": e.value, "unit": e.unit, "at": e.measured_at}
        for e in alert.evidence
    ]
    return (
        alert.id,
        alert.condition,
        int(alert.priority),
        str(alert.category),
        alert.patient_ref,
        alert.label,
        alert.room,
        alert.device_id,
        alert.reason,
        json.dumps(evidence),
        alert.raised_at,
    )


def _alert_from_row(row: sqlite3.Row) -> Alert:
    evidence = tuple(
        Evidence(Kind(e["kind"]), e["value"], e["unit"], e["at"])
        for e in json.loads(row["evidence"])
    )
    return Alert(
        id=row["id"],
        condition=row["condition"],
        priority=Priority(row["priority"]),
        category=Category(row["category"]),
        patient_ref=row["patient_ref"],
        label=row["label"],
        room=row["room"],
        device_id=row["device_id"],
        reason=row["reason"],
        evidence=evidence,
        raised_at=row["raised_at"],
    )


def _delivery_of(alert: Alert, row: sqlite3.Row) -> Delivery:
    return Delivery(
        alert=replace(alert, escalation=row["stage"] == "escalation"),
        target=row["target"],
        stage=row["stage"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        delivered_at=row["delivered_at"],
        last_error=row["last_error"],
    )
