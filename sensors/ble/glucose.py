"""Glucose Measurement 0x2A18.

Byte layout from the Glucose Service 1.0 (GLS), section 3.1, and the GATT
Specification Supplement section "Glucose Measurement". Little-endian:

===========  ==================================================================
flags        bit0 Time Offset present; bit1 Glucose Concentration, Type and
             Sample Location present; bit2 concentration unit: 0 kg/L, 1 mol/L;
             bit3 Sensor Status Annunciation present; bit4 a Glucose
             Measurement Context follows; bits 5-7 reserved
sequence     uint16
base time    Date Time, 7 bytes (always present)
offset       sint16 minutes, added to the base time (bit0)
glucose      SFLOAT in kg/L or mol/L (bit1)
type/site    uint8 (bit1): low nibble type (1 capillary whole blood, 2 capillary
             plasma, 3 venous whole blood, 4 venous plasma, 5 arterial whole
             blood, 6 arterial plasma, 7 undetermined whole blood, 8 undetermined
             plasma, 9 interstitial fluid, 10 control solution); high nibble
             sample location (1 finger, 2 alternate site test, 3 earlobe, 4
             control solution, 15 not available)
annunciation uint16 (bit3), see `ANNUNCIATION_BITS`
===========  ==================================================================

Readings are in mmol/L: mol/L times 1000; kg/L times 1e6 / 180.16 (the molar mass
of glucose, g/mol), so 100 mg/dL (0.001 kg/L) is 5.55 mmol/L.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.readings import Kind, Reading
from sensors.ble.basic import DateTime, FieldReader, ReadingStamp
from sensors.ble.ieee11073 import Medfloat

UUID = "2a18"
GLUCOSE_G_PER_MOL = 180.16
MMOL_L_PER_KG_L = 1e6 / GLUCOSE_G_PER_MOL
MMOL_L_PER_MOL_L = 1000.0

_TIME_OFFSET = 0x01
_CONCENTRATION = 0x02
_MOL_PER_L = 0x04
_ANNUNCIATION = 0x08
_CONTEXT_FOLLOWS = 0x10

SAMPLE_TYPES = {
    1: "capillary whole blood",
    2: "capillary plasma",
    3: "venous whole blood",
    4: "venous plasma",
    5: "arterial whole blood",
    6: "arterial plasma",
    7: "undetermined whole blood",
    8: "undetermined plasma",
    9: "interstitial fluid",
    10: "control solution",
}
SAMPLE_LOCATIONS = {
    1: "finger",
    2: "alternate site test",
    3: "earlobe",
    4: "control solution",
    15: "not available",
}
ANNUNCIATION_BITS = {
    0: "battery_low",
    1: "sensor_malfunction",
    2: "sample_size_insufficient",
    3: "strip_insertion_error",
    4: "strip_type_incorrect",
    5: "result_too_high",
    6: "result_too_low",
    7: "temperature_too_high",
    8: "temperature_too_low",
    9: "read_interrupted",
    10: "general_device_fault",
    11: "time_fault",
}


@dataclass(frozen=True, slots=True)
class GlucoseMeasurement:
    """A decoded 0x2A18 value; the concentration as sent, in `unit`."""

    flags: int
    sequence: int
    base_time: DateTime
    time_offset_min: int | None
    concentration: Medfloat | None
    sample_type: int | None
    sample_location: int | None
    annunciation: int | None

    @property
    def unit(self) -> str:
        """The unit of `concentration` as sent: "kg/L" or "mol/L"."""
        return "mol/L" if self.flags & _MOL_PER_L else "kg/L"

    @property
    def context_follows(self) -> bool:
        """Flags bit4: a Glucose Measurement Context with this sequence follows."""
        return bool(self.flags & _CONTEXT_FOLLOWS)

    @property
    def mmol_per_l(self) -> Medfloat | None:
        """The concentration in mmol/L, None when not sent.

        >>> from sensors.ble.ieee11073 import decode_sfloat
        >>> kg_l = decode_sfloat(0xB064)  # mantissa 100, exponent -5: 0.001 kg/L
        >>> m = GlucoseMeasurement(2, 1, DateTime(2024, 1, 1, 8, 0, 0), None, kg_l,
        ...                        1, 1, None)
        >>> round(m.mmol_per_l.value, 2)
        5.55
        """
        if self.concentration is None:
            return None
        factor = MMOL_L_PER_MOL_L if self.unit == "mol/L" else MMOL_L_PER_KG_L
        return self.concentration.map(factor)

    @property
    def measured_epoch(self) -> float | None:
        """Base time plus time offset, as the device's clock said; None if unknown."""
        base = self.base_time.epoch
        if base is None:
            return None
        return base + 60 * (self.time_offset_min or 0)

    def flag(self, name: str) -> bool:
        """Whether the named annunciation bit is set (False when not sent).

        Raises:
            KeyError: `name` is not a Sensor Status Annunciation bit.
        """
        bit = {v: k for k, v in ANNUNCIATION_BITS.items()}[name]
        return self.annunciation is not None and bool(self.annunciation >> bit & 1)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view; special values print as their names."""
        mmol = self.mmol_per_l
        return {
            "characteristic": UUID,
            "flags": f"0x{self.flags:02x}",
            "sequence": self.sequence,
            "base_time": self.base_time.isoformat(),
            "time_offset_min": self.time_offset_min,
            "concentration": _json(self.concentration),
            "unit": self.unit,
            "glucose_mmol_l": None if mmol is None else _rounded(mmol),
            "sample_type": _name(SAMPLE_TYPES, self.sample_type),
            "sample_location": _name(SAMPLE_LOCATIONS, self.sample_location),
            "annunciation": _annunciation(self.annunciation),
            "context_follows": self.context_follows,
        }


def decode_glucose_measurement(data: bytes) -> GlucoseMeasurement:
    """Decode one 0x2A18 value; bytes after the last flagged field are ignored.

    Raises:
        DecodeError: Shorter than its flags require, or a bad base time.
    """
    cur = FieldReader(data, UUID)
    flags = cur.uint(1, "flags")
    sequence = cur.uint(2, "sequence number")
    base_time = cur.date_time()
    offset = cur.sint(2, "time offset") if flags & _TIME_OFFSET else None
    concentration = sample_type = sample_location = None
    if flags & _CONCENTRATION:
        concentration = cur.sfloat()
        type_site = cur.uint(1, "type and sample location")
        sample_type, sample_location = type_site & 0x0F, type_site >> 4
    annunciation = cur.uint(2, "annunciation") if flags & _ANNUNCIATION else None
    return GlucoseMeasurement(
        flags,
        sequence,
        base_time,
        offset,
        concentration,
        sample_type,
        sample_location,
        annunciation,
    )


def glucose_readings(
    m: GlucoseMeasurement, stamp: ReadingStamp, *, use_device_time: bool = False
) -> list[Reading]:
    """One GLUCOSE reading in mmol/L, none when the value was not sent.

    Annunciations stay in the measurement: "result too high/low" still carries
    the extreme the patient has, so it must not be hidden as a technical flag.
    """
    mmol = m.mmol_per_l
    if mmol is None:
        return []
    # A meter that flags a time fault has said its own clock is wrong.
    trust_clock = use_device_time and not m.flag("time_fault")
    measured_at = m.measured_epoch if trust_clock else None
    return [stamp.reading(Kind.GLUCOSE, *mmol.reading_value(), measured_at)]


def _name(names: dict[int, str], code: int | None) -> str | None:
    return None if code is None else names.get(code, f"reserved ({code})")


def _annunciation(raw: int | None) -> list[str] | None:
    if raw is None:
        return None
    return [name for bit, name in ANNUNCIATION_BITS.items() if raw >> bit & 1]


def _json(value: Medfloat | None) -> float | str | None:
    return None if value is None else value.as_json()


def _rounded(value: Medfloat) -> float | str:
    return value.as_json() if value.value is None else round(value.value, 3)
