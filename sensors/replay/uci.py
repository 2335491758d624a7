"""UCI Room Occupancy Estimation recording, replayed as room sensors' MQTT messages.

Each CSV row (about every 30 s) becomes the messages the room's sensors would
publish: temperature, CO2, light, motion and occupancy, each on its own topic with a
small JSON payload `{"ts": <epoch seconds>, "value": <number>}`. The timeline is
rebased so that the first row happens at the replay's start.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from sensors.replay import ReplayEvent

Row = dict[str, str]

SENSORS: dict[str, Callable[[Row], float | int]] = {
    "temperature": lambda row: _number(row["S1_Temp"]),
    "co2": lambda row: _number(row["S5_CO2"]),
    "light": lambda row: _number(row["S1_Light"]),
    "motion": lambda row: int(bool(int(row["S6_PIR"]) or int(row["S7_PIR"]))),
    "occupancy": lambda row: int(row["Room_Occupancy_Count"]),
}
"""Topic suffix -> value taken from a CSV row (units: Cel, ppm, lx, 0/1, people)."""


def room_messages(
    csv_path: Path, *, start: float, room: str, topic_prefix: str = "rooms"
) -> Iterator[ReplayEvent]:
    """Yield the MQTT messages the room's sensors send, one per sensor per row.

    Raises:
        ValueError: A row has a malformed date, time or value.
        KeyError: The file lacks one of the columns used.
    """
    first: datetime | None = None
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            when = datetime.fromisoformat(f"{row['Date']}T{row['Time']}")
            first = first or when
            at = start + (when - first).total_seconds()
            for sensor, value_of in SENSORS.items():
                topic = f"{topic_prefix}/{room}/{sensor}"
                body = json.dumps({"ts": at, "value": value_of(row)}).encode()
                yield ReplayEvent(at, topic, "mqtt", (topic, body))


def _number(text: str) -> float | int:
    """The cell as the sensor would send it: an integer stays an integer."""
    try:
        return int(text)
    except ValueError:
        return float(text)
