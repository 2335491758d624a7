"""Blood Pressure Measurement 0x2A35.

Byte layout from the Blood Pressure Service 1.0 (BLS), section 3.1, and the GATT
Specification Supplement section "Blood Pressure Measurement". Little-endian:

========  =====================================================================
flags     bit0 unit: 0 mmHg, 1 kPa; bit1 Time Stamp present; bit2 Pulse Rate
          present; bit3 User ID present; bit4 Measurement Status present; bits
          5-7 reserved
systolic  SFLOAT, in the unit bit0 names
diastolic SFLOAT
MAP       SFLOAT, mean arterial pressure
stamp     Date Time, 7 bytes (bit1)
pulse     SFLOAT, beats per minute (bit2)
user      uint8 (bit3); 0xFF is "unknown user"
status    uint16 (bit4): bit0 body movement detected; bit1 cuff too loose; bit2
          irregular pulse detected; bits 3-4 pulse rate range (0 within range, 1
          above the upper limit, 2 below the lower limit, 3 reserved); bit5
          improper measurement position; bits 6-15 reserved
========  =====================================================================

Readings are in mmHg: 1 kPa = 7.50062 mmHg.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.readings import Kind, Reading
from sensors.ble.basic import DateTime, FieldReader, ReadingStamp
from sensors.ble.ieee11073 import Medfloat

UUID = "2a35"
MMHG_PER_KPA = 7.50062
UNKNOWN_USER = 0xFF

_KPA = 0x01
_TIMESTAMP = 0x02
_PULSE = 0x04
_USER = 0x08
_STATUS = 0x10

PULSE_RANGES = {0: "within range", 1: "above upper limit", 2: "below lower limit"}


@dataclass(frozen=True, slots=True)
class BloodPressureStatus:
    """The Measurement Status field, bit by bit."""

    raw: int

    @property
    def body_movement(self) -> bool:
        """Bit0: the patient moved during the measurement."""
        return bool(self.raw & 0x01)

    @property
    def cuff_too_loose(self) -> bool:
        """Bit1: the cuff does not fit properly."""
        return bool(self.raw & 0x02)

    @property
    def irregular_pulse(self) -> bool:
        """Bit2: an irregular pulse was detected."""
        return bool(self.raw & 0x04)

    @property
    def pulse_range(self) -> str:
        """Bits 3-4: the pulse rate against the device's limits."""
        return PULSE_RANGES.get(self.raw >> 3 & 0x03, "reserved")

    @property
    def improper_position(self) -> bool:
        """Bit5: the measurement position was improper."""
        return bool(self.raw & 0x20)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {
            "raw": f"0x{self.raw:04x}",
            "body_movement": self.body_movement,
            "cuff_too_loose": self.cuff_too_loose,
            "irregular_pulse": self.irregular_pulse,
            "pulse_range": self.pulse_range,
            "improper_position": self.improper_position,
        }


@dataclass(frozen=True, slots=True)
class BloodPressureMeasurement:
    """A decoded 0x2A35 value; pressures as sent, in the unit `kpa` names."""

    flags: int
    systolic: Medfloat
    diastolic: Medfloat
    mean_arterial: Medfloat
    kpa: bool
    timestamp: DateTime | None
    pulse_rate: Medfloat | None
    user_id: int | None
    status: BloodPressureStatus | None

    def mmhg(self, value: Medfloat) -> Medfloat:
        """One of this measurement's pressures in mmHg.

        >>> from sensors.ble.ieee11073 import decode_sfloat
        >>> sixteen = decode_sfloat(0xF0A0)  # mantissa 160, exponent -1: 16.0 kPa
        >>> m = BloodPressureMeasurement(1, sixteen, sixteen, sixteen, True,
        ...                              None, None, None, None)
        >>> round(m.mmhg(m.systolic).value, 3)
        120.01
        """
        return value.map(MMHG_PER_KPA) if self.kpa else value

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view; special values print as their names."""
        return {
            "characteristic": UUID,
            "flags": f"0x{self.flags:02x}",
            "unit": "kPa" if self.kpa else "mmHg",
            "systolic": self.systolic.as_json(),
            "diastolic": self.diastolic.as_json(),
            "mean_arterial": self.mean_arterial.as_json(),
            "systolic_mmhg": _rounded(self.mmhg(self.systolic)),
            "diastolic_mmhg": _rounded(self.mmhg(self.diastolic)),
            "mean_arterial_mmhg": _rounded(self.mmhg(self.mean_arterial)),
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "pulse_bpm": self.pulse_rate.as_json() if self.pulse_rate else None,
            "user_id": self.user_id,
            "status": self.status.as_dict() if self.status else None,
        }


def decode_blood_pressure_measurement(data: bytes) -> BloodPressureMeasurement:
    """Decode one 0x2A35 value; bytes after the last flagged field are ignored.

    Raises:
        DecodeError: Shorter than its flags require, or a bad timestamp.
    """
    cur = FieldReader(data, UUID)
    flags = cur.uint(1, "flags")
    systolic, diastolic, mean_arterial = cur.sfloat(), cur.sfloat(), cur.sfloat()
    timestamp = cur.date_time() if flags & _TIMESTAMP else None
    pulse = cur.sfloat() if flags & _PULSE else None
    user = cur.uint(1, "user id") if flags & _USER else None
    status = cur.uint(2, "measurement status") if flags & _STATUS else None
    return BloodPressureMeasurement(
        flags=flags,
        systolic=systolic,
        diastolic=diastolic,
        mean_arterial=mean_arterial,
        kpa=bool(flags & _KPA),
        timestamp=timestamp,
        pulse_rate=pulse,
        user_id=user,
        status=None if status is None else BloodPressureStatus(status),
    )


def blood_pressure_readings(
    m: BloodPressureMeasurement, stamp: ReadingStamp, *, use_device_time: bool = False
) -> list[Reading]:
    """Systolic, diastolic and MAP in mmHg, and the pulse rate when sent."""
    measured_at = m.timestamp.epoch if use_device_time and m.timestamp else None
    pairs = [
        (Kind.SYSTOLIC_PRESSURE, m.mmhg(m.systolic)),
        (Kind.DIASTOLIC_PRESSURE, m.mmhg(m.diastolic)),
        (Kind.MEAN_ARTERIAL_PRESSURE, m.mmhg(m.mean_arterial)),
    ]
    if m.pulse_rate is not None:
        pairs.append((Kind.PULSE_RATE, m.pulse_rate))
    return [
        stamp.reading(kind, *value.reading_value(), measured_at)
        for kind, value in pairs
    ]


def _rounded(value: Medfloat) -> float | str:
    # SFLOAT has at most 4 significant digits; past 3 decimals is conversion noise.
    return value.as_json() if value.value is None else round(value.value, 3)
