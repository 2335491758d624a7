"""MIMIC-III Waveform Database numerics: per-minute HR and SpO2 trends, replayed.

The bedside monitor exports one value per minute. It encodes "sensor off" as 0
(the probe fell off, the leads are off): such minutes become readings flagged
`Quality.NO_READING`, which rules treat as a technical condition, never as a
physiological one. A blank cell means no value was exported and yields nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from gateway.readings import Kind, Quality, Reading
from sensors.replay import ReplayEvent

COLUMNS: dict[Kind, str] = {Kind.HEART_RATE: "HR_bpm", Kind.SPO2: "SpO2_%"}
"""Which CSV column each replayed kind comes from."""


def trend_readings(
    csv_path: Path, *, start: float, device_id: str, patient_ref: str | None
) -> Iterator[ReplayEvent]:
    """Yield HR and SpO2 readings at `start + minute * 60`, in time order.

    Raises:
        ValueError: A cell is neither blank nor a number.
        KeyError: The file lacks the minute, HR_bpm or SpO2_% column.
    """
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            at = start + int(row["minute"]) * 60.0
            for kind, column in COLUMNS.items():
                reading = _reading(row[column], kind, at, device_id, patient_ref)
                if reading is not None:
                    yield ReplayEvent(at, device_id, "reading", reading)


def _reading(
    cell: str, kind: Kind, at: float, device_id: str, patient_ref: str | None
) -> Reading | None:
    if not cell.strip():
        return None
    value = float(cell)
    return Reading(
        device_id=device_id,
        kind=kind,
        value=value,
        measured_at=at,
        patient_ref=patient_ref,
        quality=Quality.NO_READING if value == 0 else Quality.OK,
    )
