"""Text views of the outbox and of a run, for the terminal."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping

from gateway.notify import Alert, iso_utc
from gateway.outbox import AlertRecord


def offset(seconds: float, precise: bool = False) -> str:
    """A time offset as ``+HH:MM`` (hours may exceed 24), or ``+MM:SS`` if precise."""
    whole = int(max(0.0, seconds) // (1 if precise else 60))
    return f"+{whole // 60:02d}:{whole % 60:02d}"


def alert_line(
    alert: Alert, start: float, targets: Iterable[str] = (), *, precise: bool = False
) -> str:
    """One alert on one line, its time given relative to `start`."""
    sent = ", ".join(targets)
    escalated = "ESCALATED " if alert.escalation else ""
    return (
        f"{offset(alert.raised_at - start, precise)}  "
        f"{alert.priority.label.upper():<6}  "
        f"{alert.subject():<8}  {alert.category:<13}  {escalated}{alert.reason}"
        + (f"  -> {sent}" if sent else "")
    )


def print_outbox(records: list[AlertRecord], *, as_json: bool = False) -> None:
    """Print the outbox: one alert per line with its state and deliveries."""
    if as_json:
        for r in records:
            print(json.dumps(record_dict(r)))
        return
    if not records:
        print("outbox is empty")
        return
    for r in records:
        a = r.alert
        delivered = sum(1 for d in r.deliveries if d.delivered_at is not None)
        acked = f" acked by {r.acked_by or '?'}" if r.acked_at else ""
        print(
            f"{iso_utc(a.raised_at)}  {a.id[:8]}  {a.priority.label.upper():<6} "
            f"{r.state:<10} {delivered}/{len(r.deliveries)} delivered{acked}  "
            f"{a.subject()}: {a.reason}"
        )


def record_dict(r: AlertRecord) -> dict[str, object]:
    """An outbox record as a JSON-ready dict."""
    return {
        **json.loads(r.alert.to_json()),
        "state": r.state,
        "cleared_at": _iso(r.cleared_at),
        "acked_at": _iso(r.acked_at),
        "acked_by": r.acked_by,
        "outcome": r.outcome,
        "escalated_at": _iso(r.escalated_at),
        "deliveries": [
            {
                "target": d.target,
                "stage": d.stage,
                "attempts": d.attempts,
                "delivered_at": _iso(d.delivered_at),
                "last_error": d.last_error,
            }
            for d in r.deliveries
        ],
    }


def summary_lines(
    records: list[AlertRecord],
    readings: Mapping[str, int],
    quarantined: int,
    subjects: Iterable[str] = (),
) -> list[str]:
    """The demo's closing summary: what was stored, and what was raised for whom.

    Args:
        records: The outbox.
        readings: Stored readings per kind.
        quarantined: Inputs kept in quarantine.
        subjects: Patients and rooms to list even when nothing was raised for them.
    """
    lines = [
        f"readings stored: {sum(readings.values())} "
        f"({', '.join(f'{k} {n}' for k, n in sorted(readings.items()))})",
        f"quarantined input: {quarantined}",
        f"alerts raised: {len(records)}",
    ]
    by_subject: dict[str, Counter[str]] = {s: Counter() for s in subjects}
    for r in records:
        key = f"{r.alert.priority.label} {r.alert.category}"
        by_subject.setdefault(r.alert.subject(), Counter())[key] += 1
    for subject, counts in sorted(by_subject.items()):
        listed = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
        lines.append(f"  {subject:<8} {listed}")
    return lines


def _iso(t: float | None) -> str | None:
    return None if t is None else iso_utc(t)
