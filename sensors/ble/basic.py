"""Battery Level, Body Sensor Location, and the pieces every health profile shares.

Byte layouts from the Bluetooth SIG GATT Specification Supplement (GSS):

- Battery Level 0x2A19 (GSS "Battery Level"): one uint8, percent, 0-100; 101-255 are
  prohibited, so a larger value is a malformed payload, not a full battery.
- Body Sensor Location 0x2A38 (GSS "Body Sensor Location"; Heart Rate Service 1.0,
  3.2): one uint8, 0 Other, 1 Chest, 2 Wrist, 3 Finger, 4 Hand, 5 Ear Lobe, 6 Foot;
  7-255 reserved.
- Date Time 0x2A08 (GSS "Date Time"), a 7-byte field inside the thermometer, blood
  pressure, glucose and PLX measurements: year uint16 (1582-9999, 0 = not known),
  month uint8 (1-12, 0 = not known), day uint8 (1-31, 0 = not known), hours
  (0-23), minutes (0-59), seconds (0-59). It carries no time zone: it is read as
  UTC. TODO(ble): no code sets device clocks yet (Current Time Service); until one
  does, device time is kept in the measurement but readings are stamped on arrival.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.readings import Kind, Quality, Reading
from sensors.ble.ieee11073 import Medfloat, read_float, read_sfloat
from sensors.errors import DecodeError

T = TypeVar("T")

BATTERY_LEVEL_UUID = "2a19"
BODY_SENSOR_LOCATION_UUID = "2a38"
DATE_TIME_SIZE = 7

BODY_SENSOR_LOCATIONS = {
    0: "Other",
    1: "Chest",
    2: "Wrist",
    3: "Finger",
    4: "Hand",
    5: "Ear Lobe",
    6: "Foot",
}


@dataclass(frozen=True, slots=True)
class BatteryLevel:
    """A decoded 0x2A19 value.

    Attributes:
        percent: Remaining charge, 0-100.
    """

    percent: int

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {"characteristic": BATTERY_LEVEL_UUID, "battery_percent": self.percent}


@dataclass(frozen=True, slots=True)
class BodySensorLocation:
    """A decoded 0x2A38 value.

    Attributes:
        code: The location code as sent.
    """

    code: int

    @property
    def name(self) -> str:
        """The location's name, "reserved" for codes the SIG has not assigned."""
        return BODY_SENSOR_LOCATIONS.get(self.code, "reserved")

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {
            "characteristic": BODY_SENSOR_LOCATION_UUID,
            "location_code": self.code,
            "location": self.name,
        }


@dataclass(frozen=True, slots=True)
class DateTime:
    """A decoded Date Time field, as the device's own clock stated it.

    Attributes:
        year: 1582-9999, or 0 when the device does not know it.
        month: 1-12, or 0 when not known.
        day: 1-31, or 0 when not known.
        hours: 0-23.
        minutes: 0-59.
        seconds: 0-59.
    """

    year: int
    month: int
    day: int
    hours: int
    minutes: int
    seconds: int

    @property
    def epoch(self) -> float | None:
        """Seconds since the Unix epoch, read as UTC; None when the date is unknown."""
        moment = self.to_datetime()
        return None if moment is None else moment.timestamp()

    def to_datetime(self) -> dt.datetime | None:
        """The moment as an aware UTC datetime; None when the date is unknown.

        Raises:
            ValueError: The fields are not a calendar date (31 February).
        """
        if 0 in (self.year, self.month, self.day):
            return None
        return dt.datetime(
            self.year,
            self.month,
            self.day,
            self.hours,
            self.minutes,
            self.seconds,
            tzinfo=dt.UTC,
        )

    def isoformat(self) -> str:
        """ISO 8601 text, with zeros where the device does not know the date."""
        return (
            f"{self.year:04d}-{self.month:02d}-{self.day:02d}T"
            f"{self.hours:02d}:{self.minutes:02d}:{self.seconds:02d}"
        )


@dataclass(frozen=True, slots=True)
class ReadingStamp:
    """Who and when every `Reading` made from one measurement is attributed to."""

    device_id: str
    patient_ref: str | None
    at: float

    def reading(
        self,
        kind: Kind,
        value: float,
        quality: Quality = Quality.OK,
        measured_at: float | None = None,
    ) -> Reading:
        """A `Reading` of `kind`, stamped `measured_at` or else `at`."""
        return Reading(
            device_id=self.device_id,
            kind=kind,
            value=value,
            measured_at=self.at if measured_at is None else measured_at,
            patient_ref=self.patient_ref,
            quality=quality,
        )


class FieldReader:
    """Reads the fields of one payload in order; a short payload is a DecodeError."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.source = source
        self.offset = 0

    def uint(self, size: int, what: str) -> int:
        """The next `size`-byte unsigned integer.

        Raises:
            DecodeError: Fewer than `size` bytes are left.
        """
        return int.from_bytes(self._take(size, what), "little")

    def sint(self, size: int, what: str) -> int:
        """The next `size`-byte signed integer.

        Raises:
            DecodeError: Fewer than `size` bytes are left.
        """
        return int.from_bytes(self._take(size, what), "little", signed=True)

    def sfloat(self) -> Medfloat:
        """The next SFLOAT.

        Raises:
            DecodeError: Fewer than 2 bytes are left.
        """
        return self._field(read_sfloat, 2)

    def float(self) -> Medfloat:
        """The next FLOAT.

        Raises:
            DecodeError: Fewer than 4 bytes are left.
        """
        return self._field(read_float, 4)

    def date_time(self) -> DateTime:
        """The next Date Time field.

        Raises:
            DecodeError: Fewer than 7 bytes are left, or the date is invalid.
        """
        return self._field(read_date_time, DATE_TIME_SIZE)

    def _field(self, read: Callable[[bytes, int, str], T], size: int) -> T:
        value = read(self.data, self.offset, self.source)
        self.offset += size
        return value

    def _take(self, size: int, what: str) -> bytes:
        if len(self.data) < self.offset + size:
            raise DecodeError(self.source, f"{len(self.data)} bytes, {what} missing")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def decode_battery_level(data: bytes) -> BatteryLevel:
    """Decode one 0x2A19 value.

    Raises:
        DecodeError: Not exactly one byte, or above 100 %.
    """
    if len(data) != 1:
        raise DecodeError(BATTERY_LEVEL_UUID, f"{len(data)} bytes, expected 1")
    if data[0] > 100:
        raise DecodeError(BATTERY_LEVEL_UUID, "level above 100 %")
    return BatteryLevel(data[0])


def decode_body_sensor_location(data: bytes) -> BodySensorLocation:
    """Decode one 0x2A38 value; reserved codes decode and are named "reserved".

    Raises:
        DecodeError: Not exactly one byte.
    """
    if len(data) != 1:
        raise DecodeError(BODY_SENSOR_LOCATION_UUID, f"{len(data)} bytes, expected 1")
    return BodySensorLocation(data[0])


def battery_readings(m: BatteryLevel, stamp: ReadingStamp) -> list[Reading]:
    """One BATTERY reading in percent."""
    return [stamp.reading(Kind.BATTERY, float(m.percent))]


def read_date_time(data: bytes, offset: int, source: str) -> DateTime:
    """Decode the Date Time field at `data[offset:offset + 7]`.

    Raises:
        DecodeError: The field is cut short, a part is out of its range, or the
            date does not exist (31 February).
    """
    if len(data) < offset + DATE_TIME_SIZE:
        raise DecodeError(source, f"{len(data)} bytes, too short for a timestamp")
    year = int.from_bytes(data[offset : offset + 2], "little")
    stamp = DateTime(year, *data[offset + 2 : offset + DATE_TIME_SIZE])
    _check_date_time(stamp, source)
    return stamp


def encode_date_time(moment: dt.datetime) -> bytes:
    """The 7-byte Date Time field for `moment` (used by tests and the replay)."""
    parts = (moment.month, moment.day, moment.hour, moment.minute, moment.second)
    return moment.year.to_bytes(2, "little") + bytes(parts)


def _check_date_time(stamp: DateTime, source: str) -> None:
    in_range = (
        (stamp.year == 0 or 1582 <= stamp.year <= 9999)
        and stamp.month <= 12
        and stamp.day <= 31
        and stamp.hours <= 23
        and stamp.minutes <= 59
        and stamp.seconds <= 59
    )
    if not in_range:
        raise DecodeError(source, "timestamp field out of range")
    try:
        stamp.to_datetime()
    except ValueError as err:
        raise DecodeError(source, "timestamp is not a calendar date") from err
