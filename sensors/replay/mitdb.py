"""MIT-BIH Arrhythmia Database beat annotations, replayed as a chest strap's BLE.

A BLE chest strap does not send ECG: about once a second it notifies a Heart Rate
Measurement (0x2A37) carrying a smoothed heart rate and the RR intervals of the
beats that ended since its last notification. This module builds exactly those
notifications from the reference beat annotations (sample indices at 360 Hz), so a
replayed record goes through the same decoder as a live strap.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from sensors.ble.hrm import RR_UNITS_PER_SECOND, encode_heart_rate_measurement
from sensors.replay import ReplayEvent

SAMPLE_RATE_HZ = 360
"""MIT-BIH records are sampled at 360 Hz; annotations are sample indices."""

HR_AVERAGE_BEATS = 8
"""Straps report HR as the mean of the last few RR intervals; 8 is typical."""


def read_sample_indices(csv_path: Path) -> list[int]:
    """Read the sample indices from a `<rec>_all.csv` or `<rec>_pvc.csv` file.

    Raises:
        ValueError: A row does not hold an integer sample index in its last column.
    """
    with csv_path.open(newline="") as f:
        rows = csv.reader(f)
        next(rows, None)  # header: ",R" or ",PVC"
        return [int(row[-1]) for row in rows if row]


def heart_rate_notifications(
    csv_path: Path, *, start: float, device_id: str
) -> Iterator[ReplayEvent]:
    """Yield the 0x2A37 notifications a chest strap would send for this record.

    One notification per second of the recording, from the first second in which
    an RR interval is known (a strap has no rate to report before two beats). It
    carries the HR (mean of the last up to 8 RR intervals) and the RR intervals of
    the beats that ended in that second, and is sent at the last such beat; when no
    beat ended, it repeats the HR without RR at the second's end.

    Raises:
        ValueError: The file is not a beat annotation file.
    """
    beats = read_sample_indices(csv_path)
    return heart_rate_notifications_from_beats(beats, start=start, device_id=device_id)


def heart_rate_notifications_from_beats(
    beats: list[int], *, start: float, device_id: str
) -> Iterator[ReplayEvent]:
    """Like `heart_rate_notifications`, from beat sample indices (360 Hz)."""
    for offset, hr, rr_raw in _strap_notifications(beats):
        payload = encode_heart_rate_measurement(hr, rr_raw, contact=True)
        yield ReplayEvent(start + offset, device_id, "ble", payload)


def _strap_notifications(
    beats: list[int],
) -> Iterator[tuple[float, int, tuple[int, ...]]]:
    """(seconds into the recording, HR, RR intervals in 1/1024 s) per second."""
    recent: deque[int] = deque(maxlen=HR_AVERAGE_BEATS)  # RR in samples
    next_beat = 1
    seconds = -(-beats[-1] // SAMPLE_RATE_HZ) if beats else 0
    for second in range(1, seconds + 1):
        window_end = second * SAMPLE_RATE_HZ
        sent_at = float(second)
        rr_raw: list[int] = []
        while next_beat < len(beats) and beats[next_beat] <= window_end:
            rr_samples = beats[next_beat] - beats[next_beat - 1]
            recent.append(rr_samples)
            rr_raw.append(round(rr_samples / SAMPLE_RATE_HZ * RR_UNITS_PER_SECOND))
            sent_at = beats[next_beat] / SAMPLE_RATE_HZ
            next_beat += 1
        if recent:
            yield sent_at, _mean_rate(recent), tuple(rr_raw)


def _mean_rate(rr_samples: deque[int]) -> int:
    mean_rr_s = sum(rr_samples) / len(rr_samples) / SAMPLE_RATE_HZ
    return round(60 / mean_rr_s)
