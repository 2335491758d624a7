"""The audit trail: append-only, hash-chained, with signed checkpoints.

Every entry carries the SHA-256 of the one before it, and its own hash covers its
sequence number, time, kind, subject, details and that previous hash (a canonical
JSON encoding, `entry_hash`). Editing an entry breaks its own hash; removing one
leaves a gap in the sequence or breaks the next entry's link; swapping two puts
entries under sequence numbers their hashes were not made for. Every
`checkpoint_every` entries, and when the log is closed, the gateway signs (seq,
hash) of the latest entry with its Ed25519 key: rewriting the whole chain after a
change, or cutting its end off, then no longer matches a signature. What this
cannot show: entries removed from the end after the last checkpoint (a crash
between a write and the close).

The table refuses UPDATE and DELETE by trigger, which stops mistakes, not an
attacker with the file: `verify` is what catches them.

No personal data goes in: `subject` is `gateway.pseudonym.audit_subject` of a
patient ref (never the ref itself, which must vanish with `patient forget`), and
`details` holding anything that looks like a ref is refused. Kinds in use:

- ``agent.started`` {config_sha256}; ``device.paired`` {device_id, config_sha256}
- ``patient.added``, ``consent.changed`` {monitoring, training};
  ``patient.exported`` {readings, alerts}; ``patient.forgotten`` {counts}
- ``keys.created`` {keys}
- ``keys.rotated`` {key, entries}
- ``training.round`` {round, epsilon_spent, epsilon_total}; ``update.sent``
  {round, update_sha256}
- ``alert.raised`` {alert, priority}; ``alert.acknowledged`` {alert}
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.clock import Clock, SystemClock
from gateway.errors import ExitCode, GatewayError, StoreError
from gateway.keys import PSEUDONYM_KEY, SIGNING_KEY, KeySource
from gateway.pseudonym import REF_PATTERN, audit_subject

if TYPE_CHECKING:
    from gateway.alerts import AlertManager
    from gateway.config import Config
    from gateway.notify import Alert

log = logging.getLogger(__name__)

GENESIS = "0" * 64
"""The previous hash of the first entry."""
_SEARCH_LIMIT = 100_000
"""Sequence numbers tried when looking where a moved entry was written."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    at REAL NOT NULL,
    signature BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


class AuditTamperedError(GatewayError):
    """`audit verify` found an entry edited, missing, reordered, or a bad signature."""

    exit_code = ExitCode.AUDIT_TAMPERED


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit entry as stored.

    Attributes:
        seq: Position in the trail, from 1, without gaps.
        at: When it was recorded (clock time, epoch seconds).
        kind: What happened, e.g. ``patient.forgotten``.
        subject: Keyed hash of the patient concerned, if any.
        details: Canonical JSON text of the details (no personal data).
        prev_hash: Hash of the entry before (`GENESIS` for the first).
        hash: `entry_hash` of this entry.
    """

    seq: int
    at: float
    kind: str
    subject: str | None
    details: str
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready data, details parsed."""
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "subject": self.subject,
            "details": json.loads(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `AuditLog.verify` found.

    Attributes:
        entries: Entries walked.
        checkpoints: Checkpoints checked.
        signatures_checked: False when no signing key was at hand to check them.
        bad_seq: The first sequence number found wrong, None if all is well.
        problem: "edited", "missing", "reordered" or "signature".
        detail: One line for the operator.
    """

    entries: int
    checkpoints: int
    signatures_checked: bool
    bad_seq: int | None = None
    problem: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether nothing was found wrong."""
        return self.problem is None


def canonical(value: object) -> str:
    """The one JSON text of a value: sorted keys, no spaces, UTF-8 kept.

    >>> canonical({"b": 1, "a": [1.5, None]})
    '{"a":[1.5,null],"b":1}'
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(
    seq: int, at: float, kind: str, subject: str | None, details: str, prev: str
) -> str:
    """SHA-256 hex of an entry's canonical encoding.

    >>> entry_hash(1, 0.0, "k", None, "{}", GENESIS)[:12]
    '61675406e639'
    """
    encoded = canonical([seq, at, kind, subject, details, prev]).encode()
    return hashlib.sha256(encoded).hexdigest()


def checkpoint_message(seq: int, hash_hex: str) -> bytes:
    """The bytes a checkpoint signs: a domain tag, the seq, the entry's hash."""
    return (
        b"iomt-gateway audit checkpoint\0"
        + seq.to_bytes(8, "big")
        + bytes.fromhex(hash_hex)
    )


class AuditLog:
    """The audit trail in its own SQLite file (WAL, ``synchronous=FULL``).

    Thread-safe: one connection, serialised by a lock; writers in other processes
    wait on SQLite's busy timeout.

    Args:
        path: The SQLite file; created if missing.
        signing_key: Signs checkpoints; without it none are written.
        subject_key: Keys the hash recorded for a patient ref; without it entries
            about a patient carry no subject.
        checkpoint_every: Entries between automatic checkpoints.
        clock: Time source of `at`.

    Raises:
        StoreError: The file cannot be opened or initialised.
    """

    def __init__(
        self,
        path: Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        subject_key: bytes | None = None,
        checkpoint_every: int = 100,
        clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        self._signing_key = signing_key
        self._subject_key = subject_key
        self._every = checkpoint_every
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an entry recorded is on the card, like the alert it reports.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"audit trail {self.path}: {exc}") from exc

    @classmethod
    def for_config(cls, cfg: Config, clock: Clock | None = None) -> AuditLog:
        """The audit trail of a configuration, with whichever keys exist.

        Raises:
            KeyFileError: A key exists but is unsafe or malformed.
            StoreError: The file cannot be opened.
        """
        source = KeySource.for_config(cfg)
        path = cfg.path(cfg.security.audit_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(
            path,
            signing_key=source.signing_key() if source.has(SIGNING_KEY) else None,
            subject_key=source.read(PSEUDONYM_KEY)
            if source.has(PSEUDONYM_KEY)
            else None,
            checkpoint_every=cfg.security.audit_checkpoint_every,
            clock=clock,
        )

    def close(self, *, checkpoint: bool = True) -> None:
        """Sign a checkpoint over the latest entry if it has none, then close.

        Args:
            checkpoint: False for readers (`audit verify` must not sign what it
                may just have found altered).
        """
        try:
            if checkpoint:
                self.checkpoint()
        finally:
            with self._lock:
                self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------

    def record(
        self,
        kind: str,
        *,
        ref: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> int:
        """Append an entry; return its sequence number.

        Args:
            kind: What happened (see the module docstring for the kinds in use).
            ref: The patient concerned, if any: recorded as a keyed hash only.
            details: Small JSON-ready facts without personal data: counts,
                hashes, alert ids, epsilon.

        Raises:
            ValueError: `details` holds something shaped like a patient ref.
            StoreError: The entry could not be written.
        """
        text = canonical(dict(details or {}))
        if REF_PATTERN.search(text):
            raise ValueError("audit details must not carry patient refs; pass ref=")
        subject = self.subject_of(ref)
        with self._transaction() as db:
            last = db.execute(
                "SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
            at = self._clock.now()
            digest = entry_hash(seq, at, kind, subject, text, prev)
            db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, at, kind, subject, text, prev, digest),
            )
            if seq % self._every == 0:
                self._sign(db, seq, digest)
        log.debug("audit entry %d: %s", seq, kind)
        return seq

    def subject_of(self, ref: str | None) -> str | None:
        """What entries about `ref` carry as their subject (None without a key)."""
        if ref is None or self._subject_key is None:
            return None
        return audit_subject(self._subject_key, ref)

    def checkpoint(self) -> int | None:
        """Sign the latest entry now, unless it is signed already or there is no key.

        Returns:
            The sequence number signed, or None.
        """
        if self._signing_key is None:
            return None
        with self._transaction() as db:
            last = db.execute(
                "SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            if last is None:
                return None
            signed = db.execute(
                "SELECT 1 FROM checkpoints WHERE seq = ?", (last[0],)
            ).fetchone()
            if signed is None:
                self._sign(db, last[0], last[1])
        return int(last[0])

    def _sign(self, db: sqlite3.Connection, seq: int, digest: str) -> None:
        if self._signing_key is None:
            return
        signature = self._signing_key.sign(checkpoint_message(seq, digest))
        db.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?, ?)",
            (seq, digest, self._clock.now(), signature),
        )

    # -- reading ---------------------------------------------------------------

    def entries(self, since: int = 0, limit: int | None = None) -> list[Entry]:
        """Entries with seq above `since`, oldest first, at most `limit`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, at, kind, subject, details, prev_hash, hash FROM entries"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (since, -1 if limit is None else limit),
            ).fetchall()
        return [Entry(*row) for row in rows]

    def verify(self, public_key: Ed25519PublicKey | None = None) -> Verdict:
        """Walk the chain and the checkpoints; report the first problem found.

        Args:
            public_key: Checks the checkpoints' signatures; by default the public
                half of the signing key, if the log has one.
        """
        if public_key is None and self._signing_key is not None:
            public_key = self._signing_key.public_key()
        entries = self.entries()
        with self._lock:
            checkpoints = self._db.execute(
                "SELECT seq, hash, signature FROM checkpoints ORDER BY seq"
            ).fetchall()
        found = [
            p
            for p in (
                _chain_problem(entries),
                _checkpoint_problem(entries, checkpoints, public_key),
            )
            if p is not None
        ]
        first = min(found, key=lambda p: p[0]) if found else (None, None, "")
        return Verdict(len(entries), len(checkpoints), public_key is not None, *first)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: two processes appending at once must not both take seq n.
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"audit trail {self.path}: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def config_digest(cfg: Config) -> str:
    """SHA-256 hex of the configuration file (of its parsed form if it has none)."""
    if cfg.source and Path(cfg.source).is_file():
        return hashlib.sha256(Path(cfg.source).read_bytes()).hexdigest()
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()


def record_training_round(
    cfg: Config, round_id: int, epsilon_spent: float, epsilon_total: float
) -> int:
    """Record a finished DP-SGD round: the epsilon it spent and the total since.

    Raises:
        KeyFileError: A key exists but is unsafe or malformed.
        StoreError: The entry could not be written.
    """
    details = {
        "round": round_id,
        "epsilon_spent": epsilon_spent,
        "epsilon_total": epsilon_total,
    }
    with AuditLog.for_config(cfg) as audit:
        return audit.record("training.round", details=details)


def record_update_sent(cfg: Config, round_id: int | str, update: bytes) -> int:
    """Record a model update sent upstream, by the SHA-256 of its bytes.

    Raises:
        KeyFileError: A key exists but is unsafe or malformed.
        StoreError: The entry could not be written.
    """
    digest = hashlib.sha256(update).hexdigest()
    with AuditLog.for_config(cfg) as audit:
        return audit.record(
            "update.sent", details={"round": round_id, "update_sha256": digest}
        )


class AlertAudit:
    """Records alerts raised and acknowledged: kind, alert id and priority only.

    An `AlertManager` observer. Its calls come on the event loop, and an audit
    write waits for an fsync, so entries are written by one worker thread, in
    the order the events came.
    """

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="audit"
        )

    def alert_event(self, what: str, alert: Alert, target: str | None = None) -> None:
        """Queue an entry for "raised" and "acknowledged"; ignore the rest."""
        if what not in ("raised", "acknowledged"):
            return
        details = {"alert": alert.id, "priority": alert.priority.label}
        self._worker.submit(self._write, f"alert.{what}", details)

    def close(self) -> None:
        """Write what is queued, then stop the worker."""
        self._worker.shutdown(wait=True)

    def _write(self, kind: str, details: dict[str, object]) -> None:
        try:
            self._audit.record(kind, details=details)
        except Exception:
            # The audit trail failing must not stop alerts; the operator sees it.
            log.exception("audit entry %s could not be written", kind)


@contextmanager
def audit_alerts(cfg: Config, alerts: AlertManager) -> Iterator[AuditLog]:
    """Open the audit trail for a running agent and watch its alerts.

    Records ``agent.started`` with the configuration's hash; on exit, writes the
    queued entries, signs a checkpoint and closes.

    Raises:
        KeyFileError: A key exists but is unsafe or malformed.
        StoreError: The audit file cannot be opened.
    """
    audit = AuditLog.for_config(cfg)
    observer = AlertAudit(audit)
    try:
        audit.record("agent.started", details={"config_sha256": config_digest(cfg)})
        alerts.observers.append(observer)
        yield audit
    finally:
        with contextlib.suppress(ValueError):
            alerts.observers.remove(observer)
        observer.close()
        audit.close()


_Problem = tuple[int, str, str]


def _chain_problem(entries: list[Entry]) -> _Problem | None:
    hashes = {e.hash for e in entries}
    prev, expected = GENESIS, 1
    for e in entries:
        if e.seq != expected:
            return expected, "missing", f"entries {expected} to {e.seq - 1} are gone"
        if entry_hash(e.seq, e.at, e.kind, e.subject, e.details, e.prev_hash) != e.hash:
            return _moved_or_edited(e, hashes)
        if e.prev_hash != prev:
            if e.prev_hash in hashes:
                return e.seq, "reordered", f"entry {e.seq} follows a later entry"
            return (
                e.seq - 1,
                "edited",
                f"entry {e.seq - 1} is not the entry that entry {e.seq} follows",
            )
        prev, expected = e.hash, expected + 1
    return None


def _moved_or_edited(e: Entry, hashes: set[str]) -> _Problem:
    """An entry whose hash fails: moved from another seq, or changed."""
    written_as = _original_seq(e)
    if written_as is None:
        return e.seq, "edited", f"entry {e.seq} does not match its hash"
    if e.prev_hash in hashes:
        return (
            e.seq,
            "reordered",
            f"entry {e.seq} was written as entry {written_as}",
        )
    return (
        e.seq,
        "missing",
        f"entry {e.seq} was written as entry {written_as}: entries before it are gone",
    )


def _original_seq(e: Entry) -> int | None:
    for seq in range(1, min(_SEARCH_LIMIT, 2 * e.seq + 1000)):
        if entry_hash(seq, e.at, e.kind, e.subject, e.details, e.prev_hash) == e.hash:
            return seq
    return None


def _checkpoint_problem(
    entries: list[Entry],
    checkpoints: list[tuple[int, str, bytes]],
    public_key: Ed25519PublicKey | None,
) -> _Problem | None:
    by_seq = {e.seq: e.hash for e in entries}
    for seq, digest, signature in checkpoints:
        if public_key is not None:
            try:
                public_key.verify(signature, checkpoint_message(seq, digest))
            except InvalidSignature:
                return seq, "signature", f"checkpoint {seq} is not signed by this key"
        if seq not in by_seq:
            return seq, "missing", f"entry {seq}, signed in a checkpoint, is gone"
        if by_seq[seq] != digest:
            return seq, "edited", f"entry {seq} is not the one its checkpoint signed"
    return None


def audit_command(cfg: Config, action: str, *, limit: int, as_json: bool) -> int:
    """`iomt-gateway audit verify|show|checkpoint`; return the exit code.

    Raises:
        AuditTamperedError: `verify` found a problem (the message names it).
        KeyFileError: A key exists but is unsafe or malformed.
    """
    path = cfg.path(cfg.security.audit_file)
    if not path.exists():
        if KeySource.for_config(cfg).has(SIGNING_KEY):
            # `keys init` opens the trail, so a gateway with keys has one.
            raise AuditTamperedError(
                f"no audit trail at {path}, although this gateway has a signing "
                "key: it was deleted or moved"
            )
        print(f"no audit trail at {path} yet")
        return ExitCode.OK
    audit = AuditLog.for_config(cfg)
    try:
        if action == "checkpoint":
            print(f"checkpoint signed at entry {audit.checkpoint()}")
        elif action == "show":
            _show(audit.entries()[-limit:], as_json)
        else:
            _report(audit.verify())
    finally:
        audit.close(checkpoint=False)
    return ExitCode.OK


def _show(entries: list[Entry], as_json: bool) -> None:
    for e in entries:
        if as_json:
            print(canonical(e.as_dict()))
            continue
        when = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{e.seq:>6}  {when}  {e.kind:<20} {e.subject or '-':<18} {e.details}")


def _report(verdict: Verdict) -> None:
    if not verdict.ok:
        raise AuditTamperedError(
            f"audit trail: {verdict.problem} at entry {verdict.bad_seq}: "
            f"{verdict.detail}; keep the file as evidence"
        )
    signed = "" if verdict.signatures_checked else " (signatures NOT checked: no key)"
    print(
        f"audit trail ok: {verdict.entries} entries, "
        f"{verdict.checkpoints} checkpoints{signed}"
    )
