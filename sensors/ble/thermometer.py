"""Health Thermometer: Temperature Measurement 0x2A1C.

Byte layout from the Health Thermometer Service 1.0 (HTS), section 3.1, and the GATT
Specification Supplement section "Temperature Measurement". Little-endian:

=======  ======================================================================
flags    bit0 unit: 0 Celsius, 1 Fahrenheit; bit1 Time Stamp present; bit2
         Temperature Type present; bits 3-7 reserved
value    FLOAT (IEEE 11073), in the unit bit0 names
stamp    Date Time, 7 bytes (bit1)
type     uint8 (bit2): 1 Armpit, 2 Body (general), 3 Ear (usually ear lobe), 4
         Finger, 5 Gastro-intestinal tract, 6 Mouth, 7 Rectum, 8 Toe, 9 Tympanum
         (ear drum); 0 and 10-255 reserved
=======  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.readings import Kind, Reading
from sensors.ble.basic import DateTime, FieldReader, ReadingStamp
from sensors.ble.ieee11073 import Medfloat

UUID = "2a1c"

TEMPERATURE_TYPES = {
    1: "Armpit",
    2: "Body (general)",
    3: "Ear (usually ear lobe)",
    4: "Finger",
    5: "Gastro-intestinal tract",
    6: "Mouth",
    7: "Rectum",
    8: "Toe",
    9: "Tympanum (ear drum)",
}

_FAHRENHEIT = 0x01
_TIMESTAMP = 0x02
_TYPE = 0x04


@dataclass(frozen=True, slots=True)
class TemperatureMeasurement:
    """A decoded 0x2A1C value.

    Attributes:
        flags: The raw flags byte.
        value: The temperature as sent, in the unit `fahrenheit` names.
        fahrenheit: Whether the device sent degrees Fahrenheit.
        timestamp: The device's own time of measurement, when sent.
        temperature_type: Where it was measured (code), when sent.
    """

    flags: int
    value: Medfloat
    fahrenheit: bool
    timestamp: DateTime | None
    temperature_type: int | None

    @property
    def celsius(self) -> Medfloat:
        """The temperature in degrees Celsius; special values stay special.

        >>> from sensors.ble.ieee11073 import decode_float
        >>> m = TemperatureMeasurement(1, decode_float(0xFF0003DA), True, None, None)
        >>> m.value.value, round(m.celsius.value, 6)
        (98.6, 37.0)
        """
        if not self.fahrenheit or self.value.value is None:
            return self.value
        return Medfloat((self.value.value - 32) * 5 / 9)

    @property
    def type_name(self) -> str | None:
        """The measurement site's name, "reserved" for unassigned codes."""
        if self.temperature_type is None:
            return None
        return TEMPERATURE_TYPES.get(self.temperature_type, "reserved")

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view; special values print as their names."""
        return {
            "characteristic": UUID,
            "flags": f"0x{self.flags:02x}",
            "temperature": self.value.as_json(),
            "unit": "Fah" if self.fahrenheit else "Cel",
            "temperature_cel": _rounded(self.celsius),
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "temperature_type": self.temperature_type,
            "temperature_type_name": self.type_name,
        }


def decode_temperature_measurement(data: bytes) -> TemperatureMeasurement:
    """Decode one 0x2A1C value; bytes after the last flagged field are ignored.

    Raises:
        DecodeError: Shorter than its flags require, or a bad timestamp.
    """
    cur = FieldReader(data, UUID)
    flags = cur.uint(1, "flags")
    value = cur.float()
    timestamp = cur.date_time() if flags & _TIMESTAMP else None
    temperature_type = cur.uint(1, "temperature type") if flags & _TYPE else None
    return TemperatureMeasurement(
        flags=flags,
        value=value,
        fahrenheit=bool(flags & _FAHRENHEIT),
        timestamp=timestamp,
        temperature_type=temperature_type,
    )


def temperature_readings(
    m: TemperatureMeasurement, stamp: ReadingStamp, *, use_device_time: bool = False
) -> list[Reading]:
    """One BODY_TEMPERATURE reading in Celsius; a special value is NaN, SENSOR_NAN."""
    value, quality = m.celsius.reading_value()
    measured_at = m.timestamp.epoch if use_device_time and m.timestamp else None
    return [stamp.reading(Kind.BODY_TEMPERATURE, value, quality, measured_at)]


def _rounded(value: Medfloat) -> float | str:
    # FLOAT carries at most 7 significant digits; conversion noise past that is not
    # information.
    if value.value is None:
        return value.as_json()
    return round(value.value, 6)
