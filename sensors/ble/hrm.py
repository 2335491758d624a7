"""Heart Rate Measurement (GATT characteristic 0x2A37).

Byte layout (Bluetooth SIG, Heart Rate Service 1.0, section 3.1), little-endian:

====== ============================================================================
flags  bit0: HR is uint16 (else uint8); bit1: skin contact detected; bit2: contact
       feature supported; bit3: Energy Expended (uint16, kJ) present; bit4: one or
       more RR intervals present; bits 5-7 reserved
HR     uint8 or uint16, beats per minute, unsigned
EE     uint16 kJ, only when bit3 is set
RR...  zero or more uint16, units of 1/1024 s, oldest first, one per beat
====== ============================================================================

A trailing odd byte after the RR field is not an RR interval: it is reported in
`trailing_bytes` and otherwise ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.readings import Kind, Quality, Reading
from sensors.errors import DecodeError

UUID = "2a37"
RR_UNITS_PER_SECOND = 1024

_HR_UINT16 = 0x01
_CONTACT_DETECTED = 0x02
_CONTACT_SUPPORTED = 0x04
_ENERGY_PRESENT = 0x08
_RR_PRESENT = 0x10


@dataclass(frozen=True, slots=True)
class HeartRateMeasurement:
    """One decoded 0x2A37 notification.

    Attributes:
        flags: The raw flags byte.
        heart_rate: Beats per minute; 0 means the sensor has no reading.
        hr_uint16: Whether HR was sent as uint16.
        contact_supported: The sensor can detect skin contact.
        contact_detected: Skin contact detected (meaningful only when supported).
        energy_kj: Energy expended in kJ, when present.
        rr_raw: RR intervals as sent, in 1/1024 s, oldest first.
        trailing_bytes: Bytes after the last whole RR interval (normally 0).
    """

    flags: int
    heart_rate: int
    hr_uint16: bool
    contact_supported: bool
    contact_detected: bool
    energy_kj: int | None
    rr_raw: tuple[int, ...]
    trailing_bytes: int = 0

    @property
    def rr_ms(self) -> tuple[float, ...]:
        """RR intervals in milliseconds."""
        return tuple(raw * 1000 / RR_UNITS_PER_SECOND for raw in self.rr_raw)

    @property
    def contact_lost(self) -> bool:
        """The sensor supports contact detection and reports none."""
        return self.contact_supported and not self.contact_detected

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view, RR given both raw and in milliseconds."""
        return {
            "flags": f"0x{self.flags:02x}",
            "hr_format": "uint16" if self.hr_uint16 else "uint8",
            "heart_rate_bpm": self.heart_rate,
            "contact": _contact_label(self),
            "energy_kj": self.energy_kj,
            "rr_raw_1_1024s": list(self.rr_raw),
            "rr_ms": [round(ms, 1) for ms in self.rr_ms],
            "trailing_bytes": self.trailing_bytes,
        }


def decode_heart_rate_measurement(data: bytes) -> HeartRateMeasurement:
    """Decode one 0x2A37 notification.

    Raises:
        DecodeError: The payload is shorter than its flags require.
    """
    if not data:
        raise DecodeError(UUID, "empty payload")
    flags = data[0]
    hr_uint16 = bool(flags & _HR_UINT16)
    offset = 1

    hr_size = 2 if hr_uint16 else 1
    if len(data) < offset + hr_size:
        raise DecodeError(UUID, f"{len(data)} bytes, too short for the HR field")
    heart_rate = int.from_bytes(data[offset : offset + hr_size], "little")
    offset += hr_size

    energy = None
    if flags & _ENERGY_PRESENT:
        if len(data) < offset + 2:
            raise DecodeError(UUID, "energy-expended flag set but field missing")
        energy = int.from_bytes(data[offset : offset + 2], "little")
        offset += 2

    rr: tuple[int, ...] = ()
    trailing = len(data) - offset
    if flags & _RR_PRESENT:
        whole = trailing // 2 * 2
        rr = tuple(
            int.from_bytes(data[i : i + 2], "little")
            for i in range(offset, offset + whole, 2)
        )
        trailing -= whole

    return HeartRateMeasurement(
        flags=flags,
        heart_rate=heart_rate,
        hr_uint16=hr_uint16,
        contact_supported=bool(flags & _CONTACT_SUPPORTED),
        contact_detected=bool(flags & _CONTACT_DETECTED),
        energy_kj=energy,
        rr_raw=rr,
        trailing_bytes=trailing,
    )


def hrm_readings(
    m: HeartRateMeasurement, *, device_id: str, patient_ref: str | None, at: float
) -> list[Reading]:
    """Turn one decoded 0x2A37 notification into readings: one HR, one per RR.

    The heart rate is stamped `at`. Each RR interval belongs to its own beat and is
    stamped when that beat ended: the last one at `at`, the one before it at `at`
    minus the last interval, and so on back. HR 0 is flagged NO_READING; a strap
    reporting lost skin contact flags every reading CONTACT_LOST.
    """
    contact = Quality.CONTACT_LOST if m.contact_lost else Quality.OK
    hr_quality = contact | (Quality.NO_READING if m.heart_rate == 0 else Quality.OK)
    heart_rate = Reading(
        device_id=device_id,
        kind=Kind.HEART_RATE,
        value=float(m.heart_rate),
        measured_at=at,
        patient_ref=patient_ref,
        quality=hr_quality,
    )
    return [heart_rate, *_rr_readings(m.rr_raw, device_id, patient_ref, at, contact)]


def encode_heart_rate_measurement(
    heart_rate: int,
    rr_raw: tuple[int, ...] = (),
    *,
    contact: bool | None = True,
    energy_kj: int | None = None,
) -> bytes:
    """Build a 0x2A37 payload as a chest strap sends it (used by replay and tests).

    Args:
        heart_rate: Beats per minute; sent as uint16 when above 255.
        rr_raw: RR intervals in 1/1024 s.
        contact: True or False when contact detection is supported, None when not.
        energy_kj: Energy expended, if the strap reports it.
    """
    flags = 0
    hr_uint16 = heart_rate > 0xFF
    flags |= _HR_UINT16 if hr_uint16 else 0
    if contact is not None:
        flags |= _CONTACT_SUPPORTED | (_CONTACT_DETECTED if contact else 0)
    flags |= _ENERGY_PRESENT if energy_kj is not None else 0
    flags |= _RR_PRESENT if rr_raw else 0

    out = bytearray([flags])
    out += heart_rate.to_bytes(2 if hr_uint16 else 1, "little")
    if energy_kj is not None:
        out += energy_kj.to_bytes(2, "little")
    for raw in rr_raw:
        out += raw.to_bytes(2, "little")
    return bytes(out)


def _rr_readings(
    rr_raw: tuple[int, ...],
    device_id: str,
    patient_ref: str | None,
    at: float,
    quality: Quality,
) -> list[Reading]:
    ends: list[float] = []
    end = at
    for raw in reversed(rr_raw):
        ends.append(end)
        end -= raw / RR_UNITS_PER_SECOND
    ends.reverse()
    return [
        Reading(
            device_id=device_id,
            kind=Kind.RR_INTERVAL,
            value=raw * 1000 / RR_UNITS_PER_SECOND,
            measured_at=beat_end,
            patient_ref=patient_ref,
            quality=quality,
        )
        for raw, beat_end in zip(rr_raw, ends, strict=True)
    ]


def _contact_label(m: HeartRateMeasurement) -> str:
    if not m.contact_supported:
        return "not supported"
    return "detected" if m.contact_detected else "not detected"
