"""A bleak backend over bumble: the gateway's bleak code talks to virtual wearables.

Test and demo use only. There is no Bluetooth radio on the build machines, so
`VirtualRadio` puts bumble controllers on one in-process `LocalLink`: one bumble
`Device` acts as the gateway's central, and each virtual peripheral
(`sensors.ble.virtual.peripherals`) brings its own `Device`. `VirtualRadio.backends()`
returns the `BaseBleakClient` / `BaseBleakScanner` pair to hand to
`BleakClient(..., backend=...)` and `BleakScanner(backend=...)`; bleak itself, its
UUID handling and its callback wrapping run unchanged.

Implemented: scanning (name, 16-bit service UUIDs, RSSI), connect, service and
characteristic discovery, read, notify, disconnect and the disconnected callback.
Not implemented (raise `NotImplementedError`): pairing, writes, descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError
from bleak.uuids import normalize_uuid_str
from bumble import core, hci
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy, ServiceProxy
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

log = logging.getLogger(__name__)

CENTRAL_ADDRESS = "F0:00:00:00:00:01"
_DEFAULT_MTU = 23

AdvertisementListener = Callable[[Advertisement], None]


def make_device(link: LocalLink, name: str, address: str) -> Device:
    """A bumble device with its own controller on `link`."""
    controller = Controller(name, link=link, public_address=address)
    host = Host(controller, AsyncPipeSink(controller))
    return Device(name=name, address=hci.Address(address), host=host)


class VirtualRadio:
    """The in-process air: a bumble `LocalLink` and the gateway's central device.

    Call `start()` on the running event loop before using the backends.
    """

    def __init__(self) -> None:
        self.link = LocalLink()
        self.central = make_device(self.link, "gateway", CENTRAL_ADDRESS)
        self._listeners: list[AdvertisementListener] = []
        # bumble allows one pending LE connection at a time (BlueZ says
        # "InProgress" in the same situation); the virtual central queues them.
        self._connect_lock = asyncio.Lock()
        self.central.on(self.central.EVENT_ADVERTISEMENT, self._on_advertisement)

    async def start(self) -> None:
        """Power on the central's controller."""
        await self.central.power_on()

    def backends(self) -> tuple[type[BaseBleakClient], type[BaseBleakScanner]]:
        """The bleak backend classes bound to this radio: (client, scanner)."""
        client = type("VirtualBleakClient", (VirtualBleakClient,), {"radio": self})
        scanner = type("VirtualBleakScanner", (VirtualBleakScanner,), {"radio": self})
        return client, scanner

    async def add_listener(self, listener: AdvertisementListener) -> None:
        """Start passing advertisements to `listener` (scanning while any listen)."""
        self._listeners.append(listener)
        if not self.central.is_scanning:
            await self.central.start_scanning(filter_duplicates=False)

    async def remove_listener(self, listener: AdvertisementListener) -> None:
        """Stop passing advertisements to `listener`."""
        self._listeners.remove(listener)
        if not self._listeners and self.central.is_scanning:
            await self.central.stop_scanning()

    async def connect(self, address: str, timeout: float) -> Connection:
        """Open an LE connection from the central to `address`.

        Raises:
            BleakDeviceNotFoundError: Nothing at that address answered in time.
        """
        async with self._connect_lock:
            try:
                return await self.central.connect(hci.Address(address), timeout=timeout)
            except core.TimeoutError as exc:
                raise BleakDeviceNotFoundError(address, "no answer") from exc

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        for listener in list(self._listeners):
            listener(advertisement)


def _uuid_str(uuid: core.UUID) -> str:
    return normalize_uuid_str(uuid.to_hex_str())


class VirtualBleakScanner(BaseBleakScanner):
    """bleak scanner backend fed by the virtual radio's advertisements."""

    radio: VirtualRadio

    def __init__(
        self,
        detection_callback: Any,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        # Filters come as given ("180d"); advertisements carry full 128-bit UUIDs.
        wanted = (
            None
            if service_uuids is None
            else list(map(normalize_uuid_str, service_uuids))
        )
        super().__init__(detection_callback, wanted)

    async def start(self) -> None:
        """Start scanning on the virtual radio."""
        self.seen_devices = {}
        await self.radio.add_listener(self._on_advertisement)

    async def stop(self) -> None:
        """Stop scanning."""
        await self.radio.remove_listener(self._on_advertisement)

    def _on_advertisement(self, adv: Advertisement) -> None:
        data = adv.data
        name = data.get(core.AdvertisingData.COMPLETE_LOCAL_NAME)
        uuids = data.get(
            core.AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS
        )
        service_uuids = [_uuid_str(u) for u in uuids or []]
        if not self.is_allowed_uuid(service_uuids):
            return
        address = str(adv.address).removesuffix("/P")
        advertisement = AdvertisementData(
            local_name=name,
            manufacturer_data={},
            service_data={},
            service_uuids=service_uuids,
            tx_power=None,
            rssi=adv.rssi,
            platform_data=(adv,),
        )
        device = self.create_or_update_device(
            address, address, name, adv, advertisement
        )
        self.call_detection_callbacks(device, advertisement)


class VirtualBleakClient(BaseBleakClient):
    """bleak client backend: one bumble LE connection from the radio's central."""

    radio: VirtualRadio

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None,
        timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=disconnected_callback,
            timeout=timeout,
        )
        self._connection: Connection | None = None
        self._peer: Peer | None = None

    @property
    def name(self) -> str:
        """The peer's address (bumble does not read the GAP name here)."""
        return self.address

    @property
    def mtu_size(self) -> int:
        """The ATT MTU of the connection."""
        return self._connection.att_mtu if self._connection else _DEFAULT_MTU

    @property
    def is_connected(self) -> bool:
        """Whether the LE connection is up."""
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        """Connect and discover services and characteristics.

        Raises:
            BleakDeviceNotFoundError: The peripheral did not answer in time.
        """
        connection = await self.radio.connect(self.address, self._timeout)
        self._connection = connection
        connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
        self._peer = Peer(connection)
        self.services = await self._discover(self._peer)

    async def disconnect(self) -> None:
        """Disconnect (no-op when already disconnected)."""
        if self._connection is not None:
            await self._connection.disconnect()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Not supported by the virtual backend."""
        raise NotImplementedError("pairing is not simulated")

    async def unpair(self) -> None:
        """Not supported by the virtual backend."""
        raise NotImplementedError("pairing is not simulated")

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, **kwargs: Any
    ) -> bytearray:
        """Read a characteristic's value from the peripheral."""
        proxy: CharacteristicProxy[bytes] = characteristic.obj
        return bytearray(await self._require_peer().read_value(proxy))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, **kwargs: Any
    ) -> bytearray:
        """Not supported by the virtual backend."""
        raise NotImplementedError("descriptors are not simulated")

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        """Not supported by the virtual backend."""
        raise NotImplementedError("writes are not simulated")

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: Any
    ) -> None:
        """Not supported by the virtual backend."""
        raise NotImplementedError("descriptors are not simulated")

    async def start_notify(
        self,
        characteristic: BleakGATTCharacteristic,
        callback: NotifyCallback,
        **kwargs: Any,
    ) -> None:
        """Subscribe (writes the CCCD on the peripheral) and forward values."""
        proxy: CharacteristicProxy[bytes] = characteristic.obj
        await self._require_peer().subscribe(
            proxy, lambda value: callback(bytearray(value))
        )

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        """Unsubscribe from a characteristic."""
        await self._require_peer().unsubscribe(characteristic.obj)

    def _require_peer(self) -> Peer:
        if self._peer is None:
            raise BleakError("Not connected")
        return self._peer

    def _on_disconnection(self, reason: int) -> None:
        self._connection = None
        self._peer = None
        # Called for every disconnect, ours included, as the BlueZ backend does.
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    @staticmethod
    async def _discover(peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        for service in await peer.discover_services():
            await service.discover_characteristics()
            collection.add_service(_service(service))
            bleak_service = collection.get_service(service.handle)
            for char in service.characteristics:
                collection.add_characteristic(_characteristic(char, bleak_service))
        return collection


def _service(proxy: ServiceProxy) -> BleakGATTService:
    return BleakGATTService(proxy, proxy.handle, _uuid_str(proxy.uuid))


def _characteristic(
    proxy: CharacteristicProxy[bytes], service: BleakGATTService | None
) -> BleakGATTCharacteristic:
    names = [
        flag.name.lower().replace("_", "-")
        for flag in type(proxy.properties)
        if flag in proxy.properties and flag.name
    ]
    return BleakGATTCharacteristic(
        proxy,
        proxy.handle,
        _uuid_str(proxy.uuid),
        names,  # type: ignore[arg-type]
        lambda: _DEFAULT_MTU - 3,
        service,  # type: ignore[arg-type]
    )
