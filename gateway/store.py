"""The durable reading store: one SQLite file in WAL mode, written in batches.

Every reading and every rejected input goes through here. Writes never run on the
event loop: `put()`, `put_many()` and `quarantine()` only enqueue, and one writer
thread, which owns the only write connection, commits what is waiting as one
transaction per batch. A batch is committed when `batch_size` items are waiting or
`flush_interval` seconds after the first of them was queued, whichever comes first;
but as soon as the batch holds an item with an `on_commit` callback, the writer
commits what is queued right away (group commit). Someone waits on such an item (an
MQTT ack, which the broker's inflight window is short of), and under load the next
batch gathers by itself during this one's fsync, so waiting out the interval would
only cap throughput at the inflight window per interval.

Durability is what the MQTT adapter relies on: an item's `on_commit` callback runs
only after its batch is committed with `synchronous=FULL`, so a message acknowledged
to the broker survives a power cut (see the SQLite docs, "PRAGMA synchronous": in WAL
mode FULL syncs the WAL on every commit; NORMAL may lose the last commits). If a
commit fails (disk full, I/O error, a lock held too long), the same batch is retried
with backoff and no callback runs until it succeeds; unacknowledged MQTT messages are
then redelivered by the broker, which is why duplicates are removed here.

Reads open their own read-only connection per call; WAL lets them run beside the
writer without blocking it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gateway.clock import Clock, SystemClock
from gateway.errors import StoreCorruptError, StoreError
from gateway.readings import Kind, Quality, Reading

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""Stored in `PRAGMA user_version`; `_MIGRATIONS[n]` takes version n to n + 1."""

_SCHEMA_V1 = (
    """CREATE TABLE readings (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        value REAL,
        measured_at REAL NOT NULL,
        received_at REAL NOT NULL,
        patient_ref TEXT,
        room TEXT,
        quality INTEGER NOT NULL DEFAULT 0,
        UNIQUE (device_id, kind, measured_at)
    )""",
    "CREATE INDEX readings_patient ON readings (patient_ref, kind, measured_at)",
    "CREATE INDEX readings_room ON readings (room, kind, measured_at)",
    "CREATE INDEX readings_received ON readings (received_at)",
    """CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        source TEXT NOT NULL,
        reason TEXT NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE INDEX quarantine_received ON quarantine (received_at)",
)
# v2: identities of messages whose readings the gateway stamped (see `Delivery`).
_SCHEMA_V2 = (
    """CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        key BLOB NOT NULL UNIQUE,
        received_at REAL NOT NULL
    )""",
)
# v3: label spans for on-device learning, from beat annotations (evaluation, the
# demo) or from the ERT's verdict when acknowledging an alert (a live gateway).
_SCHEMA_V3 = (
    """CREATE TABLE labels (
        id INTEGER PRIMARY KEY,
        patient_ref TEXT NOT NULL,
        start REAL NOT NULL,
        end REAL NOT NULL,
        positive INTEGER NOT NULL,
        source TEXT NOT NULL,
        alert_id TEXT,
        created_at REAL NOT NULL,
        CHECK (end >= start),
        UNIQUE (patient_ref, start, end, source)
    )""",
    "CREATE INDEX labels_patient ON labels (patient_ref, start)",
)
_MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3)

DELIVERIES_KEPT = 100_000
"""Message identities kept for recognising redeliveries. Only a message committed
but not yet acknowledged can come back, and a broker holds at most 65535 of those
per session (the packet-id space), so older identities are pruned."""
_PRUNE_EVERY_BATCHES = 256

# The UNIQUE key makes a redelivered QoS 1 message a no-op: the first copy wins.
_INSERT_READING = (
    "INSERT OR IGNORE INTO readings (device_id, kind, value, measured_at,"
    " received_at, patient_ref, room, quality) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# A first delivery records (or refreshes) its identity; a redelivery is kept only
# if its identity was not recorded, i.e. its first copy never got committed.
_RECORD_DELIVERY = "INSERT OR REPLACE INTO deliveries (key, received_at) VALUES (?, ?)"
_CHECK_DELIVERY = "INSERT OR IGNORE INTO deliveries (key, received_at) VALUES (?, ?)"
_PRUNE_DELIVERIES = (
    "DELETE FROM deliveries WHERE id <= (SELECT max(id) FROM deliveries) - ?"
)
_INSERT_QUARANTINE = (
    "INSERT INTO quarantine (received_at, source, reason, payload) VALUES (?, ?, ?, ?)"
)
_INSERT_LABEL = (
    "INSERT OR REPLACE INTO labels (patient_ref, start, end, positive, source,"
    " alert_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_LABELS = (
    "SELECT patient_ref, start, end, positive, source, alert_id FROM labels"
    " WHERE patient_ref = ? ORDER BY start, id"
)
_SELECT_READINGS = (
    "SELECT device_id, kind, value, measured_at, patient_ref, room, quality"
    " FROM readings"
)
# Filter name -> SQL fragment; only these constants ever reach the query text.
_READING_FILTERS = {
    "patient_ref": "patient_ref = ?",
    "room": "room = ?",
    "kind": "kind = ?",
    "since": "measured_at >= ?",
    "until": "measured_at < ?",
}

_WAL_SIZE_LIMIT = 16 * 1024 * 1024
"""Bytes the WAL is truncated to after a checkpoint, so it cannot fill an SD card."""
_FIRST_RETRY_DELAY = 0.05
_MAX_RETRY_DELAY = 5.0
_ATTEMPTS_WHEN_CLOSING = 3
"""Once close() is waiting, a failing batch gets this many more tries, then is
dropped unacknowledged (the broker redelivers it after the restart)."""
_SECONDS_PER_DAY = 86_400.0

_ReadingRow = tuple[str, str, float, float, float, str | None, str | None, int]
_QuarantineRow = tuple[float, str, str, bytes]


@dataclass
class StoreStats:
    """Counters kept by the writer thread since the store was created.

    Attributes:
        committed: Readings newly stored.
        duplicates: Readings ignored because their (device, kind, measured_at)
            was already stored.
        quarantined: Rejected inputs stored in the quarantine table.
        batches: Transactions committed.
    """

    committed: int = 0
    duplicates: int = 0
    quarantined: int = 0
    batches: int = 0


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """One rejected input, kept with the reason it was rejected.

    Attributes:
        id: Row id, increasing with arrival.
        received_at: When the gateway received it (clock time).
        source: Where it came from (MQTT topic, BLE device, replay file).
        reason: Why it was rejected.
        payload: The exact bytes received; left out of `repr` so it is not logged.
    """

    id: int
    received_at: float
    source: str
    reason: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LabelSpan:
    """A stretch of a patient's time known to be irregular rhythm, or known not to be.

    Attributes:
        patient_ref: Pseudonymous patient ref.
        start: Span start (epoch seconds, inclusive).
        end: Span end (inclusive).
        positive: True for a ventricular ectopic beat or a confirmed alert; False
            for stretches known to be free of them (an annotated record, a false
            alarm).
        source: "annotation" (reference beat labels) or "ert" (an alert's outcome).
        alert_id: The alert whose outcome this is, for "ert" labels.
    """

    patient_ref: str
    start: float
    end: float
    positive: bool
    source: str
    alert_id: str | None = None


@dataclass(slots=True)
class Delivery:
    """An `on_commit` callback that also names the message its readings came from.

    Readings a sensor sent without a time are stamped at arrival, so a redelivered
    copy of the message (after a crash between commit and acknowledgement) would
    not collide on (device, kind, measured_at). Its identity does: it is stored in
    the same transaction as the readings, and a redelivered copy whose identity is
    already stored adds nothing (its readings count as duplicates).

    Attributes:
        on_commit: Called once the readings are durable (or recognised as stored).
        key: The message's identity, the same for every copy of it.
        redelivered: The broker flagged this copy as a possible redelivery.
    """

    on_commit: Callable[[], None]
    key: bytes
    redelivered: bool = False

    def __call__(self) -> None:
        """Run `on_commit`: the store calls this once the readings are durable."""
        self.on_commit()


# Items on the writer's queue.


@dataclass(slots=True)
class _Write:
    readings: list[_ReadingRow]
    quarantine: _QuarantineRow | None
    on_commit: Callable[[], None] | None
    queued_at: float
    delivery: Delivery | None = None

    @property
    def size(self) -> int:
        return len(self.readings) + (self.quarantine is not None)


@dataclass(slots=True)
class _Barrier:
    """Settled once everything queued before it is committed (or dropped)."""

    done: concurrent.futures.Future[None]


@dataclass(slots=True)
class _Call:
    """A function to run on the write connection, in the writer thread."""

    fn: Callable[[sqlite3.Connection], Any]
    done: concurrent.futures.Future[Any]


class _Stop:
    pass


_Item = _Write | _Barrier | _Call | _Stop


class ReadingStore:
    """Durable, deduplicating store of readings and quarantined inputs.

    Use as `with ReadingStore(path) as store: ...` or call `open()` and `close()`.
    The enqueueing methods are thread-safe and never block, so they may be called
    from the asyncio loop or any thread.

    Attributes:
        path: The SQLite database file.
        stats: Counters kept by the writer thread.
    """

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        retention_days: float | None = None,
        clock: Clock = SystemClock(),  # noqa: B008 - stateless, safe to share
        busy_timeout: float = 5.0,
    ) -> None:
        if batch_size < 1 or flush_interval < 0 or busy_timeout < 0:
            raise ValueError("batch_size >= 1, flush_interval and busy_timeout >= 0")
        self.path = Path(path)
        self.stats = StoreStats()
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retention_days = retention_days
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._writer: _Writer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ReadingStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Lifecycle

    def open(self) -> None:
        """Create or migrate the schema and start the writer thread.

        Raises:
            StoreError: The file cannot be opened, is not a database, refuses WAL
                mode, or has a newer schema than this gateway knows.
        """
        if self._thread is not None:
            return
        conn = _open_write_connection(self.path, self._busy_timeout)
        self._writer = _Writer(
            conn, self._queue, self.stats, self._batch_size, self._flush_interval
        )
        # Daemon: a process that exits without close() must not hang on this thread;
        # what it had not committed was not acknowledged either.
        self._thread = threading.Thread(
            target=self._writer.run, name="store-writer", daemon=True
        )
        self._thread.start()
        log.info("reading store open at %s (schema v%d)", self.path, SCHEMA_VERSION)

    def close(self) -> None:
        """Commit everything queued, stop the writer thread and close the file."""
        if self._writer is None or self._thread is None:
            return
        self._writer.closing.set()
        self._queue.put(_Stop())
        self._thread.join()
        self._writer = self._thread = None
        log.info(
            "reading store closed: %d stored, %d duplicates, %d quarantined, "
            "%d batches",
            self.stats.committed,
            self.stats.duplicates,
            self.stats.quarantined,
            self.stats.batches,
        )

    # Writes (enqueue only)

    def put(
        self, reading: Reading, on_commit: Callable[[], None] | None = None
    ) -> None:
        """Queue one reading; `on_commit` runs in the writer thread once it is durable.

        Raises:
            StoreError: The store is not open.
            ValueError: `measured_at` is not a finite number or `kind` is unknown.
        """
        self.put_many((reading,), on_commit)

    def put_many(
        self,
        readings: Sequence[Reading],
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        """Queue readings to be committed together; `on_commit` runs once after.

        Raises:
            StoreError: The store is not open.
            ValueError: A `measured_at` is not finite or a `kind` is unknown.
        """
        received_at = self._clock.now()
        rows = [_reading_row(reading, received_at) for reading in readings]
        delivery = on_commit if isinstance(on_commit, Delivery) else None
        self._enqueue(_Write(rows, None, on_commit, time.monotonic(), delivery))

    def quarantine(
        self,
        source: str,
        reason: str,
        payload: bytes,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        """Queue a rejected input, kept with its reason and exact bytes.

        Raises:
            StoreError: The store is not open.
        """
        row = (self._clock.now(), str(source), str(reason), bytes(payload))
        self._enqueue(_Write([], row, on_commit, time.monotonic()))

    async def flush(self) -> None:
        """Return once everything queued before this call is committed.

        Raises:
            StoreError: The store is not open, or queued items were dropped.
        """
        await asyncio.wrap_future(self._barrier())

    def flush_sync(self, timeout: float | None = None) -> None:
        """Block until everything queued before this call is committed.

        Raises:
            StoreError: The store is not open, or queued items were dropped.
            TimeoutError: Not committed within `timeout` seconds (it still may be).
        """
        self._barrier().result(timeout)

    def apply_retention(self, timeout: float | None = None) -> int:
        """Delete readings and quarantined inputs older than `retention_days`.

        Age is counted from `received_at`, not `measured_at`: readings stamped with
        monotonic time before the clock synced, or replayed from old recordings,
        would otherwise be deleted as soon as they arrive. `secure_delete` zeroes
        the freed pages and a truncating checkpoint then empties the WAL, so no
        copy of the deleted rows stays in the files. Blocks the caller: call it
        from a worker thread, not the event loop.

        Returns:
            The number of rows deleted (0 when no retention is configured).

        Raises:
            StoreError: The store is not open or the delete failed.
            TimeoutError: The writer did not get to it within `timeout` seconds.
        """
        if self._retention_days is None:
            return 0
        cutoff = self._clock.now() - self._retention_days * _SECONDS_PER_DAY
        deleted: int = self._call(partial(_delete_older_than, cutoff=cutoff), timeout)
        log.info(
            "retention removed %d rows older than %g days",
            deleted,
            self._retention_days,
        )
        return deleted

    def add_labels(
        self, spans: Sequence[LabelSpan], timeout: float | None = None
    ) -> None:
        """Store label spans (a span stored again with its key is replaced).

        Blocks until committed: call it from a worker thread, not the event loop.

        Raises:
            StoreError: The store is not open or the write failed.
            ValueError: A span ends before it starts.
        """
        now = self._clock.now()
        rows = [_label_row(span, now) for span in spans]
        self._call(partial(_insert_labels, rows=rows), timeout)

    def pragmas(self) -> dict[str, int | str]:
        """The write connection's settings as SQLite reports them (for checks).

        Raises:
            StoreError: The store is not open.
        """
        return self._call(_read_pragmas, None)

    @property
    def backlog(self) -> int:
        """Items queued and not yet taken by the writer (approximate)."""
        return self._queue.qsize()

    def _enqueue(self, item: _Item) -> None:
        writer = self._writer  # read once: close() may clear it meanwhile
        if writer is None or not writer.running:
            raise StoreError(f"reading store {self.path} is not open")
        self._queue.put(item)

    def _barrier(self) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._enqueue(_Barrier(done))
        return done

    def _call(
        self, fn: Callable[[sqlite3.Connection], Any], timeout: float | None
    ) -> Any:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._enqueue(_Call(fn, done))
        try:
            return done.result(timeout)
        except sqlite3.Error as exc:
            raise StoreError(f"reading store {self.path}: {exc}") from exc

    # Reads (separate read-only connections)

    def readings(
        self,
        *,
        patient_ref: str | None = None,
        room: str | None = None,
        kind: Kind | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Reading]:
        """Stored readings matching every given filter, ordered by `measured_at`.

        `since` is inclusive and `until` exclusive, so adjacent windows do not
        overlap.

        Raises:
            StoreError: The database cannot be read.
        """
        given = {
            "patient_ref": patient_ref,
            "room": room,
            "kind": None if kind is None else Kind(kind).value,
            "since": since,
            "until": until,
        }
        given = {name: value for name, value in given.items() if value is not None}
        where = " AND ".join(_READING_FILTERS[name] for name in given) or "1"
        # Only constant fragments are joined; every value is a bound parameter.
        sql = f"{_SELECT_READINGS} WHERE {where} ORDER BY measured_at, id"
        with self._reader() as conn:
            rows = conn.execute(sql, tuple(given.values())).fetchall()
        return [_reading_from_row(row) for row in rows]

    def labels(self, patient_ref: str) -> list[LabelSpan]:
        """A patient's label spans, ordered by start.

        Raises:
            StoreError: The database cannot be read.
        """
        with self._reader() as conn:
            rows = conn.execute(_SELECT_LABELS, (patient_ref,)).fetchall()
        return [
            LabelSpan(ref, start, end, bool(positive), source, alert_id)
            for ref, start, end, positive, source, alert_id in rows
        ]

    def count(self) -> int:
        """Number of stored readings.

        Raises:
            StoreError: The database cannot be read.
        """
        with self._reader() as conn:
            return conn.execute("SELECT count(*) FROM readings").fetchone()[0]

    def counts_by_kind(self) -> dict[str, int]:
        """Number of stored readings per kind.

        Raises:
            StoreError: The database cannot be read.
        """
        with self._reader() as conn:
            rows = conn.execute("SELECT kind, count(*) FROM readings GROUP BY kind")
            return dict(rows.fetchall())

    def quarantined(self, limit: int = 100) -> list[QuarantineEntry]:
        """The most recently quarantined inputs, newest first.

        Raises:
            StoreError: The database cannot be read.
        """
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT id, received_at, source, reason, payload FROM quarantine"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [QuarantineEntry(*row) for row in rows]

    def quarantine_counts(self) -> dict[str, int]:
        """Number of quarantined inputs per reason.

        Raises:
            StoreError: The database cannot be read.
        """
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT reason, count(*) FROM quarantine GROUP BY reason"
            )
            return dict(rows.fetchall())

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout)
        except sqlite3.Error as exc:
            raise StoreError(_open_hint(self.path, exc)) from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"reading store {self.path} failed: {exc}") from exc
        finally:
            conn.close()


class _Writer:
    """Owns the write connection; commits queued items in batches, in one thread."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        items: queue.SimpleQueue[_Item],
        stats: StoreStats,
        batch_size: int,
        flush_interval: float,
    ) -> None:
        self.running = True
        self.closing = threading.Event()
        self._conn = conn
        self._items = items
        self._stats = stats
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._failing = False

    def run(self) -> None:
        """Commit batches until a stop item arrives, then close the connection."""
        try:
            while True:
                batch, control = self._collect()
                committed = self._commit_with_retry(batch) if batch else True
                if isinstance(control, _Stop):
                    break
                if control is not None:
                    self._handle(control, committed)
        except Exception:
            # A bug, not an SQLite condition (those are handled below): stop taking
            # work so callers see StoreError instead of waiting forever.
            log.exception("reading store writer stopped unexpectedly")
        finally:
            self.running = False
            self._conn.close()
            self._fail_leftovers()

    def _collect(self) -> tuple[list[_Write], _Item | None]:
        """Wait for work, then gather writes until the batch is full or due.

        A control item (flush barrier, call, stop) ends the batch so it is
        answered without waiting for the flush interval; so does an item with an
        `on_commit` callback, once what is already queued has joined the batch.
        """
        batch: list[_Write] = []
        size = 0
        awaited = False
        item = self._items.get()
        while isinstance(item, _Write):
            batch.append(item)
            size += item.size
            awaited = awaited or item.on_commit is not None
            if size >= self._batch_size:
                return batch, None
            due_in = 0.0 if awaited else self._due_in(batch[0])
            item = self._next_item(due_in)
            if item is None:
                return batch, None
        return batch, item

    def _due_in(self, first: _Write) -> float:
        return first.queued_at + self._flush_interval - time.monotonic()

    def _next_item(self, due_in: float) -> _Item | None:
        """The next item if it arrives within `due_in` seconds, else None."""
        try:
            if due_in > 0:
                return self._items.get(timeout=due_in)
            # Past due, or awaited (group commit): take only what is already
            # waiting, so a backlog built up while committing goes out in full
            # batches and a lone item goes out after one fsync.
            return self._items.get_nowait()
        except queue.Empty:
            return None

    def _handle(self, control: _Barrier | _Call, committed: bool) -> None:
        if isinstance(control, _Barrier):
            error = None if committed else StoreError("queued items were dropped")
            _settle(control.done, None, error)
            return
        try:
            result = control.fn(self._conn)
        except Exception as exc:
            _settle(control.done, None, exc)
        else:
            _settle(control.done, result, None)

    def _commit_with_retry(self, batch: list[_Write]) -> bool:
        """Commit `batch`, retrying transient failures; True once committed."""
        for attempt in itertools.count(1):
            try:
                self._commit(batch)
            except sqlite3.OperationalError as exc:
                self._note_failure(exc, attempt)
            except sqlite3.Error as exc:
                # Not transient (corruption, constraint bug): retrying cannot help.
                log.error(
                    "store rejected a batch of %d items (%s); dropped unacknowledged",
                    len(batch),
                    exc,
                )
                return False
            else:
                self._note_success(attempt)
                _run_callbacks(batch)
                return True
            if self.closing.is_set() and attempt >= _ATTEMPTS_WHEN_CLOSING:
                log.error(
                    "closing: dropped %d uncommitted items, not acknowledged",
                    len(batch),
                )
                return False
            self.closing.wait(min(_FIRST_RETRY_DELAY * 2**attempt, _MAX_RETRY_DELAY))
        raise AssertionError("unreachable")

    def _commit(self, batch: list[_Write]) -> None:
        quarantined = [w.quarantine for w in batch if w.quarantine is not None]
        with _transaction(self._conn):
            rows, known = self._deliveries(batch)
            inserted = self._conn.executemany(_INSERT_READING, rows).rowcount
            self._conn.executemany(_INSERT_QUARANTINE, quarantined)
            if self._stats.batches % _PRUNE_EVERY_BATCHES == 0:
                self._conn.execute(_PRUNE_DELIVERIES, (DELIVERIES_KEPT,))
        self._stats.committed += inserted
        self._stats.duplicates += len(rows) - inserted + known
        self._stats.quarantined += len(quarantined)
        self._stats.batches += 1

    def _deliveries(self, batch: list[_Write]) -> tuple[list[_ReadingRow], int]:
        """Record message identities; the rows to insert, and how many were known.

        First copies are recorded before any redelivered copy is checked, so a copy
        redelivered while its first is still in this batch is recognised too.
        """
        first = [w for w in batch if w.delivery and not w.delivery.redelivered]
        self._conn.executemany(
            _RECORD_DELIVERY,
            [(w.delivery.key, w.readings[0][4]) for w in first if w.readings],  # type: ignore[union-attr]
        )
        rows: list[_ReadingRow] = []
        known = 0
        for write in batch:
            again = write.delivery is not None and write.delivery.redelivered
            if again and write.readings and not self._new_delivery(write):
                known += len(write.readings)
                continue
            rows.extend(write.readings)
        return rows, known

    def _new_delivery(self, write: _Write) -> bool:
        key = write.delivery.key  # type: ignore[union-attr]
        cursor = self._conn.execute(_CHECK_DELIVERY, (key, write.readings[0][4]))
        return cursor.rowcount == 1

    def _note_failure(self, exc: sqlite3.Error, attempt: int) -> None:
        if not self._failing:
            log.warning("store commit failed (%s); retrying with backoff", exc)
            self._failing = True
        log.debug("store commit attempt %d failed: %s", attempt, exc)

    def _note_success(self, attempt: int) -> None:
        if self._failing:
            log.info("store commits work again (batch took %d attempts)", attempt)
            self._failing = False

    def _fail_leftovers(self) -> None:
        """Answer every item still queued so no caller waits on a stopped writer."""
        error = StoreError("reading store closed before this item was committed")
        with suppress(queue.Empty):
            while True:
                item = self._items.get_nowait()
                if isinstance(item, _Barrier | _Call):
                    _settle(item.done, None, error)


# Helpers


def _open_write_connection(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open the write connection with durable settings and an up-to-date schema.

    Raises:
        StoreError: See `ReadingStore.open`.
    """
    try:
        # Handed to the writer thread; only that thread uses it after open().
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreError(_open_hint(path, exc)) from exc
    try:
        _configure(conn, path, busy_timeout)
        _migrate(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_corrupt(exc):
            raise StoreCorruptError(
                f"reading store {path} is damaged or not an SQLite database ({exc}); "
                "keep the file for recovery, restore from backup or move it aside"
            ) from exc
        raise StoreError(_open_hint(path, exc)) from exc
    except StoreError:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(
            f"{path}: SQLite would not use WAL mode (got {mode!r}); "
            "put the data directory on a local filesystem"
        )
    # FULL, never NORMAL or OFF: acknowledged ingest must survive a power cut.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema v{version}, newer than this gateway's "
                f"v{SCHEMA_VERSION}; upgrade iomt-gateway or point it at another file"
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    if version < SCHEMA_VERSION:
        log.info("store schema migrated from v%d to v%d", version, SCHEMA_VERSION)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (autocommit conn)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _open_hint(path: Path, exc: sqlite3.Error) -> str:
    return (
        f"cannot open reading store {path}: {exc}; check that {path.parent} exists "
        "and is writable by the service user, that the disk is not full or "
        "mounted read-only, and that the file is an SQLite database"
    )


def _reading_row(reading: Reading, received_at: float) -> _ReadingRow:
    """The row for `reading`, validated here so a bad one fails in the caller.

    Raises:
        ValueError: `measured_at` is not finite or `kind` is unknown.
    """
    measured_at = float(reading.measured_at)
    if not math.isfinite(measured_at):
        # NaN would defeat the UNIQUE key (SQLite stores it as NULL).
        raise ValueError("a reading's measured_at must be a finite number")
    return (
        str(reading.device_id),
        Kind(reading.kind).value,
        float(reading.value),
        measured_at,
        received_at,
        reading.patient_ref,
        reading.room,
        int(reading.quality),
    )


def _reading_from_row(row: tuple[Any, ...]) -> Reading:
    device_id, kind, value, measured_at, patient_ref, room, quality = row
    return Reading(
        device_id=device_id,
        kind=Kind(kind),
        # SQLite stores a NaN REAL as NULL; the SENSOR_NAN flag says why.
        value=math.nan if value is None else value,
        measured_at=measured_at,
        patient_ref=patient_ref,
        room=room,
        quality=Quality(quality),
    )


def _run_callbacks(batch: list[_Write]) -> None:
    for write in batch:
        if write.on_commit is None:
            continue
        try:
            write.on_commit()
        except Exception as exc:
            # Type only: the message of a caller's exception may carry data.
            log.error(
                "on_commit callback %s raised %s",
                getattr(write.on_commit, "__qualname__", "?"),
                type(exc).__name__,
            )


def _settle(
    done: concurrent.futures.Future[Any], result: Any, error: BaseException | None
) -> None:
    """Resolve `done` unless its waiter already gave up (cancelled it)."""
    with suppress(concurrent.futures.InvalidStateError):
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)


def _delete_older_than(conn: sqlite3.Connection, cutoff: float) -> int:
    with _transaction(conn):
        deleted = conn.execute(
            "DELETE FROM readings WHERE received_at < ?", (cutoff,)
        ).rowcount
        deleted += conn.execute(
            "DELETE FROM quarantine WHERE received_at < ?", (cutoff,)
        ).rowcount
    if deleted:
        # Old page images in the WAL still hold the deleted rows until it is reset.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return deleted


def _label_row(span: LabelSpan, created_at: float) -> tuple[Any, ...]:
    if not span.end >= span.start:
        raise ValueError(f"label span ends before it starts ({span.source})")
    return (
        span.patient_ref,
        span.start,
        span.end,
        int(span.positive),
        span.source,
        span.alert_id,
        created_at,
    )


def _insert_labels(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    with _transaction(conn):
        conn.executemany(_INSERT_LABEL, rows)


def _read_pragmas(conn: sqlite3.Connection) -> dict[str, int | str]:
    names = (
        "journal_mode",
        "synchronous",
        "secure_delete",
        "busy_timeout",
        "user_version",
    )
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}
