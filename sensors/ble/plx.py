"""Pulse oximeter measurements: PLX Spot-Check 0x2A5E and PLX Continuous 0x2A5F.

Byte layouts from the Pulse Oximeter Service 1.0 (PLXS), sections 3.1 and 3.2, and
the GATT Specification Supplement sections "PLX Spot-Check Measurement" and "PLX
Continuous Measurement". Little-endian; SpO2 (%), pulse rate (bpm) and the pulse
amplitude index (%) are SFLOAT.

Spot-Check 0x2A5E:

=======  ======================================================================
flags    bit0 Timestamp present; bit1 Measurement Status present; bit2 Device
         and Sensor Status present; bit3 Pulse Amplitude Index present; bit4
         device clock is not set; bits 5-7 reserved
SpO2PR   SpO2 SFLOAT, PR SFLOAT
stamp    Date Time, 7 bytes (bit0)
status   Measurement Status uint16 (bit1)
device   Device and Sensor Status uint24 (bit2)
PAI      SFLOAT (bit3)
=======  ======================================================================

Continuous 0x2A5F:

=======  ======================================================================
flags    bit0 SpO2PR-Fast present; bit1 SpO2PR-Slow present; bit2 Measurement
         Status present; bit3 Device and Sensor Status present; bit4 Pulse
         Amplitude Index present; bits 5-7 reserved
normal   SpO2PR-Normal: SpO2 SFLOAT, PR SFLOAT
fast     SpO2PR-Fast (bit0)
slow     SpO2PR-Slow (bit1)
status   Measurement Status uint16 (bit2)
device   Device and Sensor Status uint24 (bit3)
PAI      SFLOAT (bit4)
=======  ======================================================================

Measurement Status (uint16), bits 0-4 reserved: 5 measurement ongoing, 6 early
estimated data, 7 validated data, 8 fully qualified data, 9 data from measurement
storage, 10 data for demonstration, 11 data for testing, 12 calibration ongoing, 13
measurement unavailable, 14 questionable measurement detected, 15 invalid
measurement detected.

Device and Sensor Status (uint24), bits 16-23 reserved: 0 extended display update
ongoing, 1 equipment malfunction detected, 2 signal processing irregularity
detected, 3 inadequate signal detected, 4 poor signal detected, 5 low perfusion
detected, 6 erratic signal detected, 7 nonpulsatile signal detected, 8 questionable
pulse detected, 9 signal analysis ongoing, 10 sensor interference detected, 11
sensor unconnected to user, 12 unknown sensor connected, 13 sensor displaced, 14
sensor malfunctioning, 15 sensor disconnected.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.readings import Kind, Quality, Reading
from sensors.ble.basic import DateTime, FieldReader, ReadingStamp
from sensors.ble.ieee11073 import Medfloat

SPOT_CHECK_UUID = "2a5e"
CONTINUOUS_UUID = "2a5f"

MEASUREMENT_STATUS_BITS = {
    5: "measurement_ongoing",
    6: "early_estimated_data",
    7: "validated_data",
    8: "fully_qualified_data",
    9: "data_from_storage",
    10: "data_for_demonstration",
    11: "data_for_testing",
    12: "calibration_ongoing",
    13: "measurement_unavailable",
    14: "questionable_measurement",
    15: "invalid_measurement",
}
DEVICE_STATUS_BITS = {
    0: "extended_display_update_ongoing",
    1: "equipment_malfunction",
    2: "signal_processing_irregularity",
    3: "inadequate_signal",
    4: "poor_signal",
    5: "low_perfusion",
    6: "erratic_signal",
    7: "nonpulsatile_signal",
    8: "questionable_pulse",
    9: "signal_analysis_ongoing",
    10: "sensor_interference",
    11: "sensor_unconnected_to_user",
    12: "unknown_sensor_connected",
    13: "sensor_displaced",
    14: "sensor_malfunctioning",
    15: "sensor_disconnected",
}

# Conditions in which the numbers say nothing about the patient (IEC 60601-1-8:
# technical alarm, not a physiological one).
_OFF_PATIENT = ("sensor_unconnected_to_user", "sensor_displaced", "sensor_disconnected")
_NO_VALUE_MEASUREMENT = ("measurement_unavailable", "invalid_measurement")
_NO_VALUE_DEVICE = ("equipment_malfunction", "sensor_malfunctioning")


@dataclass(frozen=True, slots=True)
class SpO2PR:
    """One SpO2 and pulse-rate pair."""

    spo2: Medfloat
    pulse_rate: Medfloat

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view; special values print as their names."""
        return {"spo2_pct": self.spo2.as_json(), "pulse_bpm": self.pulse_rate.as_json()}


@dataclass(frozen=True, slots=True)
class PlxStatus:
    """Measurement Status and Device and Sensor Status, each None when not sent.

    Every flag is a named boolean (`PlxStatus.flag("sensor_disconnected")`) so that
    alarm logic never tests raw bit numbers.
    """

    measurement: int | None = None
    device: int | None = None

    def flag(self, name: str) -> bool:
        """Whether the named status bit is set (False when its field was not sent).

        Raises:
            KeyError: `name` is not a PLX status bit.
        """
        for bits, raw in (
            (MEASUREMENT_STATUS_BITS, self.measurement),
            (DEVICE_STATUS_BITS, self.device),
        ):
            for bit, bit_name in bits.items():
                if bit_name == name:
                    return raw is not None and bool(raw >> bit & 1)
        raise KeyError(name)

    @property
    def sensor_off(self) -> bool:
        """The sensor is not on the patient: unconnected, displaced or disconnected."""
        return any(self.flag(name) for name in _OFF_PATIENT)

    @property
    def no_measurement(self) -> bool:
        """The device says its numbers are not a measurement."""
        return any(self.flag(name) for name in _NO_VALUE_MEASUREMENT) or any(
            self.flag(name) for name in _NO_VALUE_DEVICE
        )

    def set_flags(self) -> list[str]:
        """The names of all status bits that are set."""
        names = [n for n in MEASUREMENT_STATUS_BITS.values() if self.flag(n)]
        return names + [n for n in DEVICE_STATUS_BITS.values() if self.flag(n)]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view: raw fields and the names of the bits set."""
        return {
            "measurement_status": _hex(self.measurement, 4),
            "device_sensor_status": _hex(self.device, 6),
            "status_flags": self.set_flags(),
        }


@dataclass(frozen=True, slots=True)
class PlxSpotCheck:
    """A decoded 0x2A5E value."""

    flags: int
    reading: SpO2PR
    timestamp: DateTime | None
    status: PlxStatus
    pulse_amplitude_index: Medfloat | None

    @property
    def device_clock_not_set(self) -> bool:
        """Flags bit4: the device says its clock, hence `timestamp`, is not set."""
        return bool(self.flags & 0x10)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view; special values print as their names."""
        return {
            "characteristic": SPOT_CHECK_UUID,
            "flags": f"0x{self.flags:02x}",
            **self.reading.as_dict(),
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "device_clock_not_set": self.device_clock_not_set,
            **self.status.as_dict(),
            "pulse_amplitude_index_pct": _json(self.pulse_amplitude_index),
        }


@dataclass(frozen=True, slots=True)
class PlxContinuous:
    """A decoded 0x2A5F value; `normal` is the reading, fast and slow are extras."""

    flags: int
    normal: SpO2PR
    fast: SpO2PR | None
    slow: SpO2PR | None
    status: PlxStatus
    pulse_amplitude_index: Medfloat | None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view; special values print as their names."""
        return {
            "characteristic": CONTINUOUS_UUID,
            "flags": f"0x{self.flags:02x}",
            **self.normal.as_dict(),
            "fast": self.fast.as_dict() if self.fast else None,
            "slow": self.slow.as_dict() if self.slow else None,
            **self.status.as_dict(),
            "pulse_amplitude_index_pct": _json(self.pulse_amplitude_index),
        }


def decode_spot_check(data: bytes) -> PlxSpotCheck:
    """Decode one 0x2A5E value; bytes after the last flagged field are ignored.

    Raises:
        DecodeError: Empty, or shorter than its flags require, or a bad timestamp.
    """
    cur = FieldReader(data, SPOT_CHECK_UUID)
    flags = cur.uint(1, "flags")
    reading = _spo2pr(cur)
    timestamp = cur.date_time() if flags & 0x01 else None
    measurement = cur.uint(2, "measurement status") if flags & 0x02 else None
    device = cur.uint(3, "device and sensor status") if flags & 0x04 else None
    pai = cur.sfloat() if flags & 0x08 else None
    status = PlxStatus(measurement, device)
    return PlxSpotCheck(flags, reading, timestamp, status, pai)


def decode_continuous(data: bytes) -> PlxContinuous:
    """Decode one 0x2A5F value; bytes after the last flagged field are ignored.

    Raises:
        DecodeError: Empty, or shorter than its flags require.
    """
    cur = FieldReader(data, CONTINUOUS_UUID)
    flags = cur.uint(1, "flags")
    normal = _spo2pr(cur)
    fast = _spo2pr(cur) if flags & 0x01 else None
    slow = _spo2pr(cur) if flags & 0x02 else None
    measurement = cur.uint(2, "measurement status") if flags & 0x04 else None
    device = cur.uint(3, "device and sensor status") if flags & 0x08 else None
    pai = cur.sfloat() if flags & 0x10 else None
    status = PlxStatus(measurement, device)
    return PlxContinuous(flags, normal, fast, slow, status, pai)


def plx_readings(
    m: PlxSpotCheck | PlxContinuous,
    stamp: ReadingStamp,
    *,
    use_device_time: bool = False,
) -> list[Reading]:
    """One SPO2 and one PULSE_RATE reading, flagged from the status fields.

    A sensor off the patient flags CONTACT_LOST; a device saying its value is
    unavailable, invalid or from a malfunctioning sensor, or a zero, flags
    NO_READING; a special SFLOAT becomes NaN flagged SENSOR_NAN.
    """
    pair = m.reading if isinstance(m, PlxSpotCheck) else m.normal
    measured_at = _device_time(m) if use_device_time else None
    status_quality = Quality.CONTACT_LOST if m.status.sensor_off else Quality.OK
    if m.status.no_measurement:
        status_quality |= Quality.NO_READING
    return [
        _reading(stamp, Kind.SPO2, pair.spo2, status_quality, measured_at),
        _reading(stamp, Kind.PULSE_RATE, pair.pulse_rate, status_quality, measured_at),
    ]


def _reading(
    stamp: ReadingStamp,
    kind: Kind,
    value: Medfloat,
    quality: Quality,
    measured_at: float | None,
) -> Reading:
    number, value_quality = value.reading_value()
    if number == 0:
        # SpO2 0 % or pulse 0 bpm is the sensor having nothing, not asystole.
        value_quality |= Quality.NO_READING
    return stamp.reading(kind, number, quality | value_quality, measured_at)


def _device_time(m: PlxSpotCheck | PlxContinuous) -> float | None:
    if not isinstance(m, PlxSpotCheck) or m.timestamp is None:
        return None
    return None if m.device_clock_not_set else m.timestamp.epoch


def _spo2pr(cur: FieldReader) -> SpO2PR:
    return SpO2PR(cur.sfloat(), cur.sfloat())


def _json(value: Medfloat | None) -> float | str | None:
    return None if value is None else value.as_json()


def _hex(raw: int | None, digits: int) -> str | None:
    return None if raw is None else f"0x{raw:0{digits}x}"
