"""Room-sensor payload formats: what one MQTT message says, before it is a Reading.

Each format turns a payload into `Sample`s: a quantity's name, its raw value, the
unit the sensor used, and the sensor's own time when it sent one. The decoder in
`sensors.room` then picks the reading kind, converts the unit to the kind's canonical
one (`gateway.readings.UNITS`) and checks the physical range.

Formats:
    number: the payload is the number itself ("21.5").
    json: one value at a dotted path, optionally a time at another.
    senml: RFC 8428 SenML JSON, a list of records with base fields.
    zigbee2mqtt: one flat object carrying several quantities.
    tasmota: `tele/<name>/SENSOR` objects, one nested object per sensor chip.

Reasons given in `DecodeError` never contain the payload or a value from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.readings import Kind
from sensors.errors import DecodeError

FORMATS = ("number", "json", "senml", "zigbee2mqtt", "tasmota")

SENML_RELATIVE_LIMIT = 2**28
"""RFC 8428, section 4.5.3: a resolved time below 2**28 is relative to now."""

TASMOTA_UNSYNCED_BEFORE = 1_451_606_400.0
"""2016-01-01: a Tasmota device sends 1970-based times until NTP has synced."""

ZIGBEE2MQTT_FIELDS: dict[str, Kind] = {
    "temperature": Kind.ROOM_TEMPERATURE,
    "humidity": Kind.HUMIDITY,
    "co2": Kind.CO2,
    "illuminance_lux": Kind.LIGHT,
    "occupancy": Kind.MOTION,
    "presence": Kind.MOTION,
}
"""zigbee2mqtt's exposed property names (its device pages list them)."""

TASMOTA_FIELDS: dict[str, Kind] = {
    "Temperature": Kind.ROOM_TEMPERATURE,
    "Humidity": Kind.HUMIDITY,
    "CarbonDioxide": Kind.CO2,
    "eCO2": Kind.CO2,
    "Illuminance": Kind.LIGHT,
}

SENML_UNITS: dict[str, Kind] = {
    "Cel": Kind.ROOM_TEMPERATURE,
    "K": Kind.ROOM_TEMPERATURE,
    "%RH": Kind.HUMIDITY,
    "ppm": Kind.CO2,
    "lx": Kind.LIGHT,
}
"""The kind a SenML record has by its unit, when no field names are configured."""

# Unit spellings per canonical unit: factor and offset to the canonical one.
_CONVERSIONS: dict[str, dict[str, tuple[float, float]]] = {
    "Cel": {
        "Cel": (1.0, 0.0),
        "C": (1.0, 0.0),
        "°C": (1.0, 0.0),
        "K": (1.0, -273.15),
        "Far": (5 / 9, -32 * 5 / 9),
        "F": (5 / 9, -32 * 5 / 9),
        "°F": (5 / 9, -32 * 5 / 9),
    },
    "%RH": {"%RH": (1.0, 0.0), "%": (1.0, 0.0), "/": (100.0, 0.0)},
    "ppm": {"ppm": (1.0, 0.0)},
    "lx": {"lx": (1.0, 0.0)},
    "1": {"1": (1.0, 0.0), "/": (1.0, 0.0)},
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One quantity found in a payload, as the sensor sent it.

    Attributes:
        name: The field or SenML name it was found under ("" for single values).
        value: The raw value (a number or a boolean; checked by the decoder).
        unit: The unit the sensor used, None when it did not say.
        at: The sensor's own time (epoch seconds), None when it sent none.
        source: A sub-device (a Tasmota sensor chip, a SenML base name), or "".
    """

    name: str
    value: object
    unit: str | None = None
    at: float | None = None
    source: str = ""


def convert(value: float, unit: str | None, canonical: str) -> float:
    """`value` in `unit` expressed in `canonical` (None: already canonical).

    >>> convert(212.0, "Far", "Cel")
    100.0

    Raises:
        ValueError: The unit cannot be converted to the canonical one.
    """
    if unit is None or unit == canonical:
        return value
    factor, offset = _CONVERSIONS.get(canonical, {}).get(unit, (None, 0.0))
    if factor is None:
        raise ValueError(f"unit not convertible to {canonical}")
    return value * factor + offset


def parse_json(topic: str, payload: bytes) -> Any:
    """The payload as a JSON document.

    Raises:
        DecodeError: It is not JSON.
    """
    try:
        return json.loads(payload)
    # Deeply nested arrays exhaust the parser's recursion limit within 4 KB.
    except (ValueError, RecursionError) as exc:
        raise DecodeError(topic, "not JSON") from exc


def parse_time(topic: str, raw: object, tz: ZoneInfo) -> float:
    """Epoch seconds from a number or an ISO 8601 text (naive: in `tz`).

    Raises:
        DecodeError: It is neither, or not a usable time.
    """
    if isinstance(raw, str):
        try:
            stamp = datetime.fromisoformat(raw)
        except ValueError as exc:
            raise DecodeError(topic, "time is not ISO 8601") from exc
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=tz)
        return stamp.timestamp()
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError(topic, "time is not a number")
    if not math.isfinite(raw) or raw < 0:
        raise DecodeError(topic, "time is not epoch seconds")
    return float(raw)


def senml_samples(
    topic: str, document: object, now: float
) -> tuple[list[Sample], bool]:
    """Resolve SenML records (RFC 8428, section 4.6): base fields apply onwards.

    Returns:
        The samples, and whether any time was relative to arrival (section 4.5.3:
        a resolved time below 2**28, including none at all).

    Raises:
        DecodeError: It is not a SenML pack or a record is malformed.
    """
    if not isinstance(document, list) or not document:
        raise DecodeError(topic, "not a SenML pack")
    base_name, base_time, base_unit, base_value = "", 0.0, None, 0.0
    samples, relative = [], False
    for record in document:
        if not isinstance(record, dict):
            raise DecodeError(topic, "SenML record is not an object")
        base_name = _text(topic, record.get("bn", base_name))
        base_time = _senml_number(topic, record.get("bt", base_time))
        base_unit = record.get("bu", base_unit)
        base_value = _senml_number(topic, record.get("bv", base_value))
        value = _senml_value(topic, record, base_value)
        if value is None:
            continue  # a record of base fields only, or a string or data value
        at = base_time + _senml_number(topic, record.get("t", 0.0))
        if at < SENML_RELATIVE_LIMIT:
            at, relative = at + now, True
        unit = record.get("u", base_unit)
        samples.append(
            Sample(
                name=_text(topic, record.get("n", "")),
                value=value,
                unit=unit if isinstance(unit, str) else None,
                at=at,
                source=base_name.rstrip(":/;"),
            )
        )
    return samples, relative


def object_samples(document: object, fields: dict[str, Kind]) -> Iterator[Sample]:
    """The configured fields of a flat object (zigbee2mqtt style)."""
    if not isinstance(document, dict):
        return
    for name in fields:
        if name in document:
            yield Sample(name=name, value=document[name])


def tasmota_samples(
    topic: str, document: object, fields: dict[str, Kind], tz: ZoneInfo
) -> tuple[list[Sample], bool]:
    """The sensors' values of a Tasmota SENSOR message, and whether Time was usable.

    Raises:
        DecodeError: It is not an object or its Time is malformed.
    """
    if not isinstance(document, dict):
        raise DecodeError(topic, "not a Tasmota SENSOR object")
    at = None
    if "Time" in document:
        at = parse_time(topic, document["Time"], tz)
        if at < TASMOTA_UNSYNCED_BEFORE:
            at = None  # the device's clock has not synced; the gateway stamps it
    temp_unit = document.get("TempUnit", "C")
    samples = []
    for chip, values in document.items():
        if not isinstance(values, dict):
            continue
        for name in fields:
            if name in values:
                unit = temp_unit if fields[name] is Kind.ROOM_TEMPERATURE else None
                samples.append(Sample(name, values[name], unit, at, chip))
    return samples, at is not None


def _senml_value(topic: str, record: dict[str, Any], base_value: float) -> Any:
    if "v" in record:
        return base_value + _senml_number(topic, record["v"])
    if "vb" in record:
        if not isinstance(record["vb"], bool):
            raise DecodeError(topic, "SenML vb is not a boolean")
        return record["vb"]
    return None


def _senml_number(topic: str, raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError(topic, "SenML field is not a number")
    return float(raw)


def _text(topic: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise DecodeError(topic, "SenML name is not text")
    return raw
