"""The gateway's federation log: what each round sent upstream, in SQLite.

One row per round the SuperLink asked for: the run and server round, the outcome
(sent, or refused and why in one word), bytes of update data sent, the update's
SHA-256, the examples it was weighted by, and the cumulative epsilon after it. A
second table remembers which global model version is installed. Nothing in it is
a reading, a patient ref or a device address. `iomt-gateway federation status`
prints it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.clock import Clock, SystemClock

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS rounds (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        run_id TEXT NOT NULL,
        server_round INTEGER NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('sent', 'budget', 'no-data')),
        bytes_sent INTEGER NOT NULL,
        update_sha256 TEXT,
        examples INTEGER NOT NULL,
        epsilon_after REAL NOT NULL,
        model_version INTEGER
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS installed (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        at REAL NOT NULL
    )
    """,
)


@dataclass(frozen=True)
class RoundEntry:
    """One round as the gateway logged it."""

    id: int
    at: float
    run_id: str
    server_round: int
    outcome: str
    bytes_sent: int
    update_sha256: str | None
    examples: int
    epsilon_after: float
    model_version: int | None

    def as_dict(self) -> dict[str, object]:
        """The entry as JSON-ready data."""
        return asdict(self)


class FederationLog:
    """The rounds this gateway took part in, and the model version it installed."""

    def __init__(self, path: Path, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or SystemClock()
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A round that was sent must stay logged through a power cut.
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._db.execute(statement)

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> FederationLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(
        self,
        *,
        run_id: str,
        server_round: int,
        outcome: str,
        bytes_sent: int,
        update_sha256: str | None,
        examples: int,
        epsilon_after: float,
        model_version: int | None,
    ) -> int:
        """Log one round; return its id."""
        cursor = self._db.execute(
            "INSERT INTO rounds (at, run_id, server_round, outcome, bytes_sent,"
            " update_sha256, examples, epsilon_after, model_version)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self._clock.now(),
                run_id,
                server_round,
                outcome,
                bytes_sent,
                update_sha256,
                examples,
                epsilon_after,
                model_version,
            ),
        )
        return int(cursor.lastrowid)

    def rounds(self, limit: int | None = None) -> list[RoundEntry]:
        """The last `limit` rounds (all when None), oldest first."""
        rows = self._db.execute(
            "SELECT id, at, run_id, server_round, outcome, bytes_sent, update_sha256,"
            " examples, epsilon_after, model_version FROM rounds ORDER BY id DESC"
            " LIMIT ?",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [RoundEntry(*row) for row in reversed(rows)]

    def installed_version(self) -> int | None:
        """Version of the global model installed, or None if none yet."""
        row = self._db.execute("SELECT version FROM installed WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def set_installed(self, version: int) -> None:
        """Remember that global model `version` is now the current model."""
        self._db.execute(
            "INSERT INTO installed (id, version, at) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
            " at = excluded.at",
            (version, self._clock.now()),
        )
