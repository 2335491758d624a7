"""`patient forget`: no byte of the patient's name or ref is left in any file."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from gateway import patients, vault
from gateway.alarms import Category, Evidence, Priority
from gateway.audit import AuditLog
from gateway.config import Config, load_config
from gateway.keys import init_keys
from gateway.notify import Alert
from gateway.outbox import Outbox
from gateway.readings import Kind, Reading
from gateway.store import LabelSpan, ReadingStore

ADA, GRACE = "Ada Lovelace", "Grace Hopper"


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    config = load_config(path)
    init_keys(config.path(config.security.key_dir))
    return config


def readings(ref: str, device: str, start: float) -> list[Reading]:
    return [
        Reading(device, Kind.HEART_RATE, 130.0 + i, start + i, ref, "room-12")
        for i in range(50)
    ]


def alert(ref: str, label: str, device: str) -> Alert:
    return Alert(
        id=device.encode().hex().ljust(32, "0")[:32],
        condition=f"{ref}/heart_rate",
        priority=Priority.HIGH,
        category=Category.PHYSIOLOGICAL,
        patient_ref=ref,
        label=label,
        room="room-12",
        device_id=device,
        reason="heart rate high: 140 bpm (NEWS2 single-parameter score 3)",
        evidence=(Evidence(Kind.HEART_RATE, 140.0, "bpm", 1.0),),
        raised_at=time.time(),
    )


def add_keyed_rows(cfg: Config, store: ReadingStore, refs: list[str]) -> None:
    """Label spans in the store, and a windows file such as learning may keep."""
    store.add_labels(
        [LabelSpan(r, 1_000.0, 1_010.0, True, "ert", "a" * 32) for r in refs]
    )
    with closing(sqlite3.connect(cfg.gateway.data_dir / "windows.db")) as db, db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE windows (patient_ref TEXT, features BLOB)")
        db.executemany(
            "INSERT INTO windows VALUES (?, zeroblob(64))", [(r,) for r in refs]
        )


def files_holding(data_dir: Path, needle: str) -> list[str]:
    """Every file under the data directory whose raw bytes contain `needle`."""
    return sorted(
        str(f.relative_to(data_dir))
        for f in data_dir.rglob("*")
        if f.is_file() and needle.encode() in f.read_bytes()
    )


def test_forget_leaves_neither_name_nor_ref_in_any_file(cfg: Config) -> None:
    ada = patients.add(cfg, "MRN-1", ADA, bed="4", label=ADA)
    grace = patients.add(cfg, "MRN-2", GRACE, bed="5", label=GRACE)
    data_dir = cfg.gateway.data_dir
    store = ReadingStore(cfg.path(cfg.store.file))
    outbox = Outbox(cfg.path(cfg.alerts.outbox_file))
    try:
        store.open()
        store.put_many(readings(ada.ref, "strap-ada", 1_000.0))
        store.put_many(readings(grace.ref, "strap-grace", 1_000.0))
        payload = json.dumps({"patient": ada.ref, "hr": "??"}).encode()
        store.quarantine("ble:strap-ada", "not a number", payload)
        store.flush_sync(10)
        add_keyed_rows(cfg, store, [ada.ref, grace.ref])
        for a in (alert(ada.ref, ADA, "strap-ada"), alert(grace.ref, GRACE, "s-g")):
            outbox.insert(a, ["mqtt"], time.time())
        # The test can see them: the ref in the store, the name in the outbox.
        assert "readings.db" in " ".join(files_holding(data_dir, ada.ref))
        assert "outbox.db" in " ".join(files_holding(data_dir, ADA))

        # Forgotten while the store and outbox are open, as in a running agent.
        done = patients.forget(cfg, ada.ref)
        assert (done.readings, done.alerts, done.quarantined, done.roster) == (
            50,
            1,
            1,
            True,
        )
        assert done.other_rows == {"readings.db:labels": 1, "windows.db:windows": 1}
        assert done.wal_left == []
        for needle in (ada.ref, ADA, "MRN-1"):
            assert files_holding(data_dir, needle) == [], needle

        # The other patient is untouched; the forgotten alert keeps its facts.
        assert len(store.readings(patient_ref=grace.ref)) == 50
        records = {r.alert.id: r for r in outbox.list_alerts()}
    finally:
        store.close()
        outbox.close()
    for needle in (ada.ref, ADA):
        assert files_holding(data_dir, needle) == [], needle
    kept = records[alert(ada.ref, ADA, "strap-ada").id]
    assert (kept.alert.patient_ref, kept.alert.label, kept.alert.evidence) == (
        None,
        None,
        (),
    )
    assert (kept.alert.priority, kept.state) == (Priority.HIGH, "open")
    assert records[alert(grace.ref, GRACE, "s-g").id].alert.label == GRACE
    assert vault.labels(cfg) == {grace.ref: GRACE}
    assert files_holding(data_dir, grace.ref) != []


def test_forget_is_audited_without_the_ref(cfg: Config) -> None:
    ada = patients.add(cfg, "MRN-1", ADA)
    patients.forget(cfg, ada.ref)
    with AuditLog.for_config(cfg) as audit:
        entries = audit.entries()
        subject = audit.subject_of(ada.ref)
        assert audit.verify().ok
    assert [e.kind for e in entries] == ["patient.added", "patient.forgotten"]
    assert {e.subject for e in entries} == {subject}
    assert json.loads(entries[-1].details)["roster"] is True


def test_forgetting_an_unknown_ref_changes_nothing(cfg: Config) -> None:
    patients.add(cfg, "MRN-1", ADA)
    with pytest.raises(vault.UnknownPatientError):
        patients.forget(cfg, "p-000000000000")
    with AuditLog.for_config(cfg) as audit:
        assert [e.kind for e in audit.entries()] == ["patient.added"]
