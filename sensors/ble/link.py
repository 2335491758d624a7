"""The link to each wearable: find, connect, subscribe, keep it up, hand on readings.

One `WearableLink.run()` task per wearable loops forever::

    searching -> connecting -> connected -> (link lost) -> backoff -> searching ...

Every await on the central has a timeout, so a stack that never answers cannot
wedge the loop; a fresh connection (a new bleak client) is opened every time and
every notification is subscribed again, because a new client has no
subscriptions. Backoff is exponential with full jitter, so a ward's worth of
straps coming back after a power cut do not all retry in step.

The pipeline sees a `LinkSink`: readings, quarantined payloads, and link up/down
(the rules turn a link down too long into a technical alarm, and silence while
connected into a stale-stream one). This module imports no bleak.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from gateway.clock import Clock
from gateway.readings import Reading
from sensors.ble import registry
from sensors.ble.bleak_central import (
    GATT_TIMEOUT_S,
    Advertisement,
    BleError,
    BleErrorReason,
    Central,
    Connection,
)
from sensors.errors import DecodeError

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["searching", "connecting", "connected", "backoff"]

MIN_CONNECT_TIMEOUT_S = 10.0
"""BlueZ often needs several seconds to connect; shorter timeouts fail healthy links."""

_LIVENESS_S = 5.0
"""How often a connected link double-checks `is_connected` (missed callbacks)."""

BATTERY_UUID = "2a19"


@dataclass(frozen=True, slots=True)
class Profile:
    """What the link does for one GATT profile: characteristics to subscribe to."""

    service: str
    notify: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    "heart_rate": Profile("180d", ("2a37",)),
    # Battery Level is read on connect and every `battery_every_s`: its notify
    # property is optional in the Battery Service, a read always works.
    "battery": Profile("180f"),
    "pulse_oximeter": Profile("1822", ("2a5f",)),
    "thermometer": Profile("1809", ("2a1c",)),
    # Blood Pressure Measurement is indicated, not notified; bleak's start_notify
    # subscribes to either.
    "blood_pressure": Profile("1810", ("2a35",)),
}


@dataclass(frozen=True, slots=True)
class WearableSpec:
    """One configured wearable.

    Attributes:
        patient_ref: Pseudonymous patient the readings belong to.
        address: Bluetooth address; when None the wearable is found by
            `name_pattern` and/or advertised `service_uuids`.
        name_pattern: Regular expression searched in the advertised name.
        service_uuids: Advertised services to match (16-bit SIG form, "180d").
        profiles: Names from `PROFILES`.
        connect_timeout_s: Timeout of one connect (and one search); at least 10 s.
        battery_every_s: Battery Level read interval while connected.
    """

    patient_ref: str
    address: str | None = None
    name_pattern: str | None = None
    service_uuids: tuple[str, ...] = ("180d",)
    profiles: tuple[str, ...] = ("heart_rate", "battery")
    connect_timeout_s: float = 15.0
    battery_every_s: float = 600.0

    def __post_init__(self) -> None:
        if self.connect_timeout_s < MIN_CONNECT_TIMEOUT_S:
            raise ValueError(
                f"connect_timeout_s must be >= {MIN_CONNECT_TIMEOUT_S}, "
                f"got {self.connect_timeout_s}"
            )
        unknown = sorted(set(self.profiles) - set(PROFILES))
        if unknown:
            raise ValueError(f"unknown profiles {unknown}; known: {sorted(PROFILES)}")


class LinkSink(Protocol):
    """Where a link hands its output (the gateway pipeline implements this)."""

    def ingest(self, reading: Reading) -> None:
        """Take one reading."""
        ...

    def quarantine(self, source: str, reason: str, payload: bytes) -> None:
        """Keep a payload that could not be decoded."""
        ...

    def link_state(
        self, device_id: str, patient_ref: str | None, connected: bool
    ) -> None:
        """The wearable's link went up or down."""
        ...


Decoder = Callable[[str, bytes, str, str | None, float], list[Reading]]
"""(characteristic uuid, payload, device id, patient ref, time) -> readings."""


def decode_notification(
    char_uuid: str, data: bytes, device_id: str, patient_ref: str | None, at: float
) -> list[Reading]:
    """Decode one notification or read value by characteristic (`registry`).

    Raises:
        DecodeError: Malformed payload, or no decoder for the characteristic.
    """
    measurement = registry.decode(char_uuid, data)
    return registry.to_readings(
        measurement, device_id=device_id, patient_ref=patient_ref, at=at
    )


class WearableLink:
    """Keeps one wearable connected and its notifications flowing into `sink`.

    Args:
        spec: Which wearable, and what to do with it.
        central: The BLE adapter (`BleakCentral`, or `FakeCentral` in tests).
        sink: The pipeline.
        clock: Stamps readings and `last_data_at`.
        backoff_initial_s: First retry delay bound.
        backoff_max_s: Largest retry delay bound (and the delay without BlueZ).
        rng: Jitter source.
        decoder: Turns notifications into readings (`decode_notification`).

    Attributes:
        state: "searching", "connecting", "connected" or "backoff".
        reconnects: Connections made after the first one.
        last_data_at: Clock time of the last notification, None before any.
        battery: Last battery level read, percent.
        rssi: Signal strength of the last advertisement that led to a connect.
    """

    def __init__(
        self,
        spec: WearableSpec,
        central: Central,
        sink: LinkSink,
        *,
        clock: Clock,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        rng: random.Random | None = None,
        decoder: Decoder = decode_notification,
    ) -> None:
        self.spec = spec
        self.central = central
        self.sink = sink
        self.clock = clock
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self.decoder = decoder
        self.state: State = "searching"
        self.reconnects = 0
        self.last_data_at: float | None = None
        self.battery: int | None = None
        self.rssi: int | None = None
        self._attempt = 0
        self._connected_once = False
        self._last_failure: BleErrorReason | None = None

    @property
    def name(self) -> str:
        """Pseudonymous label for logs and task names (address, or "unpaired")."""
        return self.spec.address or "unpaired"

    async def run(self) -> None:
        """Keep the wearable connected until cancelled."""
        while True:
            delay = await self._attempt_once()
            self._set_state("backoff")
            log.debug("wearable %s: retry in %.1f s", self.name, delay)
            await asyncio.sleep(delay)

    def next_backoff(self) -> float:
        """Full-jitter exponential backoff: uniform(0, min(max, initial * 2^n))."""
        cap = min(
            self.backoff_max_s, self.backoff_initial_s * 2 ** min(self._attempt, 30)
        )
        self._attempt += 1
        return self.rng.uniform(0.0, cap)

    # -- one attempt ----------------------------------------------------------------

    async def _attempt_once(self) -> float:
        try:
            found = await self._find()
            if found is None:
                log.debug("wearable %s: not seen in this scan", self.name)
                return self.next_backoff()
            await self._connect_and_serve(found)
        except BleError as exc:
            return self._after_failure(exc)
        return self.next_backoff()

    async def _find(self) -> Advertisement | None:
        self._set_state("searching")
        timeout = self.spec.connect_timeout_s
        return await self._bounded(
            self.central.find(self.spec, timeout), timeout + GATT_TIMEOUT_S
        )

    async def _connect_and_serve(self, found: Advertisement) -> None:
        self._set_state("connecting")
        lost = asyncio.Event()
        timeout = self.spec.connect_timeout_s
        conn = await self._bounded(
            self.central.connect(found.address, timeout, lost.set), timeout + 1.0
        )
        up = False
        try:
            await self._subscribe(conn)
            self._on_connected(found)
            up = True
            await self._serve(conn, lost)
        finally:
            await self._close(conn, up)

    async def _subscribe(self, conn: Connection) -> None:
        for profile in self.spec.profiles:
            for char in PROFILES[profile].notify:
                await self._bounded(
                    conn.start_notify(char, self._handler(conn.address, char)),
                    GATT_TIMEOUT_S,
                )

    async def _serve(self, conn: Connection, lost: asyncio.Event) -> None:
        """Read the battery on schedule until the link drops."""
        next_battery = 0.0
        loop = asyncio.get_running_loop()
        while conn.is_connected and not lost.is_set():
            if "battery" in self.spec.profiles and loop.time() >= next_battery:
                await self._read_battery(conn)
                next_battery = loop.time() + self.spec.battery_every_s
            wait = min(_LIVENESS_S, max(0.0, next_battery - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait or _LIVENESS_S):
                    await lost.wait()

    async def _read_battery(self, conn: Connection) -> None:
        data = await self._bounded(conn.read(BATTERY_UUID), GATT_TIMEOUT_S)
        for reading in self._decode(conn.address, BATTERY_UUID, data):
            self.battery = int(reading.value)
            self.sink.ingest(reading)

    async def _close(self, conn: Connection, was_up: bool) -> None:
        task = asyncio.current_task()
        stopping = task is not None and task.cancelling() > 0
        if was_up and not stopping:
            log.info("wearable %s lost", conn.address)
            self.sink.link_state(conn.address, self.spec.patient_ref, False)
        if conn.is_connected:
            with contextlib.suppress(BleError, TimeoutError):
                async with asyncio.timeout(GATT_TIMEOUT_S):
                    await conn.disconnect()

    # -- state and failures ---------------------------------------------------------

    def _on_connected(self, found: Advertisement) -> None:
        self._set_state("connected")
        self.rssi = found.rssi
        self._attempt = 0
        self._last_failure = None
        if self._connected_once:
            self.reconnects += 1
            log.info("wearable %s back (reconnect %d)", found.address, self.reconnects)
        else:
            log.info("wearable %s connected", found.address)
        self._connected_once = True
        self.sink.link_state(found.address, self.spec.patient_ref, True)

    def _after_failure(self, exc: BleError) -> float:
        first = exc.reason != self._last_failure
        self._last_failure = exc.reason
        if exc.reason is BleErrorReason.BLUEZ_UNAVAILABLE:
            if first:
                log.error(
                    "wearable %s: %s; retrying every %.0f s",
                    self.name,
                    exc,
                    self.backoff_max_s,
                )
            return self.backoff_max_s
        if exc.reason is BleErrorReason.MISSING_CHARACTERISTIC and first:
            log.warning("wearable %s: %s", self.name, exc)
        else:
            log.debug("wearable %s: %s", self.name, exc)
        if exc.reason is BleErrorReason.IN_PROGRESS:
            # The adapter is busy with another wearable: wait briefly, do not
            # escalate the backoff for a condition that is not this device's.
            return self.rng.uniform(0.0, self.backoff_initial_s)
        return self.next_backoff()

    def _set_state(self, state: State) -> None:
        if state != self.state:
            log.debug("wearable %s: %s -> %s", self.name, self.state, state)
            self.state = state

    async def _bounded(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation (CPython gh-86296) and the link could not be stopped.
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except TimeoutError as exc:
            raise BleError(
                self.spec.address,
                BleErrorReason.TIMEOUT,
                f"no answer in {timeout:.0f} s",
            ) from exc

    # -- notifications --------------------------------------------------------------

    def _handler(self, address: str, char: str) -> Callable[[bytes], None]:
        def on_value(data: bytes) -> None:
            self.last_data_at = self.clock.now()
            for reading in self._decode(address, char, data):
                self.sink.ingest(reading)

        return on_value

    def _decode(self, address: str, char: str, data: bytes) -> list[Reading]:
        try:
            return self.decoder(
                char, data, address, self.spec.patient_ref, self.clock.now()
            )
        except DecodeError as exc:
            log.warning(
                "wearable %s: malformed %s value: %s", address, char, exc.reason
            )
            self.sink.quarantine(f"ble:{address}", exc.reason, data)
            return []
