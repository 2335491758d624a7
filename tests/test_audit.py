"""The audit trail: chained, signed, and every kind of tampering found."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.alarms import Category, Priority
from gateway.audit import (
    GENESIS,
    AlertAudit,
    AuditLog,
    entry_hash,
    record_training_round,
    record_update_sent,
)
from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.keys import init_keys
from gateway.notify import Alert

SIGNER = Ed25519PrivateKey.generate()
SUBJECT_KEY = bytes(range(32))


def open_log(path: Path, every: int = 3) -> AuditLog:
    return AuditLog(
        path,
        signing_key=SIGNER,
        subject_key=SUBJECT_KEY,
        checkpoint_every=every,
        clock=ManualClock(1_700_000_000.0),
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """An audit file with 10 entries, closed (so a checkpoint covers entry 10)."""
    file = tmp_path / "audit.db"
    with open_log(file) as audit:
        for n in range(1, 11):
            audit.record("test.entry", details={"marker": f"marker-{n:02d}"})
    return file


@pytest.fixture
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to the file with the append-only triggers dropped."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for name in ("entries_no_update", "entries_no_delete"):
            db.execute(f"DROP TRIGGER {name}")
        yield db


def verify(path: Path):
    with open_log(path) as audit:
        return audit.verify()


def test_an_untouched_trail_verifies(path: Path) -> None:
    with open_log(path) as audit:
        entries = audit.entries()
        verdict = audit.verify()
    assert [e.seq for e in entries] == list(range(1, 11))
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert (verdict.ok, verdict.entries, verdict.signatures_checked) == (True, 10, True)
    assert verdict.checkpoints == 4  # entries 3, 6, 9 and 10 (on close)


def test_the_table_refuses_update_and_delete(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        for sql in ("UPDATE entries SET kind = 'x'", "DELETE FROM entries"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM checkpoints")
    assert verify(path).ok


def test_an_entry_edited_in_the_file_bytes_is_found(path: Path) -> None:
    assert not path.with_name("audit.db-wal").exists()  # all in the main file
    data = path.read_bytes()
    assert data.count(b"marker-04") == 1
    path.write_bytes(data.replace(b"marker-04", b"marker-99"))

    verdict = verify(path)
    assert (verdict.problem, verdict.bad_seq) == ("edited", 4)


def test_a_deleted_entry_is_found(path: Path, raw: sqlite3.Connection) -> None:
    raw.execute("DELETE FROM entries WHERE seq = 5")
    verdict = verify(path)
    assert (verdict.problem, verdict.bad_seq) == ("missing", 5)


def test_a_deleted_entry_with_the_rest_renumbered_is_found(
    path: Path, raw: sqlite3.Connection
) -> None:
    raw.execute("DELETE FROM entries WHERE seq = 5")
    raw.execute("UPDATE entries SET seq = seq - 1 WHERE seq > 5")
    verdict = verify(path)
    assert (verdict.problem, verdict.bad_seq) == ("missing", 5)


def test_two_swapped_entries_are_found(path: Path, raw: sqlite3.Connection) -> None:
    raw.execute("UPDATE entries SET seq = -1 WHERE seq = 4")
    raw.execute("UPDATE entries SET seq = 4 WHERE seq = 5")
    raw.execute("UPDATE entries SET seq = 5 WHERE seq = -1")
    verdict = verify(path)
    assert (verdict.problem, verdict.bad_seq) == ("reordered", 4)
    assert "written as entry 5" in verdict.detail


def test_a_rewritten_chain_is_caught_by_a_signed_checkpoint(
    path: Path, raw: sqlite3.Connection
) -> None:
    # An attacker without the signing key edits entry 2 and re-hashes the chain.
    rows = raw.execute("SELECT * FROM entries ORDER BY seq").fetchall()
    prev = GENESIS
    for seq, at, kind, subject, details, _, _ in rows:
        if seq == 2:
            details = '{"marker":"forged"}'
        digest = entry_hash(seq, at, kind, subject, details, prev)
        raw.execute(
            "UPDATE entries SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (details, prev, digest, seq),
        )
        prev = digest

    verdict = verify(path)
    assert (verdict.problem, verdict.bad_seq) == ("edited", 3)
    assert "checkpoint" in verdict.detail


def test_a_cut_off_end_is_caught_by_the_closing_checkpoint(
    path: Path, raw: sqlite3.Connection
) -> None:
    raw.execute("DELETE FROM entries WHERE seq >= 9")
    verdict = verify(path)
    assert (verdict.problem, verdict.bad_seq) == ("missing", 9)


def test_a_checkpoint_signed_by_another_key_is_found(path: Path) -> None:
    with open_log(path) as audit:
        verdict = audit.verify(Ed25519PrivateKey.generate().public_key())
    assert (verdict.problem, verdict.bad_seq) == ("signature", 3)


def test_subjects_are_keyed_hashes_and_details_refuse_refs(tmp_path: Path) -> None:
    with open_log(tmp_path / "audit.db") as audit:
        audit.record("patient.added", ref="p-0123456789ab", details={"training": True})
        with pytest.raises(ValueError, match="must not carry patient refs"):
            audit.record("oops", details={"who": "p-0123456789ab"})
        (entry,) = audit.entries()
    assert entry.subject is not None and entry.subject.startswith("s-")
    assert "0123456789ab" not in entry.subject
    assert b"p-0123456789ab" not in (tmp_path / "audit.db").read_bytes()


def test_two_writers_at_once_keep_one_unbroken_chain(tmp_path: Path) -> None:
    file = tmp_path / "audit.db"
    logs = [open_log(file, every=7), open_log(file, every=7)]

    def write(audit: AuditLog, name: str) -> None:
        for n in range(40):
            audit.record("test.entry", details={"writer": name, "n": n})

    threads = [
        threading.Thread(target=write, args=(audit, str(i)))
        for i, audit in enumerate(logs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for audit in logs:
        audit.close()
    verdict = verify(file)
    assert (verdict.ok, verdict.entries) == (True, 80)


def test_alerts_are_recorded_with_id_and_priority_only(tmp_path: Path) -> None:
    alert = Alert(
        id="ab" * 16,
        condition="p-0123456789ab/heart_rate",
        priority=Priority.HIGH,
        category=Category.PHYSIOLOGICAL,
        patient_ref="p-0123456789ab",
        label="Bed 4",
        room=None,
        device_id="strap-1",
        reason="heart rate high: 140 bpm",
        evidence=(),
        raised_at=1.0,
    )
    with open_log(tmp_path / "audit.db") as audit:
        observer = AlertAudit(audit)
        for what in ("raised", "delivered", "acknowledged"):
            observer.alert_event(what, alert, "mqtt")
        observer.close()
        entries = audit.entries()
    assert [(e.kind, e.subject) for e in entries] == [
        ("alert.raised", None),
        ("alert.acknowledged", None),
    ]
    assert entries[0].as_dict()["details"] == {"alert": "ab" * 16, "priority": "high"}


def test_training_rounds_and_updates_sent_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    toml = tmp_path / "gateway.toml"
    toml.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    cfg = load_config(toml)
    init_keys(cfg.path(cfg.security.key_dir))
    assert record_training_round(cfg, 3, 0.42, 1.7) == 1
    assert record_update_sent(cfg, 3, b"weights") == 2
    with AuditLog.for_config(cfg) as audit:
        first, second = (e.as_dict() for e in audit.entries())
        assert audit.verify().ok
    assert first["details"] == {"round": 3, "epsilon_spent": 0.42, "epsilon_total": 1.7}
    assert second["details"]["update_sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_a_removed_trail_is_found_once_the_gateway_has_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from gateway.cli import main

    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "state").mkdir()
    verify = ["audit", "verify", "--config", str(config)]
    assert main(verify) == 0  # no keys, no trail yet: nothing to check
    assert main(["keys", "init", "--config", str(config)]) == 0
    assert main(verify) == 0
    (tmp_path / "state" / "audit.db").rename(tmp_path / "elsewhere.db")
    capsys.readouterr()
    assert main(verify) == 70
    assert "it was deleted or moved" in capsys.readouterr().err
