"""MQTT room sensors: decoder rules, and the adapter against a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.broker import LocalBroker
from gateway.clock import ManualClock
from gateway.paho import MqttLink, MqttMessage, MqttSettings
from gateway.readings import Kind, Reading
from sensors.errors import DecodeError
from sensors.room import (
    Decoded,
    RoomSensorAdapter,
    RoomSensorDecoder,
    TopicMap,
    topic_matches,
)

NOW = 1_700_000_000.0
MAPS = [
    TopicMap("rooms/+/temperature", Kind.ROOM_TEMPERATURE),
    TopicMap("rooms/+/co2", Kind.CO2),
    TopicMap("rooms/+/motion", Kind.MOTION),
    TopicMap("site/+/+/lux", Kind.LIGHT, format="number", room_level=2),
    TopicMap(
        "zigbee/hall-sensor",
        Kind.HUMIDITY,
        value_path="state.humidity",
        time_path=None,
        room="hall",
        device="zb-01",
        max_value=95,
    ),
]


def _decoder(**kwargs: object) -> RoomSensorDecoder:
    return RoomSensorDecoder(MAPS, clock=ManualClock(NOW), **kwargs)


def _reason(topic: str, payload: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        _decoder().decode(topic, payload)
    return info.value.reason


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("rooms/+/temperature", "rooms/101/temperature", True),
        ("rooms/+/temperature", "rooms/101/co2", False),
        ("rooms/+/temperature", "rooms/101/temperature/raw", False),
        ("rooms/#", "rooms", True),
        ("rooms/#", "rooms/101/a/b", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/x", "/x", True),
        ("a/b", "a/b", True),
        ("a/b", "a", False),
    ],
)
def test_topic_matches_follows_mqtt_rules(topic_filter, topic, expected) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_json_payload_becomes_reading_with_room_from_topic_and_ts_kept() -> None:
    reading = _decoder().decode(
        "rooms/101/temperature", b'{"ts": 1699999990.5, "value": 21.5}'
    )
    assert reading == Reading(
        device_id="rooms/101/temperature",
        kind=Kind.ROOM_TEMPERATURE,
        value=21.5,
        measured_at=1699999990.5,
        room="101",
    )


def test_number_payload_and_fixed_room_and_nested_path_use_the_clock() -> None:
    lux = _decoder().decode("site/east/204/lux", b" 350 \n")
    humid = _decoder().decode("zigbee/hall-sensor", b'{"state": {"humidity": 41}}')
    assert (lux.kind, lux.value, lux.room, lux.measured_at) == (
        Kind.LIGHT,
        350.0,
        "204",
        NOW,
    )
    assert (humid.device_id, humid.room, humid.value, humid.measured_at) == (
        "zb-01",
        "hall",
        41.0,
        NOW,
    )


def test_motion_accepts_booleans_and_missing_ts_falls_back_to_clock() -> None:
    reading = _decoder().decode("rooms/101/motion", b'{"value": true}')
    assert (reading.value, reading.measured_at) == (1.0, NOW)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("hall/door", b"{}", "unmapped topic"),
        ("rooms/101/temperature", b"{not json", "not JSON"),
        ("rooms/101/temperature", b"\xff\xfe", "not JSON"),
        ("rooms/101/temperature", b"[" * 4000, "not JSON"),
        ("rooms/101/temperature", b'{"val": 21}', "no value at value"),
        ("rooms/101/temperature", b"[21]", "no value at value"),
        ("rooms/101/temperature", b'{"value": "21.5"}', "value is not a number"),
        ("rooms/101/temperature", b'{"value": true}', "value is not a number"),
        ("rooms/101/temperature", b'{"value": NaN}', "value is NaN or infinite"),
        ("rooms/101/temperature", b'{"value": -Infinity}', "value is NaN or infinite"),
        ("rooms/101/co2", b'{"value": 1e999}', "value is NaN or infinite"),
        ("site/a/1/lux", b"nan", "value is NaN or infinite"),
        ("site/a/1/lux", b"bright", "value is not a number"),
        (
            "rooms/101/temperature",
            b'{"value": 120}',
            "value outside physical range [-40, 85]",
        ),
        ("rooms/101/co2", b'{"value": -3}', "value outside physical range [0, 40000]"),
        (
            "zigbee/hall-sensor",
            b'{"state": {"humidity": 99}}',
            "value outside physical range [0, 95]",
        ),
        (
            "rooms/101/temperature",
            b'{"value": 20, "ts": "now"}',
            "time is not ISO 8601",
        ),
        ("rooms/101/temperature", b'{"value": 20, "ts": [1]}', "time is not a number"),
        (
            "rooms/101/co2",
            b'{"value": 1' + b"0" * 400 + b"}",
            "value is NaN or infinite",
        ),
        (
            "rooms/101/temperature",
            b'{"value": 20, "ts": -5}',
            "time is not epoch seconds",
        ),
    ],
)
def test_bad_input_is_rejected_with_a_payload_free_reason(topic, payload, reason):
    assert _reason(topic, payload) == reason


def test_oversized_payload_is_rejected_before_parsing() -> None:
    payload = json.dumps({"value": 21, "pad": "x" * 100}).encode()
    with pytest.raises(DecodeError) as info:
        _decoder(max_payload_bytes=64).decode("rooms/1/temperature", payload)
    assert info.value.reason == "payload too large"


def test_first_matching_map_wins_and_filters_listed_once() -> None:
    decoder = RoomSensorDecoder(
        [
            TopicMap("rooms/lab/temperature", Kind.ROOM_TEMPERATURE, max_value=30),
            TopicMap("rooms/+/temperature", Kind.ROOM_TEMPERATURE),
            TopicMap("rooms/lab/temperature", Kind.HUMIDITY),
        ],
        clock=ManualClock(NOW),
    )
    assert decoder.filters == ["rooms/lab/temperature", "rooms/+/temperature"]
    with pytest.raises(DecodeError, match=r"\[-40, 30\]"):
        decoder.decode("rooms/lab/temperature", b'{"value": 31}')
    assert decoder.decode("rooms/ward/temperature", b'{"value": 31}').value == 31.0


@given(
    topic=st.sampled_from(
        ["rooms/1/temperature", "site/a/1/lux", "zigbee/hall-sensor"]
    ),
    payload=st.one_of(
        st.binary(max_size=64),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
            lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        ).map(lambda doc: json.dumps({"value": doc, "ts": doc}).encode()),
    ),
)
def test_decoder_returns_a_reading_or_raises_decode_error_only(topic, payload) -> None:
    try:
        reading = _decoder().decode(topic, payload)
    except DecodeError as err:
        assert err.reason
    else:
        low, high = next(
            m for m in MAPS if topic_matches(m.filter, topic)
        ).physical_range()
        assert low <= reading.value <= high


class _BuggyDecoder(RoomSensorDecoder):
    """A decoder with a bug, to show the adapter survives one."""

    def decode_all(self, topic: str, payload: bytes) -> Decoded:
        raise ZeroDivisionError("bug")


def test_decoder_bug_is_quarantined_not_raised(caplog) -> None:
    quarantined: list[tuple[str, str, bytes]] = []
    adapter = RoomSensorAdapter(
        MqttLink(MqttSettings()),
        _BuggyDecoder(MAPS, clock=ManualClock(NOW)),
        ingest=lambda reading, ack: None,
        quarantine=lambda src, why, data, ack: quarantined.append((src, why, data)),
    )
    message = MqttMessage("rooms/1/co2", b'{"value": 612}', 1, 7, False, False)
    adapter.handle(message)

    assert quarantined == [("mqtt:rooms/1/co2", "decoder error", b'{"value": 612}')]
    assert adapter.counters.quarantined == {"decoder error": 1}
    assert "612" not in caplog.text and "ZeroDivisionError" in caplog.text


# -- against a real mosquitto -----------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as b:
        yield b


class _Sink:
    """Collects what the adapter hands on, acking at once like a committed store."""

    def __init__(self, *, auto_ack: bool = True) -> None:
        self.readings: list[Reading] = []
        self.quarantined: list[tuple[str, str, bytes]] = []
        self.acks: list[Callable[[], None]] = []
        self._auto_ack = auto_ack

    def ingest(self, reading: Reading, ack: Callable[[], None]) -> None:
        self.readings.append(reading)
        self._done(ack)

    def quarantine(
        self, source: str, reason: str, payload: bytes, ack: Callable[[], None]
    ) -> None:
        self.quarantined.append((source, reason, payload))
        self._done(ack)

    def _done(self, ack: Callable[[], None]) -> None:
        self.acks.append(ack)
        if self._auto_ack:
            ack()

    @property
    def total(self) -> int:
        return len(self.readings) + len(self.quarantined)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _connected_adapter(
    broker: LocalBroker, sink: _Sink, client_id: str, filters: list[str] | None
) -> tuple[MqttLink, RoomSensorAdapter]:
    link = MqttLink(
        MqttSettings(port=broker.port, client_id=client_id), manual_ack=True
    )
    adapter = RoomSensorAdapter(
        link,
        _decoder(),
        ingest=sink.ingest,
        quarantine=sink.quarantine,
        filters=filters,
    )
    # Subscribing before connecting: the link then subscribes from its own network
    # thread on CONNACK, so the SUBACK cannot race the bookkeeping of `granted`.
    adapter.start()
    await link.connect()
    wanted = adapter.filters
    await _until(lambda: all(link.granted.get(f) == 1 for f in wanted))
    return link, adapter


async def _publisher(broker: LocalBroker) -> MqttLink:
    link = MqttLink(MqttSettings(port=broker.port, client_id=f"pub-{uuid.uuid4()}"))
    await link.connect()
    return link


@pytest.mark.broker
def test_published_json_reaches_ingest_as_reading(broker) -> None:
    async def scenario() -> tuple[_Sink, RoomSensorAdapter]:
        sink = _Sink()
        sub, adapter = await _connected_adapter(broker, sink, "room-ok", None)
        pub = await _publisher(broker)
        await pub.publish("rooms/204/co2", b'{"ts": 1699999000.25, "value": 612}')
        await _until(lambda: sink.total == 1)
        await pub.close()
        await sub.close()
        return sink, adapter

    sink, adapter = asyncio.run(scenario())
    assert sink.readings == [
        Reading(
            device_id="rooms/204/co2",
            kind=Kind.CO2,
            value=612.0,
            measured_at=1699999000.25,
            room="204",
        )
    ]
    assert (adapter.counters.received, adapter.counters.decoded) == (1, 1)


BAD_MESSAGES = [
    ("rooms/1/temperature", b"<xml/>", "not JSON"),
    ("rooms/1/temperature", b'{"value": "warm"}', "value is not a number"),
    ("rooms/1/temperature", b'{"value": NaN}', "value is NaN or infinite"),
    ("rooms/1/co2", b'{"value": Infinity}', "value is NaN or infinite"),
    ("rooms/1/co2", b'{"value": 90000}', "value outside physical range [0, 40000]"),
    ("rooms/1/door", b'{"value": 1}', "unmapped topic"),
    ("rooms/1/temperature", b'{"value": 1, "pad": "' + b"x" * 5000 + b'"}', None),
]


@pytest.mark.broker
def test_bad_messages_land_in_quarantine_and_link_survives(broker) -> None:
    async def scenario() -> tuple[_Sink, RoomSensorAdapter, MqttLink]:
        sink = _Sink()
        sub, adapter = await _connected_adapter(broker, sink, "room-bad", ["rooms/#"])
        pub = await _publisher(broker)
        for topic, payload, _reason in BAD_MESSAGES:
            await pub.publish(topic, payload)
        await pub.publish("rooms/1/temperature", b'{"ts": 1699999999.0, "value": 22}')
        await _until(lambda: sink.total == len(BAD_MESSAGES) + 1)
        connected = sub.connected.is_set()
        await pub.close()
        await sub.close()
        return sink, adapter, connected

    sink, adapter, connected = asyncio.run(scenario())
    expected = [
        (f"mqtt:{topic}", reason or "payload too large", payload)
        for topic, payload, reason in BAD_MESSAGES
    ]
    assert sorted(sink.quarantined) == sorted(expected)
    assert [(r.value, r.measured_at, r.room) for r in sink.readings] == [
        (22.0, 1699999999.0, "1")
    ]
    assert connected
    assert adapter.counters.received == len(BAD_MESSAGES) + 1
    assert sum(adapter.counters.quarantined.values()) == len(BAD_MESSAGES)
    assert adapter.counters.quarantined["value is NaN or infinite"] == 2


@pytest.mark.broker
def test_unacked_message_is_redelivered_after_reconnect(broker) -> None:
    # Only a message whose ack was called (its reading committed) is gone for good.
    client_id = f"room-durable-{uuid.uuid4()}"

    async def scenario() -> tuple[list[float], list[float]]:
        first = _Sink(auto_ack=False)
        sub, _ = await _connected_adapter(broker, first, client_id, None)
        pub = await _publisher(broker)
        await pub.publish("rooms/7/temperature", b'{"ts": 1699999991.0, "value": 20.5}')
        await pub.publish(
            "rooms/7/temperature", b'{"ts": 1699999992.0, "value": 20.75}'
        )
        await _until(lambda: first.total == 2)
        first.acks[0]()  # only the first reading was committed
        await asyncio.sleep(0.2)
        await sub.close()

        second = _Sink()
        sub, _ = await _connected_adapter(broker, second, client_id, None)
        await _until(lambda: second.total >= 1)
        await asyncio.sleep(0.3)  # would a second redelivery follow? it must not
        await pub.close()
        await sub.close()
        return [r.value for r in first.readings], [r.value for r in second.readings]

    first_values, second_values = asyncio.run(scenario())
    assert first_values == [20.5, 20.75]
    assert second_values == [20.75]


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        (NOW * 1000, "time out of range: over 300 s ahead"),
        (NOW + 301, "time out of range: over 300 s ahead"),
        (NOW - 8 * 86400, "time out of range: over 7 days old"),
    ],
)
def test_a_sensor_clock_gone_wild_is_quarantined(ts: float, reason: str) -> None:
    payload = json.dumps({"ts": ts, "value": 22.0}).encode()
    assert _reason("rooms/1/temperature", payload) == reason


def test_an_unsynced_gateway_clock_does_not_judge_sensor_clocks() -> None:
    decoder = RoomSensorDecoder(
        [TopicMap("rooms/+/temperature", Kind.ROOM_TEMPERATURE)],
        clock=ManualClock(42.0),
    )
    reading = decoder.decode("rooms/1/temperature", b'{"ts": 1700000000, "value": 21}')
    assert reading.measured_at == 1_700_000_000


def test_reason_text_never_carries_the_value() -> None:
    reason = _reason("rooms/1/temperature", b'{"value": 1234.5678}')
    assert "1234" not in reason
