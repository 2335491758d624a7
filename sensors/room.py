"""MQTT room sensors: topic maps, the payload decoder and the subscribing adapter.

Room sensors (temperature, CO2, light, motion, occupancy, humidity) publish small
messages on a site's broker. The configuration maps topic filters to reading kinds
and says where the value, the time and the room are found. Every message either
becomes a `Reading` or goes to quarantine with a short reason; nothing is dropped
silently, and a message is acknowledged to the broker only once the store has made
its outcome durable.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gateway.readings import Kind, Reading
from sensors.errors import DecodeError

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.paho import MqttLink, MqttMessage

log = logging.getLogger(__name__)

PHYSICAL_RANGES: dict[Kind, tuple[float, float]] = {
    Kind.ROOM_TEMPERATURE: (-40.0, 85.0),
    Kind.CO2: (0.0, 40000.0),
    Kind.LIGHT: (0.0, 200000.0),
    Kind.MOTION: (0.0, 1.0),
    Kind.OCCUPANCY: (0.0, 1000.0),
    Kind.HUMIDITY: (0.0, 100.0),
}
"""Default range per kind; beyond it a sensor is broken, whatever the room does.

Temperature: the -40..85 Cel industrial operating range of common sensor chips.
CO2: 40000 ppm is the top of NDIR sensors' extended range. Light: direct sunlight
is about 100000 lx.
"""

Ack = Callable[[], None]


@dataclass(frozen=True)
class TopicMap:
    """How messages on one topic filter become readings (one `[[rooms.map]]` entry).

    Attributes:
        filter: MQTT topic filter, with `+` and `#` wildcards.
        kind: The reading kind the messages carry.
        format: "json" (an object) or "number" (the payload is the number itself).
        value_path: Dotted path to the value in a JSON payload.
        time_path: Dotted path to epoch seconds in the payload; when None or absent
            in a message, the gateway's clock stamps the reading.
        room_level: Which topic level (0-based) names the room.
        room: A fixed room for every message, instead of `room_level`.
        device: The device id, where ``{room}`` stands for the room (one node
            publishing several quantities); by default the topic itself.
        min_value: Lowest physically possible value; the kind's default if None.
        max_value: Highest physically possible value; the kind's default if None.
    """

    filter: str
    kind: Kind
    format: Literal["number", "json"] = "json"
    value_path: str = "value"
    time_path: str | None = "ts"
    room_level: int | None = 1
    room: str | None = None
    device: str | None = None
    min_value: float | None = None
    max_value: float | None = None

    def physical_range(self) -> tuple[float, float]:
        """The range outside which a value is quarantined (-inf/inf if unbounded)."""
        low, high = PHYSICAL_RANGES.get(self.kind, (-math.inf, math.inf))
        return (
            low if self.min_value is None else self.min_value,
            high if self.max_value is None else self.max_value,
        )


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (MQTT 5.0, section 4.7).

    Wildcards at the first level do not match topics starting with `$`.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    for i, part in enumerate(topic_filter.split("/")):
        if part == "#":
            return True
        if i >= len(levels) or part not in ("+", levels[i]):
            return False
    return len(levels) == len(topic_filter.split("/"))


class RoomSensorDecoder:
    """Turns one MQTT message into a `Reading`, or says why it cannot.

    Args:
        maps: Topic maps; the first whose filter matches a topic applies.
        clock: Stamps readings whose payload carries no time.
        max_payload_bytes: Larger payloads are rejected unparsed.
    """

    def __init__(
        self, maps: Sequence[TopicMap], *, clock: Clock, max_payload_bytes: int = 4096
    ) -> None:
        self.maps = tuple(maps)
        self._clock = clock
        self._max_payload = max_payload_bytes

    @property
    def filters(self) -> list[str]:
        """The maps' topic filters, each once, in configuration order."""
        return list(dict.fromkeys(m.filter for m in self.maps))

    def decode(self, topic: str, payload: bytes) -> Reading:
        """Decode one message.

        Raises:
            DecodeError: The topic is unmapped or the payload is unusable; the
                reason never contains the payload or its value.
        """
        tmap = self._map_for(topic)
        if len(payload) > self._max_payload:
            raise DecodeError(topic, "payload too large")
        value, measured_at = self._value_and_time(tmap, topic, payload)
        room = _room(tmap, topic)
        device = tmap.device.format(room=room or "") if tmap.device else topic
        return Reading(
            device_id=device,
            kind=tmap.kind,
            value=value,
            measured_at=measured_at,
            room=room,
        )

    def _map_for(self, topic: str) -> TopicMap:
        for tmap in self.maps:
            if topic_matches(tmap.filter, topic):
                return tmap
        raise DecodeError(topic, "unmapped topic")

    def _value_and_time(
        self, tmap: TopicMap, topic: str, payload: bytes
    ) -> tuple[float, float]:
        if tmap.format == "number":
            value = _number(topic, _parse_number(topic, payload), tmap.kind)
            return _in_range(topic, value, tmap), self._clock.now()

        document = _parse_json(topic, payload)
        raw = _lookup(document, tmap.value_path)
        if raw is _MISSING:
            raise DecodeError(topic, f"no value at {tmap.value_path}")
        value = _in_range(topic, _number(topic, raw, tmap.kind), tmap)
        return value, self._measured_at(tmap, topic, document)

    def _measured_at(self, tmap: TopicMap, topic: str, document: object) -> float:
        raw = _MISSING if tmap.time_path is None else _lookup(document, tmap.time_path)
        if raw is _MISSING:
            return self._clock.now()
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise DecodeError(topic, "time is not a number")
        if not math.isfinite(raw) or raw < 0:
            raise DecodeError(topic, "time is not epoch seconds")
        return float(raw)


_MISSING = object()


def _parse_json(topic: str, payload: bytes) -> object:
    try:
        return json.loads(payload)
    # Deeply nested arrays exhaust the parser's recursion limit within 4 KB.
    except (ValueError, RecursionError) as exc:
        raise DecodeError(topic, "not JSON") from exc


def _parse_number(topic: str, payload: bytes) -> float:
    try:
        return float(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(topic, "value is not a number") from exc


def _lookup(document: object, path: str) -> object:
    node = document
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _number(topic: str, raw: object, kind: Kind) -> float:
    # PIR sensors commonly send true/false; anywhere else a boolean is a type error.
    if isinstance(raw, bool) and kind is Kind.MOTION:
        return float(raw)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError(topic, "value is not a number")
    value = float(raw)
    if not math.isfinite(value):
        raise DecodeError(topic, "value is NaN or infinite")
    return value


def _in_range(topic: str, value: float, tmap: TopicMap) -> float:
    low, high = tmap.physical_range()
    if not low <= value <= high:
        raise DecodeError(topic, f"value outside physical range [{low:g}, {high:g}]")
    return value


def _room(tmap: TopicMap, topic: str) -> str | None:
    if tmap.room is not None or tmap.room_level is None:
        return tmap.room
    levels = topic.split("/")
    return levels[tmap.room_level] if tmap.room_level < len(levels) else None


@dataclass
class RoomCounters:
    """What the adapter has seen since it started.

    Attributes:
        received: Messages handed to the adapter.
        decoded: Messages that became readings.
        quarantined: Messages sent to quarantine, by reason.
        ingest_failed: Readings the ingest callback raised on (left unacked, so
            the broker redelivers them).
    """

    received: int = 0
    decoded: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    ingest_failed: int = 0


class RoomSensorAdapter:
    """Subscribes to room-sensor topics and hands each message on, with its ack.

    Args:
        link: The MQTT link, created by the caller with `manual_ack=True`.
        decoder: Turns messages into readings.
        ingest: Receives each reading and the ack to call once it is stored.
        quarantine: Receives (source, reason, payload, ack) for each bad message.
        filters: What to subscribe to; the decoder's filters by default. A wider
            filter (such as `rooms/#`) also quarantines unmapped sensors' messages
            as "unmapped topic", so an operator sees them.
    """

    def __init__(
        self,
        link: MqttLink,
        decoder: RoomSensorDecoder,
        *,
        ingest: Callable[[Reading, Ack], None],
        quarantine: Callable[[str, str, bytes, Ack], None],
        filters: Sequence[str] | None = None,
    ) -> None:
        self._link = link
        self._decoder = decoder
        self._ingest = ingest
        self._quarantine = quarantine
        self._filters = list(filters) if filters is not None else decoder.filters
        self.counters = RoomCounters()

    @property
    def filters(self) -> list[str]:
        """The topic filters the adapter subscribes to."""
        return list(self._filters)

    def start(self) -> None:
        """Subscribe every filter at QoS 1, now or on connect, and after reconnects.

        Calling it before `link.connect()` is fine, and lets the link subscribe from
        its own network thread as soon as the broker accepts the connection.
        """
        for topic_filter in self._filters:
            self._link.subscribe(topic_filter, self.handle, qos=1)
        log.info("room sensors: subscribed to %d topic filters", len(self._filters))

    def handle(self, message: MqttMessage) -> None:
        """Decode one message and pass it to ingest or quarantine; never raises."""
        self.counters.received += 1
        ack = functools.partial(self._link.ack, message)
        try:
            reading = self._decoder.decode(message.topic, message.payload)
        except DecodeError as err:
            self._to_quarantine(message, err.reason, ack)
            return
        except Exception as exc:  # a decoder bug must not take the link down
            log.warning(
                "room-sensor decoder failed (%s) on a %d-byte message; quarantined",
                type(exc).__name__,
                len(message.payload),
            )
            self._to_quarantine(message, "decoder error", ack)
            return
        self._to_ingest(reading, ack)

    def _to_ingest(self, reading: Reading, ack: Ack) -> None:
        try:
            self._ingest(reading, ack)
        except Exception as exc:
            self.counters.ingest_failed += 1
            log.warning(
                "room-sensor ingest failed (%s); left unacked", type(exc).__name__
            )
            return
        self.counters.decoded += 1

    def _to_quarantine(self, message: MqttMessage, reason: str, ack: Ack) -> None:
        self.counters.quarantined[reason] += 1
        log.debug("room-sensor message quarantined: %s", reason)
        try:
            self._quarantine("mqtt:" + message.topic, reason, message.payload, ack)
        except Exception as exc:
            log.warning(
                "room-sensor quarantine failed (%s); left unacked", type(exc).__name__
            )
