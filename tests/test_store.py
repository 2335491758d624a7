"""The reading store, against real SQLite files."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing, suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.clock import ManualClock
from gateway.errors import ExitCode, StoreCorruptError, StoreError
from gateway.readings import Kind, Quality, Reading
from gateway.store import SCHEMA_VERSION, ReadingStore

REPO = Path(__file__).resolve().parents[1]
DAY = 86_400.0


def hr(
    at: float,
    value: float = 72.0,
    *,
    device_id: str = "strap-1",
    patient_ref: str = "p-01",
    quality: Quality = Quality.OK,
) -> Reading:
    return Reading(device_id, Kind.HEART_RATE, value, at, patient_ref, None, quality)


@pytest.fixture
def store(tmp_path: Path):
    with ReadingStore(tmp_path / "gw.db", flush_interval=0.01) as s:
        yield s


def test_wal_synchronous_full_and_secure_delete_are_set(store: ReadingStore) -> None:
    pragmas = store.pragmas()

    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 2  # FULL
    assert pragmas["secure_delete"] == 1
    assert pragmas["busy_timeout"] == 5000
    assert pragmas["user_version"] == SCHEMA_VERSION
    # WAL is a property of the file: another connection sees it too.
    with sqlite3.connect(store.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_put_then_read_back_equal_readings(store: ReadingStore) -> None:
    clean = hr(1000.0, 61.0)
    flagged = Reading(
        "ble:aa",
        Kind.SPO2,
        97.0,
        1001.5,
        patient_ref="p-01",
        room="r-12",
        quality=Quality.CONTACT_LOST | Quality.CLOCK_UNSYNCED,
    )
    room = Reading("room-3", Kind.ROOM_TEMPERATURE, 21.5, 1002.0, room="r-12")

    store.put(clean)
    store.put_many([flagged, room])
    store.flush_sync(timeout=5)

    assert store.readings() == [clean, flagged, room]
    assert store.readings()[1].quality is not Quality.OK
    assert isinstance(store.readings()[1].quality, Quality)
    assert store.count() == 3
    assert store.counts_by_kind() == {
        "heart_rate": 1,
        "spo2": 1,
        "room_temperature": 1,
    }


def test_nan_value_reads_back_as_nan(store: ReadingStore) -> None:
    store.put(hr(5.0, math.nan, quality=Quality.SENSOR_NAN))
    store.flush_sync(timeout=5)

    [back] = store.readings()

    assert math.isnan(back.value)
    assert back.quality == Quality.SENSOR_NAN


def test_readings_filters(store: ReadingStore) -> None:
    a = [hr(float(t), patient_ref="p-01") for t in range(10)]
    b = [hr(float(t), device_id="strap-2", patient_ref="p-02") for t in range(5)]
    temp = Reading("t-1", Kind.BODY_TEMPERATURE, 37.0, 3.0, patient_ref="p-01")
    room = Reading("r-1", Kind.ROOM_TEMPERATURE, 20.0, 4.0, room="r-9")
    store.put_many([*a, *b, temp, room])
    store.flush_sync(timeout=5)

    assert store.readings(patient_ref="p-01", kind=Kind.HEART_RATE) == a
    assert store.readings(patient_ref="p-01", since=3.0, until=5.0) == [
        a[3],
        temp,
        a[4],
    ]
    assert store.readings(room="r-9") == [room]
    assert store.readings(kind=Kind.HEART_RATE, since=4.0, until=5.0) == [a[4], b[4]]
    assert store.readings(patient_ref="nobody") == []


def test_duplicates_are_stored_once_and_counted(store: ReadingStore) -> None:
    first = hr(100.0, 70.0)
    redelivered = hr(100.0, 70.0)
    same_key_other_value = hr(100.0, 99.0)
    other_kind = Reading("strap-1", Kind.RR_INTERVAL, 850.0, 100.0)

    store.put(first)
    store.put(redelivered)
    store.flush_sync(timeout=5)
    store.put_many([same_key_other_value, other_kind])
    store.flush_sync(timeout=5)

    assert store.readings() == [first, other_kind]
    assert store.stats.committed == 2
    assert store.stats.duplicates == 2


def test_on_commit_runs_after_row_is_visible_elsewhere(tmp_path: Path) -> None:
    seen: list[int] = []
    done = threading.Event()
    path = tmp_path / "gw.db"

    def count_from_another_connection() -> None:
        other = sqlite3.connect(path)
        seen.append(other.execute("SELECT count(*) FROM readings").fetchone()[0])
        other.close()
        done.set()

    # A long interval: a reading nobody waits on stays queued; the acked one
    # behind it is committed at once (group commit), and takes it along.
    with ReadingStore(path, batch_size=100, flush_interval=60) as store:
        store.put(hr(1.0))
        time.sleep(0.3)
        assert store.count() == 0
        store.put(hr(2.0), on_commit=count_from_another_connection)
        assert done.wait(5)

    assert seen == [2]


def test_acked_item_is_committed_long_before_the_flush_interval(
    tmp_path: Path,
) -> None:
    committed_after: list[float] = []
    with ReadingStore(tmp_path / "gw.db", flush_interval=5.0) as store:
        for i in range(3):
            start = time.monotonic()
            done = threading.Event()
            store.put(hr(float(i)), on_commit=done.set)
            assert done.wait(5)
            committed_after.append(time.monotonic() - start)

        assert store.count() == 3
        assert store.stats.batches == 3
    assert max(committed_after) < 0.5  # one fsync each, not the 5 s interval


def test_acked_items_arriving_during_a_commit_share_the_next_one(
    tmp_path: Path,
) -> None:
    acked = threading.Semaphore(0)
    with ReadingStore(tmp_path / "gw.db", flush_interval=5.0) as store:
        for i in range(2000):
            store.put(hr(float(i)), on_commit=acked.release)
        for _ in range(2000):
            assert acked.acquire(timeout=10)

        assert store.count() == 2000
        # Queued faster than one fsync: batches fill up to batch_size (500).
        assert 4 <= store.stats.batches <= 50


def test_a_raising_callback_is_logged_and_writer_goes_on(
    store: ReadingStore, caplog: pytest.LogCaptureFixture
) -> None:
    called: list[str] = []

    def boom() -> None:
        raise RuntimeError("secret payload 98 bpm")

    store.put(hr(1.0), on_commit=boom)
    store.put(hr(2.0), on_commit=lambda: called.append("second"))
    store.flush_sync(timeout=5)
    store.put(hr(3.0), on_commit=lambda: called.append("third"))
    store.flush_sync(timeout=5)

    assert called == ["second", "third"]
    assert store.count() == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "RuntimeError" in errors[0].getMessage()
    assert "secret" not in caplog.text


def test_quarantine_keeps_source_reason_and_exact_bytes(tmp_path: Path) -> None:
    clock = ManualClock(5000.0)
    payload = bytes(range(256)) + b"\x00\xff"
    with ReadingStore(tmp_path / "gw.db", clock=clock, flush_interval=0.01) as store:
        store.quarantine("ward/3/temp", "not json", payload)
        clock.advance(1)
        store.quarantine("ble:aa", "short frame", b"\x10")
        store.quarantine("ble:aa", "short frame", bytearray(b"\x10\x01"))
        store.flush_sync(timeout=5)

        entries = store.quarantined()
        counts = store.quarantine_counts()

    assert [(e.source, e.reason, e.payload) for e in entries] == [
        ("ble:aa", "short frame", b"\x10\x01"),
        ("ble:aa", "short frame", b"\x10"),
        ("ward/3/temp", "not json", payload),
    ]
    assert [e.received_at for e in entries] == [5001.0, 5001.0, 5000.0]
    assert counts == {"short frame": 2, "not json": 1}
    assert store.stats.quarantined == 3
    assert "\\x00" not in repr(entries[2])
    assert store.count() == 0


def test_retention_deletes_only_old_rows(tmp_path: Path) -> None:
    clock = ManualClock(10 * DAY)
    path = tmp_path / "gw.db"
    with ReadingStore(
        path, clock=clock, retention_days=7, flush_interval=0.01
    ) as store:
        store.put(hr(1.0, patient_ref="p-OLD-MARKER"))
        store.quarantine("ble:aa", "bad", b"OLD-PAYLOAD-MARKER")
        store.flush_sync(timeout=5)
        clock.advance(3 * DAY)
        store.put(hr(2.0))
        store.quarantine("ble:aa", "bad", b"new")
        store.flush_sync(timeout=5)

        clock.advance(5 * DAY)  # first rows now 8 days old, second 5
        deleted = store.apply_retention()

        assert deleted == 2
        assert store.readings() == [hr(2.0)]
        assert [e.payload for e in store.quarantined()] == [b"new"]
        assert store.apply_retention() == 0
        # Nothing of the deleted rows is left in the files (secure_delete zeroes
        # freed pages, the truncating checkpoint empties the WAL).
        for file in (path, path.with_name("gw.db-wal")):
            data = file.read_bytes() if file.exists() else b""
            assert b"OLD-PAYLOAD-MARKER" not in data
            assert b"p-OLD-MARKER" not in data


def test_no_retention_configured_deletes_nothing(store: ReadingStore) -> None:
    store.put(hr(1.0))
    store.flush_sync(timeout=5)

    assert store.apply_retention() == 0
    assert store.count() == 1


def test_puts_are_batched_into_few_transactions(tmp_path: Path) -> None:
    with ReadingStore(tmp_path / "gw.db", batch_size=500, flush_interval=0.2) as s:
        for i in range(2000):
            s.put(hr(float(i)))
        s.flush_sync(timeout=10)

        assert s.count() == 2000
        assert s.stats.committed == 2000
        assert 4 <= s.stats.batches <= 20


def test_flush_interval_commits_without_a_flush(tmp_path: Path) -> None:
    with ReadingStore(tmp_path / "gw.db", flush_interval=0.05) as store:
        store.put(hr(1.0))
        deadline = time.monotonic() + 5
        while store.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)

        assert store.count() == 1
        assert store.stats.batches == 1


def test_async_flush_from_the_event_loop(store: ReadingStore) -> None:
    acked: list[int] = []

    async def ingest() -> None:
        for i in range(50):
            store.put(hr(float(i)), on_commit=lambda i=i: acked.append(i))
        await store.flush()

    asyncio.run(ingest())

    assert acked == list(range(50))
    assert store.count() == 50


def test_puts_from_many_threads(store: ReadingStore) -> None:
    def produce(device: str) -> None:
        for i in range(200):
            store.put(hr(float(i), device_id=device))

    threads = [threading.Thread(target=produce, args=(f"d{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush_sync(timeout=10)

    assert store.count() == 800
    assert store.stats.duplicates == 0


def test_locked_database_is_retried_and_acked_only_after_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.db"
    acked = threading.Event()
    with ReadingStore(path, flush_interval=0.01, busy_timeout=0.02) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock

        store.put(hr(1.0), on_commit=acked.set)
        time.sleep(0.6)
        assert not acked.is_set()
        assert store.count() == 0

        blocker.execute("ROLLBACK")
        blocker.close()
        store.flush_sync(timeout=10)

        assert acked.is_set()
        assert store.count() == 1
        assert store.stats.batches == 1

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per failure streak, not per attempt


def test_close_flushes_queued_items_and_reopen_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    store = ReadingStore(path, flush_interval=60)
    store.open()
    store.put_many([hr(float(i)) for i in range(10)])
    store.close()

    with pytest.raises(StoreError, match="not open"):
        store.put(hr(99.0))
    with ReadingStore(path) as again:
        assert again.count() == 10
        assert again.pragmas()["user_version"] == SCHEMA_VERSION


def test_invalid_measured_at_fails_in_the_caller(store: ReadingStore) -> None:
    with pytest.raises(ValueError, match="finite"):
        store.put(hr(math.nan))


@pytest.mark.parametrize("where", ["missing/dir/gw.db", "a_file/gw.db"])
def test_unusable_path_raises_store_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a_file").write_bytes(b"not a directory")
    path = tmp_path / where
    store = ReadingStore(path)

    with pytest.raises(StoreError) as caught:
        store.open()

    assert str(path) in str(caught.value)
    assert "writable" in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_not_a_database_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    path.write_bytes(b"this is a text file, not sqlite" * 100)

    with pytest.raises(StoreCorruptError, match="not an SQLite database") as info:
        ReadingStore(path).open()
    assert info.value.exit_code == ExitCode.STORE_CORRUPT


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(StoreError, match="newer"):
        ReadingStore(path).open()


_CHILD = """
import sys, time
from pathlib import Path
from gateway.readings import Kind, Reading
from gateway.store import ReadingStore

store = ReadingStore(Path(sys.argv[1]), batch_size=100, flush_interval=0.01)
store.open()
acks = open(sys.argv[2], "a", buffering=1)
for i in range(5000):
    reading = Reading(f"dev-{i % 7}", Kind.HEART_RATE, float(i), 1000.0 + i,
                      patient_ref=f"p-{i % 3}")
    store.put(reading, on_commit=lambda i=i: acks.write(f"{i}\\n"))
    time.sleep(0.001)
time.sleep(3600)
"""


def test_sigkill_mid_ingest_leaves_a_sound_database(tmp_path: Path) -> None:
    path, acks = tmp_path / "gw.db", tmp_path / "acks.txt"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), str(acks)], env=env
    )
    try:
        _wait_for_rows(child, path, at_least=1000, timeout=30)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute(
            "SELECT device_id, kind, value, measured_at, patient_ref FROM readings"
        ).fetchall()
    assert 1000 <= len(rows) < 5000
    for device_id, kind, value, measured_at, patient_ref in rows:
        i = int(value)
        expected = (f"dev-{i % 7}", "heart_rate", 1000.0 + i, f"p-{i % 3}")
        assert (device_id, kind, measured_at, patient_ref) == expected
    # Every acknowledged reading survived (a torn last line was never acked).
    lines = acks.read_text().splitlines(keepends=True)
    acked = {int(line) for line in lines if line.endswith("\n")}
    assert len(acked) >= 900
    assert acked <= {int(row[2]) for row in rows}
    with ReadingStore(path) as reopened:
        assert reopened.count() == len(rows)


def _wait_for_rows(
    child: subprocess.Popen[bytes], path: Path, at_least: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        # Read-only: connecting must not create the file before the child does.
        with (
            suppress(sqlite3.OperationalError),
            closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as c,
        ):
            if c.execute("SELECT count(*) FROM readings").fetchone()[0] >= at_least:
                return
        time.sleep(0.02)
    raise AssertionError(f"child exited or wrote < {at_least} rows in {timeout} s")


_keys = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from([Kind.HEART_RATE, Kind.SPO2]),
    st.integers(min_value=0, max_value=20).map(float),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.tuples(_keys, st.floats(0, 300)), max_size=60))
def test_property_exactly_distinct_keys_are_stored(
    puts: list[tuple[tuple[str, Kind, float], float]],
) -> None:
    first_value: dict[tuple[str, Kind, float], float] = {}
    for key, value in puts:
        first_value.setdefault(key, value)

    with (
        tempfile.TemporaryDirectory() as tmp,
        ReadingStore(Path(tmp) / "gw.db", flush_interval=0.005) as store,
    ):
        for (device, kind, at), value in puts:
            store.put(Reading(device, kind, value, at))
        store.flush_sync(timeout=10)
        stored = {
            (r.device_id, r.kind, r.measured_at): r.value for r in store.readings()
        }

    assert stored == first_value
    assert store.stats.committed == len(first_value)
    assert store.stats.duplicates == len(puts) - len(first_value)
