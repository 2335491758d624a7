"""The BLE central, as the link manager sees it, and its bleak implementation.

`Central` and `Connection` are the port; `BleakCentral` is the only code in the
gateway that imports bleak, and `FakeCentral` is its in-memory twin for fast tests
of the link manager. bleak's errors are translated here into `BleError`, chained
with `from`, so callers never see a bleak (or D-Bus) exception.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import re
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from bleak import BleakClient, BleakScanner
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import (
    BleakCharacteristicNotFoundError,
    BleakDeviceNotFoundError,
    BleakError,
)

from gateway.errors import ExitCode, GatewayError

GATT_TIMEOUT_S = 10.0
"""Upper bound for one GATT operation (subscribe, read, disconnect)."""

_SIG_BASE = "-0000-1000-8000-00805f9b34fb"

NotifyCallback = Callable[[bytes], None]
T = TypeVar("T")
BackendPair = tuple[type[BaseBleakClient], type[BaseBleakScanner]]


class BleErrorReason(enum.StrEnum):
    """Why a BLE operation failed; the link manager picks its retry policy by it."""

    BLUEZ_UNAVAILABLE = "bluez_unavailable"
    IN_PROGRESS = "in_progress"
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    MISSING_CHARACTERISTIC = "missing_characteristic"
    FAILED = "failed"


_HINTS = {
    BleErrorReason.BLUEZ_UNAVAILABLE: "BlueZ/D-Bus is not available: is bluetoothd "
    "running? is /run/dbus/system_bus_socket there?",
    BleErrorReason.IN_PROGRESS: "the adapter is busy with another operation",
    BleErrorReason.TIMEOUT: "the device did not answer in time",
    BleErrorReason.NOT_FOUND: "the device is not in range or not advertising",
    BleErrorReason.MISSING_CHARACTERISTIC: "the device lacks a characteristic of "
    "its configured profiles; check the wearable's profiles in the config",
    BleErrorReason.FAILED: "the BLE operation failed",
}


class BleError(GatewayError):
    """A BLE operation failed.

    Attributes:
        address: The device concerned, or None for adapter-wide operations (scan).
        reason: Why, as a `BleErrorReason`.
    """

    exit_code = ExitCode.BLE_UNAVAILABLE

    def __init__(
        self, address: str | None, reason: BleErrorReason, detail: str = ""
    ) -> None:
        self.address = address
        self.reason = reason
        where = f"BLE device {address}" if address else "BLE adapter"
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"{where}: {_HINTS[reason]}{suffix}")


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One advertising device as seen by a scan.

    Attributes:
        address: Bluetooth address (upper case).
        name: Advertised local name, if any.
        rssi: Received signal strength, dBm.
        service_uuids: Advertised services, 16-bit SIG UUIDs shortened ("180d").
    """

    address: str
    name: str | None
    rssi: int | None
    service_uuids: tuple[str, ...] = ()


class DeviceFilter(Protocol):
    """What `Central.find` matches on (`link.WearableSpec` is one)."""

    address: str | None
    name_pattern: str | None
    service_uuids: tuple[str, ...]


class Connection(Protocol):
    """One live GATT connection."""

    address: str

    @property
    def is_connected(self) -> bool:
        """Whether the link is up."""
        ...

    async def start_notify(self, char_uuid: str, callback: NotifyCallback) -> None:
        """Subscribe to a characteristic; `callback` gets each value's bytes."""
        ...

    async def read(self, char_uuid: str) -> bytes:
        """Read a characteristic's value."""
        ...

    async def disconnect(self) -> None:
        """Close the connection."""
        ...


class Central(Protocol):
    """The gateway's BLE adapter."""

    async def scan(self, timeout: float) -> list[Advertisement]:
        """Everything advertising within `timeout` seconds."""
        ...

    async def find(self, spec: DeviceFilter, timeout: float) -> Advertisement | None:
        """The first advertisement matching `spec`, or None after `timeout`."""
        ...

    async def connect(
        self, address: str, timeout: float, on_disconnect: Callable[[], None]
    ) -> Connection:
        """Connect and discover services; `on_disconnect` fires when it drops."""
        ...


def short_uuid(uuid: str) -> str:
    """Shorten a SIG-base UUID to its 16-bit form ("180d"); lower-case the rest."""
    uuid = uuid.lower()
    if uuid.startswith("0000") and uuid.endswith(_SIG_BASE):
        return uuid[4:8]
    return uuid


def matches(spec: DeviceFilter, adv: Advertisement) -> bool:
    """Whether an advertisement is the wearable `spec` describes.

    By address when the spec has one; otherwise every given criterion must hold:
    the name matches `name_pattern` (regular expression, searched) and one of the
    advertised services is in `service_uuids`.
    """
    if spec.address:
        return adv.address.upper() == spec.address.upper()
    if spec.name_pattern and not re.search(spec.name_pattern, adv.name or ""):
        return False
    wanted = {short_uuid(u) for u in spec.service_uuids}
    return not wanted or bool(wanted & set(adv.service_uuids))


def translate(exc: BaseException, address: str | None) -> BleError:
    """Map a bleak, D-Bus or OS exception to a `BleError` (not raised here)."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        # bleak on Linux without a D-Bus system bus (no bluetoothd in the image).
        reason = BleErrorReason.BLUEZ_UNAVAILABLE
    elif isinstance(exc, TimeoutError):
        reason = BleErrorReason.TIMEOUT
    elif isinstance(exc, BleakDeviceNotFoundError):
        reason = BleErrorReason.NOT_FOUND
    elif isinstance(exc, BleakCharacteristicNotFoundError):
        reason = BleErrorReason.MISSING_CHARACTERISTIC
    elif "InProgress" in text or "already in progress" in text.lower():
        # BlueZ: org.bluez.Error.InProgress / "Operation already in progress".
        reason = BleErrorReason.IN_PROGRESS
    else:
        reason = BleErrorReason.FAILED
    return BleError(address, reason, type(exc).__name__)


@contextlib.contextmanager
def _translated(address: str | None) -> Iterator[None]:
    try:
        yield
    except (BleakError, OSError, EOFError) as exc:
        raise translate(exc, address) from exc


async def _bounded(
    coro: Coroutine[Any, Any, T], timeout: float, address: str | None
) -> T:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
    # that arrives as the inner call finishes (CPython gh-86296), and then a link
    # task cannot be stopped.
    with _translated(address):
        async with asyncio.timeout(timeout):
            return await coro


class BleakConnection:
    """A `Connection` over a connected `BleakClient`."""

    def __init__(self, client: BleakClient) -> None:
        self.client = client
        self.address = client.address

    @property
    def is_connected(self) -> bool:
        """Whether bleak reports the link up."""
        return self.client.is_connected

    async def start_notify(self, char_uuid: str, callback: NotifyCallback) -> None:
        """Subscribe to `char_uuid`.

        Raises:
            BleError: Missing characteristic, timeout, or the stack refused.
        """

        def forward(_char: object, data: bytearray) -> None:
            callback(bytes(data))

        await _bounded(
            self.client.start_notify(char_uuid, forward), GATT_TIMEOUT_S, self.address
        )

    async def read(self, char_uuid: str) -> bytes:
        """Read `char_uuid`.

        Raises:
            BleError: Missing characteristic, timeout, or the stack refused.
        """
        data = await _bounded(
            self.client.read_gatt_char(char_uuid), GATT_TIMEOUT_S, self.address
        )
        return bytes(data)

    async def disconnect(self) -> None:
        """Disconnect.

        Raises:
            BleError: Timeout, or the stack refused.
        """
        await _bounded(self.client.disconnect(), GATT_TIMEOUT_S, self.address)


class BleakCentral:
    """`Central` implemented with bleak.

    Args:
        backend: (client, scanner) bleak backend classes; None for the platform's
            own (BlueZ on a Pi). `VirtualRadio.backends()` gives the bumble one.
    """

    def __init__(self, backend: BackendPair | None = None) -> None:
        self._client_kwargs: dict[str, Any] = {}
        self._scanner_kwargs: dict[str, Any] = {}
        if backend is not None:
            self._client_kwargs["backend"] = backend[0]
            self._scanner_kwargs["backend"] = backend[1]

    async def scan(self, timeout: float) -> list[Advertisement]:
        """Scan for `timeout` seconds.

        Raises:
            BleError: No adapter, no BlueZ, or the adapter is busy.
        """
        found = await _bounded(
            BleakScanner.discover(timeout, return_adv=True, **self._scanner_kwargs),
            timeout + GATT_TIMEOUT_S,
            None,
        )
        return [_advertisement(dev, adv) for dev, adv in found.values()]

    async def find(self, spec: DeviceFilter, timeout: float) -> Advertisement | None:
        """Scan until an advertisement matches `spec`, at most `timeout` seconds.

        Raises:
            BleError: No adapter, no BlueZ, or the adapter is busy.
        """
        hits: list[Advertisement] = []

        def accept(device: BLEDevice, adv: AdvertisementData) -> bool:
            seen = _advertisement(device, adv)
            if matches(spec, seen):
                hits.append(seen)
            return bool(hits)

        scan = BleakScanner.find_device_by_filter(
            accept, timeout=timeout, **self._scanner_kwargs
        )
        device = await _bounded(scan, timeout + GATT_TIMEOUT_S, spec.address)
        return hits[0] if device is not None and hits else None

    async def connect(
        self, address: str, timeout: float, on_disconnect: Callable[[], None]
    ) -> BleakConnection:
        """Connect to `address` (a new `BleakClient` every time) and discover.

        Raises:
            BleError: Not found, timeout, no BlueZ, or the adapter is busy.
        """
        client = BleakClient(
            address,
            disconnected_callback=lambda _client: on_disconnect(),
            timeout=timeout,
            **self._client_kwargs,
        )
        await _bounded(client.connect(), timeout, address)
        return BleakConnection(client)


def _advertisement(device: BLEDevice, adv: AdvertisementData) -> Advertisement:
    return Advertisement(
        address=device.address.upper(),
        name=adv.local_name or device.name,
        rssi=adv.rssi,
        service_uuids=tuple(short_uuid(u) for u in adv.service_uuids),
    )


# -- in-memory twin ---------------------------------------------------------------

HANG = object()
"""A `FakeCentral` fault that never completes (until cancelled)."""


@dataclass
class FakeDevice:
    """A wearable as `FakeCentral` knows it: what it advertises and what it holds."""

    address: str
    name: str | None = None
    service_uuids: tuple[str, ...] = ("180d", "180f")
    rssi: int = -60
    values: dict[str, bytes] = field(default_factory=lambda: {"2a19": bytes([90])})
    notifiable: tuple[str, ...] = ("2a37",)


class FakeConnection:
    """A `FakeCentral` connection: records subscriptions, delivers notifications."""

    def __init__(self, device: FakeDevice, on_disconnect: Callable[[], None]) -> None:
        self.address = device.address
        self.device = device
        self.subscriptions: dict[str, NotifyCallback] = {}
        self.reads: list[str] = []
        self._on_disconnect = on_disconnect
        self._connected = True

    @property
    def is_connected(self) -> bool:
        """Whether the fake link is up."""
        return self._connected

    async def start_notify(self, char_uuid: str, callback: NotifyCallback) -> None:
        """Record the subscription.

        Raises:
            BleError: The device has no such notifiable characteristic.
        """
        if char_uuid not in self.device.notifiable:
            raise BleError(self.address, BleErrorReason.MISSING_CHARACTERISTIC)
        self.subscriptions[char_uuid] = callback

    async def read(self, char_uuid: str) -> bytes:
        """The device's stored value.

        Raises:
            BleError: The device has no such characteristic.
        """
        self.reads.append(char_uuid)
        if char_uuid not in self.device.values:
            raise BleError(self.address, BleErrorReason.MISSING_CHARACTERISTIC)
        return self.device.values[char_uuid]

    async def disconnect(self) -> None:
        """Disconnect (the callback fires, as with BlueZ)."""
        self.drop()

    def drop(self) -> None:
        """The peripheral went away."""
        if self._connected:
            self._connected = False
            self.subscriptions.clear()
            self._on_disconnect()


class FakeCentral:
    """In-memory `Central`: scripted devices, faults and notifications.

    Faults are queued per operation ("scan", "find", "connect") and consumed one
    per call: an exception (raw, as bleak would raise it: it goes through the same
    `translate` as `BleakCentral`) or `HANG`.
    """

    def __init__(self, *devices: FakeDevice) -> None:
        self.devices = {d.address: d for d in devices}
        self.connections: list[FakeConnection] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self._faults: dict[str, collections.deque[object]] = collections.defaultdict(
            collections.deque
        )

    def inject(self, operation: str, *faults: object) -> None:
        """Queue faults for the next calls of `operation`."""
        self._faults[operation].extend(faults)

    def current(self, address: str) -> FakeConnection | None:
        """The live connection to `address`, if any."""
        live = [c for c in self.connections if c.address == address and c.is_connected]
        return live[-1] if live else None

    def notify(self, address: str, char_uuid: str, data: bytes) -> bool:
        """Deliver a notification if subscribed; True when delivered."""
        conn = self.current(address)
        callback = conn.subscriptions.get(char_uuid) if conn else None
        if callback is not None:
            callback(data)
        return callback is not None

    async def scan(self, timeout: float) -> list[Advertisement]:
        """Every fake device.

        Raises:
            BleError: An injected fault.
        """
        await self._fault("scan", None)
        return [_fake_advertisement(d) for d in self.devices.values()]

    async def find(self, spec: DeviceFilter, timeout: float) -> Advertisement | None:
        """The first fake device matching `spec`.

        Raises:
            BleError: An injected fault.
        """
        await self._fault("find", spec.address)
        ads = [_fake_advertisement(d) for d in self.devices.values()]
        return next((a for a in ads if matches(spec, a)), None)

    async def connect(
        self, address: str, timeout: float, on_disconnect: Callable[[], None]
    ) -> FakeConnection:
        """A new fake connection.

        Raises:
            BleError: An injected fault, or no such device.
        """
        await self._fault("connect", address)
        if address not in self.devices:
            raise BleError(address, BleErrorReason.NOT_FOUND)
        conn = FakeConnection(self.devices[address], on_disconnect)
        self.connections.append(conn)
        return conn

    async def _fault(self, operation: str, address: str | None) -> None:
        self.calls[operation] += 1
        queue = self._faults[operation]
        if not queue:
            return
        fault = queue.popleft()
        if fault is HANG:
            await asyncio.Event().wait()
        if isinstance(fault, BleError):
            raise fault
        if isinstance(fault, BaseException):
            raise translate(fault, address) from fault


def _fake_advertisement(device: FakeDevice) -> Advertisement:
    return Advertisement(device.address, device.name, device.rssi, device.service_uuids)
