"""A patient's rights over their data: export everything, or forget everything.

`export` gathers what the gateway holds about one ref: roster entry and consent
(vault), readings (store), alerts (outbox), quarantined inputs whose bytes name the
ref, and rows of any other table keyed by the ref (training windows, labels); with
a FHIR R4 Bundle of Observations for the vital signs.

`forget` deletes all of that, blanks the personal fields of the patient's alerts
(ref, label, condition, reason, device, evidence) while keeping their id,
priority, state and times for the ERT's records, and removes the vault entry.
Deleting a row is not enough on an SD card: the bytes stay in freed pages and in
WAL frames. So every connection runs with ``secure_delete=ON``, and afterwards
every database file is vacuumed and its WAL checkpointed and truncated; the test
reads the raw files to check that neither name nor ref is left.

The audit trail records both with the patient's keyed subject hash only, never
the ref (see `gateway.pseudonym.audit_subject`).

These functions open their own connections to the agent's databases (WAL, busy
timeout), so they work while the agent runs.

TODO(privacy): a forgotten patient's alerts still pending delivery go out with
their fields blanked; and copies already delivered (ERT phones, the broker's
retained state, backups) are outside the gateway's reach.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import vault
from gateway.audit import AuditLog
from gateway.errors import ExitCode, StoreError
from gateway.readings import Kind, Quality

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0
REF_COLUMNS = ("patient_ref", "ref")
"""Column names by which any table in the gateway's databases names a patient."""
FORGOTTEN_REASON = "details removed at the patient's request"

# LOINC codes of the FHIR R4 vital-signs profiles; units are UCUM. RR intervals
# have no vital-signs code: LOINC 8637-1 ("R-R interval by EKG") is the nearest,
# exported without the vital-signs category because a chest strap is not an ECG.
_VITAL_SIGNS = "http://terminology.hl7.org/CodeSystem/observation-category"
_LOINC = "http://loinc.org"
_UCUM = "http://unitsofmeasure.org"
_OBSERVATIONS: dict[Kind, tuple[tuple[tuple[str, str], ...], str, bool]] = {
    Kind.HEART_RATE: ((("8867-4", "Heart rate"),), "/min", True),
    Kind.PULSE_RATE: ((("8867-4", "Heart rate"),), "/min", True),
    Kind.SPO2: (
        (
            ("2708-6", "Oxygen saturation in Arterial blood"),
            ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
        ),
        "%",
        True,
    ),
    Kind.BODY_TEMPERATURE: ((("8310-5", "Body temperature"),), "Cel", True),
    Kind.RR_INTERVAL: ((("8637-1", "R-R interval by EKG"),), "ms", False),
}


@dataclass
class Forgotten:
    """What `forget` removed.

    Attributes:
        readings: Readings deleted.
        alerts: Alerts whose personal fields were blanked.
        quarantined: Quarantined inputs deleted (their bytes named the ref).
        other_rows: Rows deleted from other tables keyed by the ref, by table.
        roster: Whether a vault entry was removed.
        files: Database files vacuumed and checkpointed.
        wal_left: Files whose WAL could not be emptied (a reader held it).
    """

    readings: int = 0
    alerts: int = 0
    quarantined: int = 0
    other_rows: dict[str, int] = field(default_factory=dict)
    roster: bool = False
    files: int = 0
    wal_left: list[str] = field(default_factory=list)


# -- roster and consent, audited ----------------------------------------------------


def add(cfg: Config, identifier: str, name: str, **fields: Any) -> vault.Patient:
    """Add a patient to the roster vault (see `gateway.vault.add_patient`); audited.

    Raises:
        DuplicatePatientError: The ref is already in the vault.
        KeyFileError: A key is missing or unsafe.
    """
    patient = vault.add_patient(cfg, identifier, name, **fields)
    with AuditLog.for_config(cfg) as audit:
        audit.record("patient.added", ref=patient.ref, details=_consent(patient))
    return patient


def consent(
    cfg: Config, ref: str, *, monitoring: bool | None, training: bool | None
) -> vault.Patient:
    """Change a patient's consent (see `gateway.vault.set_consent`); audited.

    Raises:
        UnknownPatientError: No vault entry has this ref.
    """
    patient = vault.set_consent(cfg, ref, monitoring=monitoring, training=training)
    with AuditLog.for_config(cfg) as audit:
        audit.record("consent.changed", ref=ref, details=_consent(patient))
    return patient


def _consent(patient: vault.Patient) -> dict[str, bool]:
    return {"monitoring": patient.monitoring, "training": patient.training}


# -- export ------------------------------------------------------------------------


def export(cfg: Config, ref: str) -> dict[str, Any]:
    """Everything stored about `ref`, as JSON-ready data with a FHIR R4 Bundle.

    Raises:
        UnknownPatientError: Nothing at all is stored about the ref.
        StoreError: A database cannot be read.
    """
    roster = _roster_entry(cfg, ref)
    readings = _select(cfg.path(cfg.store.file), _READINGS_SQL, ref)
    alerts = _select(cfg.path(cfg.alerts.outbox_file), _ALERTS_SQL, ref)
    quarantined = _select(cfg.path(cfg.store.file), _QUARANTINE_SQL, ref.encode())
    others = _keyed_rows(cfg, ref)
    known = roster or readings or alerts or ref in {p.ref for p in cfg.patients}
    if not known:
        raise vault.UnknownPatientError(ref)
    document = {
        "ref": ref,
        "gateway": cfg.gateway.id,
        "exported_at": _iso(time.time()),
        "roster": roster,
        "readings": readings,
        "alerts": alerts,
        "quarantine": [{**q, "payload": q["payload"].hex()} for q in quarantined],
        "other": others,
        "fhir": fhir_bundle(cfg.gateway.id, ref, readings),
    }
    with AuditLog.for_config(cfg) as audit:
        audit.record(
            "patient.exported",
            ref=ref,
            details={"readings": len(readings), "alerts": len(alerts)},
        )
    return document


_READINGS_SQL = (
    "SELECT device_id, kind, value, measured_at, received_at, room, quality"
    " FROM readings WHERE patient_ref = ? ORDER BY measured_at, id"
)
_ALERTS_SQL = (
    "SELECT id, priority, category, label, room, device_id, reason, evidence,"
    " raised_at, state, cleared_at, acked_at, outcome, escalated_at"
    " FROM alerts WHERE patient_ref = ? ORDER BY raised_at"
)
_QUARANTINE_SQL = (
    "SELECT id, received_at, source, reason, payload FROM quarantine"
    " WHERE instr(payload, ?) > 0 ORDER BY id"
)


def _roster_entry(cfg: Config, ref: str) -> dict[str, Any] | None:
    path = cfg.path(cfg.security.roster_file)
    if not path.exists():
        return None
    patient = vault.Vault.for_config(cfg).load().get(ref)
    return None if patient is None else asdict(patient)


def _select(path: Path, sql: str, key: object) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with _connect(path) as db:
        try:
            cursor = db.execute(sql, (key,))
        except sqlite3.OperationalError:
            return []  # an older file without that table
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _keyed_rows(cfg: Config, ref: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of other tables keyed by the ref (windows, labels), per file:table."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in _database_files(cfg):
        with _connect(path) as db:
            for table, column in _ref_tables(db, skip=("readings", "alerts")):
                rows = db.execute(
                    f'SELECT * FROM "{table}" WHERE "{column}" = ?',  # noqa: S608
                    (ref,),
                )
                names = [c[0] for c in rows.description]
                listed = [dict(zip(names, r, strict=True)) for r in rows.fetchall()]
                if listed:
                    found[f"{path.name}:{table}"] = _json_safe(listed)
    return found


def _json_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v.hex() if isinstance(v, bytes) else v for k, v in row.items()}
        for row in rows
    ]


def fhir_bundle(gateway_id: str, ref: str, readings: list[dict[str, Any]]) -> dict:
    """A FHIR R4 collection Bundle of Observations for the vital-sign readings.

    Readings flagged as technical (contact lost, no reading, NaN) or stamped with
    the monotonic clock (no wall-clock time yet) are left out: they are not
    observations of the patient at a known time. They stay in the JSON export.
    """
    entries = [
        {"fullUrl": f"urn:uuid:{_observation_id(gateway_id, ref, r)}", "resource": o}
        for r in readings
        if (o := _observation(gateway_id, ref, r)) is not None
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _observation(gateway_id: str, ref: str, r: dict[str, Any]) -> dict | None:
    mapping = _OBSERVATIONS.get(Kind(r["kind"]))
    if mapping is None or r["quality"] != Quality.OK or r["value"] is None:
        return None
    if not math.isfinite(r["value"]):
        return None
    codes, unit, vital = mapping
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _observation_id(gateway_id, ref, r),
        "status": "final",
        "code": {
            "coding": [{"system": _LOINC, "code": c, "display": d} for c, d in codes]
        },
        "subject": {
            "identifier": {
                "system": f"urn:iomt-gateway:{gateway_id}:patient",
                "value": ref,
            }
        },
        "effectiveDateTime": _iso(r["measured_at"]),
        "valueQuantity": {
            "value": r["value"],
            "unit": unit,
            "system": _UCUM,
            "code": unit,
        },
        "device": {"display": r["device_id"]},
    }
    if vital:
        observation["category"] = [
            {"coding": [{"system": _VITAL_SIGNS, "code": "vital-signs"}]}
        ]
    return observation


def _observation_id(gateway_id: str, ref: str, r: dict[str, Any]) -> str:
    name = f"{gateway_id}/{ref}/{r['device_id']}/{r['kind']}/{r['measured_at']!r}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


# -- forget ------------------------------------------------------------------------


def forget(cfg: Config, ref: str) -> Forgotten:
    """Remove everything stored about `ref`; keep an audit entry without it.

    Raises:
        UnknownPatientError: Nothing at all is stored about the ref.
        StoreError: A database cannot be changed (nothing is half-deleted within
            one file; files already done stay done, so run it again).
    """
    audit = AuditLog.for_config(cfg)
    done = Forgotten()
    try:
        _forget_store(cfg, ref, done)
        _forget_alerts(cfg, ref, done)
        _forget_keyed_rows(cfg, ref, done)
        done.roster = vault.remove_patient(cfg, ref) if _has_vault(cfg) else False
        found = done.readings or done.alerts or done.roster or done.other_rows
        if not found and ref not in {p.ref for p in cfg.patients}:
            raise vault.UnknownPatientError(ref)
        audit.record("patient.forgotten", ref=ref, details=_counts(done))
    finally:
        audit.close()
    _scrub_all(cfg, done)
    log.info(
        "patient forgotten: %d readings, %d alerts, %d quarantined, %d files scrubbed",
        done.readings,
        done.alerts,
        done.quarantined,
        done.files,
    )
    return done


def _counts(done: Forgotten) -> dict[str, object]:
    return {
        "readings": done.readings,
        "alerts": done.alerts,
        "quarantined": done.quarantined,
        "other_rows": sum(done.other_rows.values()),
        "roster": done.roster,
    }


def _has_vault(cfg: Config) -> bool:
    return cfg.path(cfg.security.roster_file).exists()


def _forget_store(cfg: Config, ref: str, done: Forgotten) -> None:
    path = cfg.path(cfg.store.file)
    if not path.exists():
        return
    with _connect(path) as db, _write(db):
        done.readings = db.execute(
            "DELETE FROM readings WHERE patient_ref = ?", (ref,)
        ).rowcount
        done.quarantined = db.execute(
            "DELETE FROM quarantine"
            " WHERE instr(payload, ?) > 0 OR instr(source, ?) > 0",
            (ref.encode(), ref),
        ).rowcount


def _forget_alerts(cfg: Config, ref: str, done: Forgotten) -> None:
    path = cfg.path(cfg.alerts.outbox_file)
    if not path.exists():
        return
    with _connect(path) as db, _write(db):
        # The condition key names the patient; a unique one per alert keeps the
        # open-alert index satisfied.
        done.alerts = db.execute(
            "UPDATE alerts SET patient_ref = NULL, label = NULL, device_id = NULL,"
            " condition = 'forgotten/' || id, reason = ?, evidence = '[]'"
            " WHERE patient_ref = ?",
            (FORGOTTEN_REASON, ref),
        ).rowcount


def _forget_keyed_rows(cfg: Config, ref: str, done: Forgotten) -> None:
    audit_file = cfg.path(cfg.security.audit_file).resolve()
    for path in _database_files(cfg):
        if path.resolve() == audit_file:
            continue  # append-only, and it never holds refs
        with _connect(path) as db, _write(db):
            for table, column in _ref_tables(db, skip=("readings", "alerts")):
                deleted = db.execute(
                    f'DELETE FROM "{table}" WHERE "{column}" = ?',  # noqa: S608
                    (ref,),
                ).rowcount
                if deleted:
                    done.other_rows[f"{path.name}:{table}"] = deleted


def _scrub_all(cfg: Config, done: Forgotten) -> None:
    """VACUUM every database and empty its WAL, so no freed page keeps old bytes."""
    for path in _database_files(cfg):
        with _connect(path) as db:
            db.execute("VACUUM")
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        done.files += 1
        if busy:
            done.wal_left.append(path.name)
            log.warning("%s: a reader kept the WAL; run forget again later", path.name)


def _database_files(cfg: Config) -> list[Path]:
    """The configured databases and any other SQLite file in the data directory."""
    configured = [
        cfg.path(cfg.store.file),
        cfg.path(cfg.alerts.outbox_file),
        cfg.path(cfg.learning.privacy_file),
        cfg.path(cfg.security.audit_file),
    ]
    data_dir = cfg.gateway.data_dir
    found = sorted(data_dir.glob("*.db")) if data_dir.is_dir() else []
    unique: dict[Path, Path] = {}
    for path in (*configured, *found):
        if path.exists():
            unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _ref_tables(
    db: sqlite3.Connection, skip: tuple[str, ...]
) -> Iterator[tuple[str, str]]:
    tables = [
        row[0]
        for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    ]
    for table in tables:
        if table in skip or table.startswith("sqlite_"):
            continue
        columns = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
        for column in REF_COLUMNS:
            if column in columns:
                yield table, column
                break


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        # Zero what is deleted, so the bytes do not linger in freed pages.
        db.execute("PRAGMA secure_delete=ON")
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: {exc}") from exc
    try:
        yield db
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: {exc}") from exc
    finally:
        db.close()


@contextlib.contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# -- command line ------------------------------------------------------------------


def keys_command(cfg: Config, action: str) -> int:
    """`iomt-gateway keys init|rotate`: print what was done; return the exit code.

    Raises:
        KeyFileError: A key cannot be created, or rotation is not possible here.
        VaultError: The vault does not decrypt with the current key.
    """
    from gateway.keys import KeySource, init_keys

    if action == "init":
        key_dir = KeySource.for_config(cfg).key_dir
        created = init_keys(key_dir)
        if created:
            # The trail starts with the keys: from here on a missing trail is a
            # removed one (see `audit verify`).
            with AuditLog.for_config(cfg) as audit:
                audit.record("keys.created", details={"keys": sorted(created)})
        print(f"{key_dir}: created {', '.join(created) or 'nothing (all present)'}")
        return ExitCode.OK
    carried = vault.rotate(cfg)
    with AuditLog.for_config(cfg) as audit:
        audit.record("keys.rotated", details={"key": "roster", "entries": carried})
    print(f"roster key rotated; {carried} entries re-encrypted")
    return ExitCode.OK


def patient_command(cfg: Config, args: argparse.Namespace) -> int:
    """`iomt-gateway patient ...`: run one subcommand; return the exit code.

    Raises:
        GatewayError: As the function the subcommand calls.
    """
    action = args.patient_command
    if action == "add":
        return _add_command(cfg, args)
    if action == "consent":
        patient = consent(
            cfg,
            args.ref,
            monitoring=_yes(args.monitoring),
            training=_yes(args.training),
        )
        print(f"{patient.ref}: {_consent_text(patient)}")
    elif action == "list":
        _print_roster(cfg)
    elif action == "export":
        _export_to(cfg, args.ref, args.out, args.fhir)
    else:
        done = forget(cfg, args.ref)
        print(
            f"forgotten: {done.readings} readings, {done.alerts} alerts blanked, "
            f"{done.quarantined} quarantined inputs, roster entry "
            f"{'removed' if done.roster else 'none'}; {done.files} files scrubbed"
        )
        if done.wal_left:
            print(f"still in use, run again later: {', '.join(done.wal_left)}")
    return ExitCode.OK


def _add_command(cfg: Config, args: argparse.Namespace) -> int:
    try:
        patient = add(
            cfg,
            args.id,
            args.name,
            bed=args.bed,
            label=args.label,
            training=not args.no_training,
            monitoring=not args.no_monitoring,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(patient.ref)
    return ExitCode.OK


def _yes(answer: str | None) -> bool | None:
    return None if answer is None else answer == "yes"


def _consent_text(p: vault.Patient) -> str:
    return (
        f"monitoring {'yes' if p.monitoring else 'no'}, "
        f"training {'yes' if p.training else 'no'}"
    )


def _print_roster(cfg: Config) -> None:
    patients = vault.Vault.for_config(cfg).load()
    if not patients:
        print("the roster vault is empty (`iomt-gateway patient add` fills it)")
    for p in sorted(patients.values(), key=lambda p: (p.bed or "", p.name)):
        print(
            f"{p.ref}  {p.name}  bed {p.bed or '-'}  label {p.label or '-'}  "
            f"{_consent_text(p)}"
        )


def _export_to(cfg: Config, ref: str, out: Path | None, fhir: Path | None) -> None:
    document = export(cfg, ref)
    text = json.dumps(document, indent=2, ensure_ascii=False)
    if out is None:
        print(text)
    else:
        _write_private(out, text)
    if fhir is not None:
        _write_private(fhir, json.dumps(document["fhir"], indent=2))


def _write_private(path: Path, text: str) -> None:
    # Health data: readable by whoever ran the export, nobody else.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
