"""Contec CMS50D-BT pulse oximeter: vendor frames on characteristic 0000ff02-...

Contec publishes no protocol. What is known comes from a Wireshark capture by a
user (tobiasisenberg/OxiVis issue #2): streaming starts after writing `9b 01 1c` to
characteristic ff01 (and must be repeated, or the device stops within a minute),
then ff02 notifies frames that start with 0xEB. Real frames are in
`tests/data/ble_captures.csv`, rows C21 and C22. Offsets below are 0-based; the
issue counts bytes from 1, so its "BPM in byte 4" is offset 3 here.

Vitals frame, 8 bytes, `eb 01 ...` (C21 `eb 01 04 53 63 7f 00 25`):

======  ====================================================================
0       0xEB, frame start
1       0x01, vitals
2       finger status: 0x04 no finger, 0x06 finger in (the reporter's reading
        of it; other values are kept raw and count as "unknown")
3       pulse rate, bpm; 0xFF means no value
4       SpO2, %; 0x7F means no value
5-7     not understood (offset 5 carries 0x7F in every capture seen); kept raw
======  ====================================================================

Waveform frame, 6 bytes, `eb 00 ...` (C22 `eb 00 03 48 09 3f`): a plethysmogram
or bar-graph frame. Which byte is which sample is not documented, so the four
bytes after the header are kept raw as a `ContecWaveform`, not as vitals.

TODO(ble): a notification carrying two frames back to back is rejected (length
check), not split: no capture shows one, and guessing would mis-assign bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.readings import Kind, Quality, Reading
from sensors.ble.basic import ReadingStamp
from sensors.errors import DecodeError

MODEL = "contec-cms50d-bt"
CHARACTERISTIC = "0000ff02-0000-1000-8000-00805f9b34fb"

FRAME_START = 0xEB
VITALS = 0x01
WAVEFORM = 0x00
VITALS_SIZE = 8
WAVEFORM_SIZE = 6
NO_SPO2 = 0x7F
NO_PULSE = 0xFF
FINGER_STATES = {0x04: False, 0x06: True}


@dataclass(frozen=True, slots=True)
class ContecVitals:
    """A decoded vitals frame.

    Attributes:
        finger_status: Offset 2 as sent.
        pulse_bpm: Pulse rate, None when the device sent "no value" (0xFF).
        spo2_pct: SpO2, None when the device sent "no value" (0x7F).
        extra: Offsets 5-7, not understood, kept for later analysis.
    """

    finger_status: int
    pulse_bpm: int | None
    spo2_pct: int | None
    extra: bytes

    @property
    def finger_in(self) -> bool | None:
        """True: finger in the probe; False: no finger; None: unknown status."""
        return FINGER_STATES.get(self.finger_status)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {
            "model": MODEL,
            "frame": "vitals",
            "finger_status": f"0x{self.finger_status:02x}",
            "finger_in": self.finger_in,
            "pulse_bpm": self.pulse_bpm,
            "spo2_pct": self.spo2_pct,
            "extra": self.extra.hex(" "),
        }


@dataclass(frozen=True, slots=True)
class ContecWaveform:
    """A decoded waveform frame: bytes after the header, meaning not documented."""

    samples: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {"model": MODEL, "frame": "waveform", "samples": list(self.samples)}


def decode_frame(data: bytes) -> ContecVitals | ContecWaveform:
    """Decode one ff02 notification holding one frame.

    Raises:
        DecodeError: Not a frame start, an unknown frame type, a length other
            than the frame type's, or SpO2 above 100 % that is not "no value".
    """
    if len(data) < 2 or data[0] != FRAME_START:
        raise DecodeError(MODEL, "not a frame (no 0xEB start)")
    if data[1] == WAVEFORM:
        _check_size(data, WAVEFORM_SIZE)
        return ContecWaveform(tuple(data[2:]))
    if data[1] != VITALS:
        raise DecodeError(MODEL, f"unknown frame type 0x{data[1]:02x}")
    _check_size(data, VITALS_SIZE)
    pulse, spo2 = data[3], data[4]
    if spo2 > 100 and spo2 != NO_SPO2:
        raise DecodeError(MODEL, "SpO2 above 100 %")
    return ContecVitals(
        finger_status=data[2],
        pulse_bpm=None if pulse == NO_PULSE else pulse,
        spo2_pct=None if spo2 == NO_SPO2 else spo2,
        extra=bytes(data[5:]),
    )


def contec_readings(
    m: ContecVitals | ContecWaveform, stamp: ReadingStamp, *, use_device_time: bool
) -> list[Reading]:
    """SPO2 and PULSE_RATE from a vitals frame; none from a waveform frame.

    No finger flags CONTACT_LOST (the device keeps sending its last numbers);
    "no value" becomes NaN and a zero stays zero, both flagged NO_READING.
    """
    del use_device_time  # the frames carry no time
    if isinstance(m, ContecWaveform):
        return []
    contact = Quality.CONTACT_LOST if m.finger_in is False else Quality.OK
    return [
        _reading(stamp, Kind.SPO2, m.spo2_pct, contact),
        _reading(stamp, Kind.PULSE_RATE, m.pulse_bpm, contact),
    ]


def _reading(
    stamp: ReadingStamp, kind: Kind, value: int | None, quality: Quality
) -> Reading:
    if not value:
        quality |= Quality.NO_READING
    return stamp.reading(kind, math.nan if value is None else float(value), quality)


def _check_size(data: bytes, size: int) -> None:
    if len(data) != size:
        raise DecodeError(MODEL, f"{len(data)} bytes, expected {size}")
