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
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from gateway.readings import UNITS, Kind, Reading
from gateway.store import Delivery
from sensors.errors import DecodeError
from sensors.formats import (
    SENML_UNITS,
    TASMOTA_FIELDS,
    ZIGBEE2MQTT_FIELDS,
    Sample,
    convert,
    object_samples,
    parse_json,
    parse_time,
    senml_samples,
    tasmota_samples,
)

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
Format = Literal["number", "json", "senml", "zigbee2mqtt", "tasmota"]

_DEFAULT_FIELDS: dict[str, dict[str, Kind]] = {
    "zigbee2mqtt": ZIGBEE2MQTT_FIELDS,
    "tasmota": TASMOTA_FIELDS,
}


@dataclass(frozen=True)
class TopicMap:
    """How messages on one topic filter become readings (one `[[mqtt.topics]]` entry).

    Attributes:
        filter: MQTT topic filter, with `+` and `#` wildcards.
        kind: The reading kind of single-value formats ("number", "json"), and of
            every SenML record when `fields` is empty.
        format: One of `sensors.formats.FORMATS`.
        value_path: Dotted path to the value in a "json" payload.
        time_path: Dotted path to the time ("json", "zigbee2mqtt"): epoch seconds
            or ISO 8601; when None or absent in a message, the gateway's clock
            stamps the reading.
        room_level: Which topic level (0-based) names the room.
        room: A fixed room for every message, instead of `room_level`.
        device: The device id, where ``{room}`` stands for the room (one node
            publishing several quantities); by default the topic itself.
        min_value: Lowest physically possible value; the kind's default if None.
        max_value: Highest physically possible value; the kind's default if None.
        unit: The unit single values are sent in (such as "Far"), converted to the
            kind's canonical unit; None when they already are in it.
        fields: Payload field (or SenML name) -> kind, for formats carrying several
            quantities; each format has defaults (SenML: by unit).
    """

    filter: str
    kind: Kind | None = None
    format: Format = "json"
    value_path: str = "value"
    time_path: str | None = "ts"
    room_level: int | None = 1
    room: str | None = None
    device: str | None = None
    min_value: float | None = None
    max_value: float | None = None
    unit: str | None = None
    fields: dict[str, Kind] | None = None

    def __post_init__(self) -> None:
        if self.format in ("number", "json") and self.kind is None:
            raise ValueError(f"a {self.format!r} topic map needs a kind")

    def physical_range(self, kind: Kind | None = None) -> tuple[float, float]:
        """The range outside which a value is quarantined (-inf/inf if unbounded)."""
        kind = kind or self.kind
        low, high = PHYSICAL_RANGES.get(kind, (-math.inf, math.inf))  # type: ignore[arg-type]
        return (
            low if self.min_value is None else self.min_value,
            high if self.max_value is None else self.max_value,
        )

    def kind_of(self, sample: Sample) -> Kind | None:
        """The kind a sample is read as, None when this map does not take it."""
        fields = self.fields or _DEFAULT_FIELDS.get(self.format)
        if fields is not None:
            return fields.get(sample.name)
        if self.format == "senml" and self.kind is None:
            return SENML_UNITS.get(sample.unit or "")
        return self.kind


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


@dataclass(frozen=True, slots=True)
class Decoded:
    """The readings one message carries.

    Attributes:
        readings: One or more readings, in payload order.
        gateway_time: Some reading was stamped at arrival (the sensor sent no
            time): a redelivery of this message would get a new `measured_at`,
            so only the message's identity can recognise it.
    """

    readings: tuple[Reading, ...]
    gateway_time: bool


@dataclass(frozen=True, slots=True)
class _Route:
    """What a topic resolves to; cached, since sensors repeat their topics."""

    tmap: TopicMap
    room: str | None
    device: str


_ROUTE_CACHE_SIZE = 4096


class RoomSensorDecoder:
    """Turns one MQTT message into readings, or says why it cannot.

    Args:
        maps: Topic maps; the first whose filter matches a topic applies.
        clock: Stamps readings whose payload carries no time.
        max_payload_bytes: Larger payloads are rejected unparsed.
        timezone: IANA zone of sensors sending local times without an offset
            (Tasmota's Time); `gateway.timezone` in the configuration.
    """

    def __init__(
        self,
        maps: Sequence[TopicMap],
        *,
        clock: Clock,
        max_payload_bytes: int = 4096,
        timezone: str = "UTC",
    ) -> None:
        self.maps = tuple(maps)
        self._clock = clock
        self._max_payload = max_payload_bytes
        self._tz = ZoneInfo(timezone)
        self._routes: dict[str, _Route | None] = {}

    @property
    def filters(self) -> list[str]:
        """The maps' topic filters, each once, in configuration order."""
        return list(dict.fromkeys(m.filter for m in self.maps))

    def decode(self, topic: str, payload: bytes) -> Reading:
        """Decode a message carrying one quantity: its (first) reading.

        Raises:
            DecodeError: See `decode_all`.
        """
        return self.decode_all(topic, payload).readings[0]

    def decode_all(self, topic: str, payload: bytes) -> Decoded:
        """Decode one message into every reading it carries.

        Raises:
            DecodeError: The topic is unmapped, the payload is unusable, or it
                carries no mapped quantity; the reason never contains the payload
                or a value from it.
        """
        route = self._route(topic)
        if len(payload) > self._max_payload:
            raise DecodeError(topic, "payload too large")
        now = self._clock.now()
        samples, gateway_time = self._samples(route.tmap, topic, payload, now)
        readings = tuple(
            reading
            for sample in samples
            if (reading := self._reading(route, topic, sample, now)) is not None
        )
        if not readings:
            raise DecodeError(topic, "no mapped quantity")
        return Decoded(readings, gateway_time)

    def _route(self, topic: str) -> _Route:
        route = self._routes.get(topic, _MISSING)
        if route is _MISSING:
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()  # many one-off topics: start over, stay small
            route = self._routes[topic] = self._resolve(topic)
        if route is None:
            raise DecodeError(topic, "unmapped topic")
        return route  # type: ignore[return-value]

    def _resolve(self, topic: str) -> _Route | None:
        for tmap in self.maps:
            if topic_matches(tmap.filter, topic):
                room = _room(tmap, topic)
                device = tmap.device.format(room=room or "") if tmap.device else topic
                return _Route(tmap, room, device)
        return None

    def _samples(
        self, tmap: TopicMap, topic: str, payload: bytes, now: float
    ) -> tuple[list[Sample], bool]:
        if tmap.format == "number":
            return [Sample("", _parse_number(topic, payload), tmap.unit)], True
        document = parse_json(topic, payload)
        if tmap.format == "senml":
            return senml_samples(topic, document, now)
        if tmap.format == "tasmota":
            samples, timed = tasmota_samples(
                topic, document, tmap.fields or TASMOTA_FIELDS, self._tz
            )
            return samples, not timed
        at = self._time(tmap, topic, document)
        if tmap.format == "zigbee2mqtt":
            fields = tmap.fields or ZIGBEE2MQTT_FIELDS
            found = [replace(s, at=at) for s in object_samples(document, fields)]
            return found, at is None
        raw = _lookup(document, tmap.value_path)
        if raw is _MISSING:
            raise DecodeError(topic, f"no value at {tmap.value_path}")
        return [Sample("", raw, tmap.unit, at)], at is None

    def _time(self, tmap: TopicMap, topic: str, document: object) -> float | None:
        raw = _MISSING if tmap.time_path is None else _lookup(document, tmap.time_path)
        return None if raw is _MISSING else parse_time(topic, raw, self._tz)

    def _reading(
        self, route: _Route, topic: str, sample: Sample, now: float
    ) -> Reading | None:
        kind = route.tmap.kind_of(sample)
        if kind is None:
            return None
        value = _converted(topic, _number(topic, sample.value, kind), sample, kind)
        measured_at = now if sample.at is None else sample.at
        if not math.isfinite(measured_at) or measured_at < 0:
            raise DecodeError(topic, "time is not epoch seconds")
        if sample.at is not None and now > CLOCK_SYNCED_AFTER:
            _check_skew(topic, sample.at, now)
        device = f"{route.device}/{sample.source}" if sample.source else route.device
        return Reading(
            device_id=device,
            kind=kind,
            value=_in_range(topic, value, route.tmap, kind),
            measured_at=measured_at,
            room=route.room,
        )


_MISSING: Any = object()

MAX_AHEAD_S = 300.0
"""A sensor time further ahead of the gateway's is a broken clock (ms for s...)."""
MAX_AGE_S = 7 * 86400.0
"""A sensor time older than this is not a reading to alarm on, nor to keep."""
CLOCK_SYNCED_AFTER = 1_577_836_800.0
"""2020-01-01: a gateway clock before this is not synced yet (a Pi has no RTC), and
cannot judge a sensor's clock."""
# TODO(clock): readings stamped before the gateway's clock is synced are not yet
# flagged CLOCK_UNSYNCED and re-stamped after the sync.


def _check_skew(topic: str, at: float, now: float) -> None:
    if at > now + MAX_AHEAD_S:
        raise DecodeError(topic, f"time out of range: over {MAX_AHEAD_S:.0f} s ahead")
    if at < now - MAX_AGE_S:
        raise DecodeError(
            topic, f"time out of range: over {MAX_AGE_S / 86400:.0f} days old"
        )


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
    try:
        value = float(raw)
    except OverflowError as exc:  # a JSON integer beyond any float
        raise DecodeError(topic, "value is NaN or infinite") from exc
    if not math.isfinite(value):
        raise DecodeError(topic, "value is NaN or infinite")
    return value


def _converted(topic: str, value: float, sample: Sample, kind: Kind) -> float:
    try:
        return convert(value, sample.unit, UNITS[kind])
    except ValueError as exc:
        raise DecodeError(topic, str(exc)) from exc


def _in_range(topic: str, value: float, tmap: TopicMap, kind: Kind) -> float:
    low, high = tmap.physical_range(kind)
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
        try:
            decoded = self._decoder.decode_all(message.topic, message.payload)
        except DecodeError as err:
            self._to_quarantine(message, err.reason)
            return
        except Exception as exc:  # a decoder bug must not take the link down
            log.warning(
                "room-sensor decoder failed (%s) on a %d-byte message; quarantined",
                type(exc).__name__,
                len(message.payload),
            )
            self._to_quarantine(message, "decoder error")
            return
        self._to_ingest(message, decoded)

    def _to_ingest(self, message: MqttMessage, decoded: Decoded) -> None:
        readings = decoded.readings
        ack: Ack = functools.partial(self._link.ack, message)
        if len(readings) > 1:
            ack = _AfterAll(len(readings), ack)
        try:
            for index, reading in enumerate(readings):
                on_commit = ack
                if decoded.gateway_time:
                    on_commit = Delivery(
                        ack, delivery_key(message, index), message.duplicate
                    )
                self._ingest(reading, on_commit)
        except Exception as exc:
            self.counters.ingest_failed += 1
            log.warning(
                "room-sensor ingest failed (%s); left unacked", type(exc).__name__
            )
            return
        self.counters.decoded += 1

    def _to_quarantine(self, message: MqttMessage, reason: str) -> None:
        self.counters.quarantined[reason] += 1
        log.debug("room-sensor message quarantined: %s", reason)
        ack = functools.partial(self._link.ack, message)
        try:
            self._quarantine("mqtt:" + message.topic, reason, message.payload, ack)
        except Exception as exc:
            log.warning(
                "room-sensor quarantine failed (%s); left unacked", type(exc).__name__
            )


class _AfterAll:
    """Acknowledges a message once every reading it carried is committed.

    Called from the store's single writer thread, so the count needs no lock.
    """

    __slots__ = ("_ack", "_left")

    def __init__(self, count: int, ack: Ack) -> None:
        self._left = count
        self._ack = ack

    def __call__(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._ack()


def delivery_key(message: MqttMessage, index: int = 0) -> bytes:
    """A message's identity across redeliveries: topic, payload, packet id, index.

    A broker resends an unacknowledged QoS-1 message with its original packet id
    and the DUP flag set (MQTT 5.0, sections 3.3.1.1 and 4.4), so a redelivered
    copy has the key of the first; `index` tells apart the readings of one message.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(message.topic.encode())
    digest.update(b"\0%d\0%d\0" % (message.mid, index))
    digest.update(message.payload)
    return digest.digest()
