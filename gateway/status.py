"""`iomt-gateway status`: is this gateway doing its job, on one screen.

Two halves, in two processes. The running agent writes ``status.json`` into its
data directory every `WRITE_EVERY_S` seconds (temp file, fsync, rename, so a reader
never sees half a file): link states, each source's last-data age, battery, signal,
reconnect counts and counters since start. It holds no reading values, no labels,
only pseudonymous refs and device ids. The status command adds what it can read
from the agent's files itself: open alerts from the outbox, disk use, the installed
model and the privacy budget. A status file older than `STALE_AFTER_S` means the
agent is not running (or is stuck), and the screen says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.alarms import Priority
from gateway.clock import Clock
from gateway.files import write_atomically
from gateway.readings import Reading

if TYPE_CHECKING:
    from gateway.agent import Agent
    from gateway.config import Config

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
WRITE_EVERY_S = 5.0
STALE_AFTER_S = 3 * WRITE_EVERY_S
"""A status file this old was not refreshed by a running agent."""


class Activity:
    """Pipeline observer: when each device last delivered a reading, and from where.

    Only times and pseudonymous ids are kept; the hot path is one dict update.

    Args:
        clock: The agent's clock (readings arrive on its time).
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.last: dict[str, tuple[str, str | None, str | None, float]] = {}
        self.quarantined: dict[str, int] = {}

    def reading_in(self, reading: Reading, source: str) -> None:
        """A reading arrived from `source` ("ble", "mqtt", "replay")."""
        if source == "model":
            return  # derived from a reading already seen, not a sign of life
        self.last[reading.device_id] = (
            source,
            reading.patient_ref,
            reading.room,
            self._clock.now(),
        )

    def quarantined_in(self, source: str, reason: str) -> None:
        """An input was quarantined (counted per transport)."""
        transport = source.split(":", 1)[0]
        self.quarantined[transport] = self.quarantined.get(transport, 0) + 1

    def sources(self, now: float) -> list[dict[str, Any]]:
        """Each device seen, with its last-data age in seconds as of `now`."""
        return [
            {
                "device": device,
                "source": source,
                "patient_ref": ref,
                "room": room,
                "last_data_age_s": round(max(0.0, now - at), 1),
            }
            for device, (source, ref, room, at) in sorted(self.last.items())
        ]


# -- the agent's half ---------------------------------------------------------------


def agent_status(agent: Agent, *, running: bool = True) -> dict[str, Any]:
    """The status document of a running agent (JSON-ready, nothing personal)."""
    now = agent.clock.now()
    return {
        "gateway": agent.config.gateway.id,
        "pid": os.getpid(),
        "running": running,
        "written_at": time.time(),
        "clock": now,
        "mqtt": {
            role: {"connected": link.connected.is_set(), "reconnects": link.reconnects}
            for role, link in agent.links.items()
        },
        "wearables": [_wearable(link, now) for link in agent.wearables],
        "sources": agent.activity.sources(now),
        "pipeline": dataclasses.asdict(agent.pipeline.stats),
        "quarantined_by_source": dict(agent.activity.quarantined),
        "alerts_since_start": dataclasses.asdict(agent.alerts.stats),
        "store_backlog": agent.store.backlog,
    }


def _wearable(link: Any, now: float) -> dict[str, Any]:
    last = link.last_data_at
    return {
        "device": link.name,
        "patient_ref": link.spec.patient_ref,
        "state": link.state,
        "connected": link.state == "connected",
        "last_data_age_s": None if last is None else round(max(0.0, now - last), 1),
        "battery": link.battery,
        "rssi": link.rssi,
        "reconnects": link.reconnects,
    }


def write_status(path: Path, document: dict[str, Any]) -> None:
    """Replace `path` with `document` atomically (temp file, fsync, rename)."""
    write_atomically(path, json.dumps(document, separators=(",", ":")).encode())


async def write_forever(agent: Agent, path: Path) -> None:
    """Refresh the status file until cancelled; a last write marks the agent stopped."""
    try:
        while True:
            _write_quietly(path, agent_status(agent))
            await asyncio.sleep(WRITE_EVERY_S)
    except asyncio.CancelledError:
        _write_quietly(path, agent_status(agent, running=False))
        raise


def _write_quietly(path: Path, document: dict[str, Any]) -> None:
    # A full card must not stop the agent: the status file is a convenience.
    try:
        write_status(path, document)
    except OSError as exc:
        log.warning("status file not written (%s)", exc.strerror or exc)


def gauges(agent: Agent) -> dict[str, float]:
    """The values `gateway.metrics` reads at scrape time (from the HTTP thread)."""
    cfg = agent.config
    privacy = privacy_info(cfg)
    links = list(agent.links.values())
    return {
        "ble_reconnects": sum(w.reconnects for w in agent.wearables),
        "mqtt_reconnects": sum(link.reconnects for link in links),
        "mqtt_connected": float(all(link.connected.is_set() for link in links)),
        "wearables_connected": sum(w.state == "connected" for w in agent.wearables),
        "wearables_configured": len(cfg.devices),
        "store_bytes": disk_use(cfg)["total_bytes"],
        "training_rounds": privacy["rounds"],
        "privacy_epsilon_spent": privacy["epsilon_spent"],
        "privacy_epsilon_max": privacy["epsilon_max"],
    }


# -- the status command's half ------------------------------------------------------


def gather(cfg: Config, now: float | None = None) -> dict[str, Any]:
    """Everything the status screen shows, as JSON-ready data."""
    now = time.time() if now is None else now
    data_dir = cfg.gateway.data_dir
    return {
        "gateway": cfg.gateway.id,
        "agent": _read_agent(data_dir / STATUS_FILE, now),
        "alerts": open_alerts(cfg.path(cfg.alerts.outbox_file)),
        "disk": disk_use(cfg),
        "model": model_info(cfg.path(cfg.learning.models_dir) / "current.tflite"),
        "privacy": privacy_info(cfg),
        "uplink": uplink_info(cfg.path(cfg.federation.log_file), now),
    }


def uplink_info(log_file: Path, now: float) -> dict[str, Any]:
    """The federated uplink as this gateway's round log records it.

    The SuperNode runs beside the agent, not in it: its last round is the sign of
    life the status can read. TODO(status): the SuperNode's live connection state.
    """
    if not log_file.exists():
        return {"configured": False}
    from gateway.federation.ledger import FederationLog

    with FederationLog(log_file) as ledger:
        rounds, version = ledger.rounds(limit=1), ledger.installed_version()
    info: dict[str, Any] = {"configured": True, "model_version": version}
    if rounds:
        last = rounds[-1]
        info |= {
            "last_round_age_s": round(max(0.0, now - last.at), 1),
            "last_round": last.server_round,
            "last_outcome": last.outcome,
        }
    return info


def _read_agent(path: Path, now: float) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not path.parent.is_dir():
            reason = f"no data directory {path.parent}: the agent never ran with it"
            return {"running": False, "reason": reason}
        return {"running": False, "reason": "no status file: the agent never ran"}
    except (OSError, ValueError) as exc:
        return {"running": False, "reason": f"status file unreadable ({exc})"}
    age = max(0.0, now - float(document.get("written_at", 0.0)))
    document["status_age_s"] = round(age, 1)
    if not document.get("running"):
        document["reason"] = "the agent stopped"
    elif age > STALE_AFTER_S:
        document["running"] = False
        document["reason"] = f"status not refreshed for {age:.0f} s"
    return document


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection | None]:
    if not path.exists():
        yield None
        return
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def open_alerts(outbox: Path) -> dict[str, Any]:
    """Open alerts by priority, unacknowledged ones, and deliveries still pending."""
    counts = {p.label: 0 for p in sorted(Priority, reverse=True)}
    result: dict[str, Any] = {"open": counts, "unacknowledged": 0, "pending": 0}
    with _read_only(outbox) as db:
        if db is None:
            return result
        # Reads the outbox's own schema (gateway.outbox) without opening it for
        # writing: the agent holds it, and a status check must not create it.
        rows = db.execute(
            "SELECT priority, count(*), sum(acked_at IS NULL) FROM alerts "
            "WHERE state = 'open' GROUP BY priority"
        ).fetchall()
        (pending,) = db.execute(
            "SELECT count(*) FROM deliveries WHERE delivered_at IS NULL"
        ).fetchone()
    for priority, n, unacked in rows:
        counts[Priority(priority).label] = n
        result["unacknowledged"] += unacked
    result["pending"] = pending
    return result


def disk_use(cfg: Config) -> dict[str, Any]:
    """Bytes of each of the gateway's files (with WAL), and free space left."""
    files = {
        "store": cfg.path(cfg.store.file),
        "outbox": cfg.path(cfg.alerts.outbox_file),
        "privacy": cfg.path(cfg.learning.privacy_file),
    }
    sizes = {name: _db_bytes(path) for name, path in files.items()}
    sizes["models"] = _dir_bytes(cfg.path(cfg.learning.models_dir))
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(cfg.gateway.data_dir).free
    return {"bytes": sizes, "total_bytes": sum(sizes.values()), "free_bytes": free}


def _db_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += os.stat(f"{path}{suffix}").st_size
    return total


def _dir_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def model_info(current: Path) -> dict[str, Any]:
    """The installed model's version: a content hash and its install time."""
    try:
        data = current.read_bytes()
        installed = current.stat().st_mtime
    except OSError:
        return {"installed": False}
    return {
        "installed": True,
        "version": hashlib.sha256(data).hexdigest()[:12],
        "installed_at": installed,
        "bytes": len(data),
    }


def privacy_info(cfg: Config) -> dict[str, Any]:
    """Epsilon spent and left, and the number of training rounds."""
    learning = cfg.learning
    path = cfg.path(learning.privacy_file)
    spent, rounds = 0.0, 0
    if path.exists():
        # Imported here: scipy is not needed for a status check without training.
        from gateway.learning.privacy import PrivacyAccount

        account = PrivacyAccount(
            path, epsilon_max=learning.epsilon_max, delta=learning.delta
        )
        try:
            spent, rounds = account.spent(), len(account.history())
        finally:
            account.close()
    return {
        "epsilon_spent": spent,
        "epsilon_max": learning.epsilon_max,
        "epsilon_left": max(0.0, learning.epsilon_max - spent),
        "delta": learning.delta,
        "rounds": rounds,
    }


# -- the screen ---------------------------------------------------------------------


def render(status: dict[str, Any]) -> str:
    """The status screen as text."""
    lines = [f"gateway {status['gateway']}"]
    lines += _agent_lines(status["agent"])
    lines.append(_uplink_line(status["uplink"]))
    lines += _alert_lines(status["alerts"])
    lines += _disk_lines(status["disk"])
    lines += _learning_lines(status["model"], status["privacy"])
    return "\n".join(lines)


def _uplink_line(uplink: dict[str, Any]) -> str:
    if not uplink["configured"]:
        return "uplink    not configured (no federated round yet)"
    version = uplink["model_version"]
    model = f"global model v{version}" if version is not None else "no global model"
    if "last_round" not in uplink:
        return f"uplink    no federated round yet; {model}"
    return (
        f"uplink    last federated round {uplink['last_round']} "
        f"{_ago(uplink['last_round_age_s'])} ({uplink['last_outcome']}); {model}"
    )


def _agent_lines(agent: dict[str, Any]) -> list[str]:
    if "written_at" not in agent:
        return [f"agent     NOT RUNNING: {agent['reason']}"]
    age = agent["status_age_s"]
    if agent["running"]:
        head = f"agent     running (pid {agent['pid']}, status {age:.0f} s old)"
    else:
        head = f"agent     NOT RUNNING: {agent['reason']} (last status {_ago(age)})"
    lines = [head]
    for role, link in sorted(agent["mqtt"].items()):
        state = "connected" if link["connected"] else "DISCONNECTED"
        state += "" if agent["running"] else " at last status"
        lines.append(f"mqtt      {role:<8} {state}, {link['reconnects']} reconnects")
    lines += [_wearable_line(w, age) for w in agent["wearables"]]
    lines += [_source_line(s, age) for s in agent["sources"]]
    p = agent["pipeline"]
    lines.append(
        f"ingest    {p['readings']} readings, {p['quarantined']} quarantined, "
        f"{p['events']} alarm events since start"
    )
    return lines


def _wearable_line(w: dict[str, Any], extra: float) -> str:
    last = w["last_data_age_s"]
    data = "no data yet" if last is None else f"last data {_ago(last + extra)}"
    battery = "?" if w["battery"] is None else f"{w['battery']}%"
    rssi = "?" if w["rssi"] is None else f"{w['rssi']} dBm"
    return (
        f"wearable  {w['device']:<18} {w['patient_ref'] or '-':<10} {w['state']:<10} "
        f"{data}, battery {battery}, signal {rssi}, {w['reconnects']} reconnects"
    )


def _source_line(s: dict[str, Any], extra: float) -> str:
    whose = s["patient_ref"] or s["room"] or "-"
    kind = "room" if s["room"] and not s["patient_ref"] else "stream"
    return (
        f"{kind:<9} {s['device']:<18} {whose:<10} {s['source']:<10} "
        f"last data {_ago(s['last_data_age_s'] + extra)}"
    )


def _alert_lines(alerts: dict[str, Any]) -> list[str]:
    opened = ", ".join(f"{n} {p}" for p, n in alerts["open"].items())
    return [
        f"alerts    open: {opened}; {alerts['unacknowledged']} unacknowledged, "
        f"{alerts['pending']} deliveries pending"
    ]


def _disk_lines(disk: dict[str, Any]) -> list[str]:
    parts = ", ".join(f"{k} {_size(v)}" for k, v in disk["bytes"].items())
    free = "?" if disk["free_bytes"] is None else _size(disk["free_bytes"])
    return [f"disk      {_size(disk['total_bytes'])} ({parts}); {free} free"]


def _learning_lines(model: dict[str, Any], privacy: dict[str, Any]) -> list[str]:
    if model["installed"]:
        installed = time.strftime("%Y-%m-%d %H:%M", time.gmtime(model["installed_at"]))
        head = f"model     {model['version']} installed {installed} UTC"
    else:
        head = "model     none installed"
    return [
        head,
        f"privacy   epsilon {privacy['epsilon_spent']:.3f} spent of "
        f"{privacy['epsilon_max']:g}, {privacy['epsilon_left']:.3f} left "
        f"({privacy['rounds']} rounds, delta {privacy['delta']:g})",
    ]


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
