"""Payload formats: SenML, zigbee2mqtt, Tasmota, units and sensor timestamps."""

from __future__ import annotations

import datetime
import doctest
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sensors.formats
from gateway.clock import ManualClock
from gateway.readings import Kind
from sensors.errors import DecodeError
from sensors.formats import convert
from sensors.room import RoomSensorDecoder, TopicMap

NOW = 1_700_000_000.0
MAPS = [
    TopicMap("senml/+", format="senml", room_level=1),
    TopicMap(
        "senml-named/+",
        format="senml",
        room_level=1,
        fields={"temp": Kind.ROOM_TEMPERATURE, "pir": Kind.MOTION},
    ),
    TopicMap("zigbee2mqtt/+", format="zigbee2mqtt", room_level=1, time_path=None),
    TopicMap("tele/+/SENSOR", format="tasmota", room_level=1),
    TopicMap("ward/+/temp-f", Kind.ROOM_TEMPERATURE, format="number", unit="Far"),
]


def _decoder(tz: str = "Europe/Berlin") -> RoomSensorDecoder:
    return RoomSensorDecoder(MAPS, clock=ManualClock(NOW), timezone=tz)


def _decode(topic: str, document: object, tz: str = "Europe/Berlin"):
    return _decoder(tz).decode_all(topic, json.dumps(document).encode())


def test_conversion_doctests() -> None:
    assert doctest.testmod(sensors.formats).failed == 0


@pytest.mark.parametrize(
    ("value", "unit", "canonical", "expected"),
    [
        (21.5, "Cel", "Cel", 21.5),
        (70.0, "Far", "Cel", 21.111),
        (294.15, "K", "Cel", 21.0),
        (0.41, "/", "%RH", 41.0),
        (41.0, "%", "%RH", 41.0),
        (612.0, None, "ppm", 612.0),
    ],
)
def test_units_are_normalised(value, unit, canonical, expected) -> None:
    assert convert(value, unit, canonical) == pytest.approx(expected, abs=1e-3)


def test_senml_base_fields_resolve_and_units_pick_kinds() -> None:
    pack = [
        {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": 1.7e9, "bu": "Cel", "n": "t"},
        {"n": "temp", "v": 294.15, "u": "K", "t": 1},
        {"n": "rh", "v": 40.5, "u": "%RH", "t": 2},
        {"n": "co2", "v": 600, "u": "ppm"},
        {"n": "fw", "vs": "1.2.3"},
        {"n": "noise", "v": 33, "u": "dB"},
    ]
    decoded = _decode("senml/12", pack)
    got = [
        (r.device_id, r.kind, round(r.value, 2), r.measured_at, r.room)
        for r in decoded.readings
    ]
    device = "senml/12/urn:dev:mac:0024befffe804ff1"
    assert got == [
        (device, Kind.ROOM_TEMPERATURE, 21.0, 1.7e9 + 1, "12"),
        (device, Kind.HUMIDITY, 40.5, 1.7e9 + 2, "12"),
        (device, Kind.CO2, 600.0, 1.7e9, "12"),
    ]
    assert decoded.gateway_time is False


def test_senml_relative_times_and_named_fields_with_booleans() -> None:
    pack = [{"n": "temp", "v": 21.25, "u": "Cel", "t": -5}, {"n": "pir", "vb": True}]
    decoded = _decode("senml-named/4", pack)
    assert [(r.kind, r.value, r.measured_at) for r in decoded.readings] == [
        (Kind.ROOM_TEMPERATURE, 21.25, NOW - 5),
        (Kind.MOTION, 1.0, NOW),
    ]
    assert decoded.gateway_time is True  # relative to arrival: needs message identity


def test_zigbee2mqtt_object_yields_one_reading_per_quantity() -> None:
    message = {
        "temperature": 22.1,
        "humidity": 41,
        "occupancy": True,
        "co2": 612,
        "battery": 97,
        "linkquality": 120,
    }
    decoded = _decode("zigbee2mqtt/bed-7", message)
    assert [(r.kind, r.value, r.measured_at, r.room) for r in decoded.readings] == [
        (Kind.ROOM_TEMPERATURE, 22.1, NOW, "bed-7"),
        (Kind.HUMIDITY, 41.0, NOW, "bed-7"),
        (Kind.CO2, 612.0, NOW, "bed-7"),
        (Kind.MOTION, 1.0, NOW, "bed-7"),
    ]
    assert decoded.gateway_time is True


@pytest.mark.parametrize(
    ("tz", "hour_utc"), [("Europe/Berlin", 9), ("UTC", 10), ("America/New_York", 15)]
)
def test_tasmota_local_time_takes_the_configured_zone(tz, hour_utc) -> None:
    message = {
        "Time": "2023-11-14T10:15:00",
        "BME280": {"Temperature": 21.3, "Humidity": 40.2, "Pressure": 1013},
        "TempUnit": "C",
    }
    decoded = _decode("tele/room-3/SENSOR", message, tz)
    at = datetime.datetime(2023, 11, 14, hour_utc, 15, tzinfo=datetime.UTC).timestamp()
    assert [
        (r.device_id, r.kind, r.value, r.measured_at) for r in decoded.readings
    ] == [
        ("tele/room-3/SENSOR/BME280", Kind.ROOM_TEMPERATURE, 21.3, at),
        ("tele/room-3/SENSOR/BME280", Kind.HUMIDITY, 40.2, at),
    ]
    assert decoded.gateway_time is False


def test_tasmota_fahrenheit_and_unsynced_clock_fall_back_to_gateway_time() -> None:
    message = {
        "Time": "1970-01-01T00:03:10",
        "DS18B20": {"Temperature": 70.0},
        "TempUnit": "F",
    }
    decoded = _decode("tele/room-3/SENSOR", message)
    ((reading,),) = [decoded.readings]
    assert (round(reading.value, 2), reading.measured_at) == (21.11, NOW)
    assert decoded.gateway_time is True


def test_single_value_in_fahrenheit_is_stored_in_celsius() -> None:
    reading = _decoder().decode("ward/1/temp-f", b"68")
    assert (reading.kind, reading.value, reading.unit) == (
        Kind.ROOM_TEMPERATURE,
        20.0,
        "Cel",
    )


@pytest.mark.parametrize(
    ("topic", "document", "reason"),
    [
        ("senml/1", [], "not a SenML pack"),
        ("senml/1", [1], "SenML record is not an object"),
        ("senml/1", [{"n": 5, "v": 1, "u": "Cel"}], "SenML name is not text"),
        ("senml/1", [{"v": "20", "u": "Cel"}], "SenML field is not a number"),
        ("senml/1", [{"vb": 1, "u": "Cel"}], "SenML vb is not a boolean"),
        ("senml/1", [{"v": 120, "u": "Cel"}], "value outside physical range [-40, 85]"),
        (
            "senml-named/1",
            [{"n": "pir", "v": 2}],
            "value outside physical range [0, 1]",
        ),
        ("zigbee2mqtt/1", {"temperature": "hot"}, "value is not a number"),
        ("zigbee2mqtt/1", [1, 2], "no mapped quantity"),
        ("tele/1/SENSOR", [1], "not a Tasmota SENSOR object"),
        (
            "tele/1/SENSOR",
            {"Time": -1, "A": {"Temperature": 1}},
            "time is not epoch seconds",
        ),
    ],
)
def test_malformed_payloads_are_rejected_with_reasons(topic, document, reason) -> None:
    with pytest.raises(DecodeError) as info:
        _decode(topic, document)
    assert info.value.reason == reason


_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["n", "v", "vb", "bt", "t", "u", "bn", "temperature", "Time", "X"]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@given(
    topic=st.sampled_from(
        ["senml/1", "senml-named/1", "zigbee2mqtt/1", "tele/1/SENSOR"]
    ),
    document=_json,
)
def test_any_document_decodes_or_raises_decode_error_only(topic, document) -> None:
    try:
        decoded = _decode(topic, document)
    except DecodeError as err:
        assert err.reason
    else:
        assert decoded.readings
