"""Virtual wearables on the `VirtualRadio`: a heart-rate strap and a pulse oximeter.

Each is a bumble `Device` with a real GATT server, advertising its name and primary
service, so the gateway finds, connects and subscribes exactly as it would to
hardware. Tests and `iomt-gateway demo --ble` drive them: send a payload, go quiet,
drop the link and come back, or send the awkward cases (contact lost, HR 0, HR as
uint16, 180 bpm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from bumble import core, gatt
from bumble.device import Device

from sensors.ble.hrm import encode_heart_rate_measurement
from sensors.ble.ieee11073 import encode_sfloat
from sensors.ble.virtual.backend import VirtualRadio, make_device

log = logging.getLogger(__name__)

_Props = gatt.Characteristic.Properties
_HR_UINT16 = 0x01
_CONTACT_SUPPORTED_DETECTED = 0x06


def _uuid(short: int) -> core.UUID:
    return core.UUID.from_16_bits(short)


def _advertising_data(name: str, service: int) -> bytes:
    return bytes(
        core.AdvertisingData(
            [
                (core.AdvertisingData.COMPLETE_LOCAL_NAME, name.encode()),
                (
                    core.AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
                    struct.pack("<H", service),
                ),
            ]
        )
    )


class VirtualPeripheral:
    """Common part: a bumble device that advertises one service and can drop out.

    Args:
        radio: The virtual air it lives on.
        address: Its Bluetooth address, e.g. "F1:00:00:00:00:01".
        name: The local name it advertises.
        service: The 16-bit service UUID it advertises.
    """

    def __init__(
        self, radio: VirtualRadio, address: str, name: str, service: int
    ) -> None:
        self.address = address
        self.name = name
        self.device: Device = make_device(radio.link, name, address)
        self._advertising = _advertising_data(name, service)
        self._stream: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Power on and advertise (again after every disconnect)."""
        await self.device.power_on()
        await self._advertise()

    async def stop(self) -> None:
        """Stop streaming, advertising and every connection."""
        await self.go_quiet()
        await self.device.stop_advertising()
        await self._disconnect_all()

    @property
    def connected(self) -> bool:
        """Whether a central is connected."""
        return bool(self.device.connections)

    async def drop_link(self, come_back_after_s: float = 0.0) -> None:
        """Disconnect every central; advertise again after `come_back_after_s`."""
        await self.device.stop_advertising()
        await self._disconnect_all()
        await asyncio.sleep(come_back_after_s)
        await self._advertise()

    async def go_quiet(self) -> None:
        """Stop the periodic stream; the connection stays up."""
        if self._stream is not None:
            self._stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream
            self._stream = None

    async def _advertise(self) -> None:
        await self.device.start_advertising(
            advertising_data=self._advertising,
            auto_restart=True,
            advertising_interval_min=20,
            advertising_interval_max=20,
        )

    async def _disconnect_all(self) -> None:
        for connection in list(self.device.connections.values()):
            with contextlib.suppress(core.BaseBumbleError):
                await connection.disconnect()


class VirtualHeartRateStrap(VirtualPeripheral):
    """A chest strap: Heart Rate (0x180D) and Battery (0x180F) services.

    0x2A37 Heart Rate Measurement (notify), 0x2A38 Body Sensor Location (read,
    "chest"), 0x2A19 Battery Level (read, notify).
    """

    def __init__(
        self,
        radio: VirtualRadio,
        address: str = "F1:00:00:00:00:01",
        name: str = "HRM-Virtual",
        battery: int = 87,
    ) -> None:
        super().__init__(radio, address, name, 0x180D)
        self.measurement = gatt.Characteristic(
            _uuid(0x2A37), _Props.NOTIFY, gatt.Characteristic.READABLE, b""
        )
        location = gatt.Characteristic(
            _uuid(0x2A38), _Props.READ, gatt.Characteristic.READABLE, bytes([1])
        )
        self.battery = gatt.Characteristic(
            _uuid(0x2A19),
            _Props.READ | _Props.NOTIFY,
            gatt.Characteristic.READABLE,
            bytes([battery]),
        )
        self.device.add_service(
            gatt.Service(_uuid(0x180D), [self.measurement, location])
        )
        self.device.add_service(gatt.Service(_uuid(0x180F), [self.battery]))

    async def send(self, payload: bytes) -> None:
        """Notify one raw 0x2A37 payload to every subscriber."""
        await self.device.notify_subscribers(self.measurement, payload)

    async def send_heart_rate(self, bpm: int, rr_raw: tuple[int, ...] = ()) -> None:
        """Notify HR (uint8 up to 255) with RR intervals in 1/1024 s, contact on."""
        await self.send(encode_heart_rate_measurement(bpm, rr_raw, contact=True))

    async def send_uint16_heart_rate(self, bpm: int) -> None:
        """Notify HR in the uint16 format, as some straps always do."""
        flags = _HR_UINT16 | _CONTACT_SUPPORTED_DETECTED
        await self.send(bytes([flags]) + struct.pack("<H", bpm))

    async def send_tachycardia(self) -> None:
        """Notify 180 bpm."""
        await self.send_heart_rate(180)

    async def send_contact_lost(self, bpm: int = 0) -> None:
        """Notify a measurement with contact supported but not detected."""
        await self.send(encode_heart_rate_measurement(bpm, contact=False))

    async def send_no_reading(self) -> None:
        """Notify HR 0 with contact detected (sensor has no measurement)."""
        await self.send_heart_rate(0)

    async def set_battery(self, level: int) -> None:
        """Change the battery level and notify subscribers."""
        self.battery.value = bytes([level])
        await self.device.notify_subscribers(self.battery, bytes([level]))

    def stream(
        self, bpm: int, rr_raw: tuple[int, ...] = (), every_s: float = 0.2
    ) -> None:
        """Notify the same measurement every `every_s` until `go_quiet()`."""
        payload = encode_heart_rate_measurement(bpm, rr_raw, contact=True)
        self._stream = asyncio.create_task(
            self._repeat(every_s, payload), name=f"virtual-hrm-{self.address}"
        )

    async def _repeat(self, every_s: float, payload: bytes) -> None:
        while True:
            await self.send(payload)
            await asyncio.sleep(every_s)


class VirtualPulseOximeter(VirtualPeripheral):
    """A pulse oximeter: PLX service (0x1822), 0x2A5F continuous measurement."""

    def __init__(
        self,
        radio: VirtualRadio,
        address: str = "F2:00:00:00:00:01",
        name: str = "PLX-Virtual",
    ) -> None:
        super().__init__(radio, address, name, 0x1822)
        self.continuous = gatt.Characteristic(
            _uuid(0x2A5F), _Props.NOTIFY, gatt.Characteristic.READABLE, b""
        )
        # PLX Features (0x2A60) is mandatory in the PLX service: no optional fields.
        features = gatt.Characteristic(
            _uuid(0x2A60), _Props.READ, gatt.Characteristic.READABLE, b"\x00\x00"
        )
        self.device.add_service(
            gatt.Service(_uuid(0x1822), [self.continuous, features])
        )

    async def send(self, payload: bytes) -> None:
        """Notify one raw 0x2A5F payload to every subscriber."""
        await self.device.notify_subscribers(self.continuous, payload)

    async def send_measurement(self, spo2: float, pulse_rate: float) -> None:
        """Notify SpO2 (%) and pulse rate (bpm), no optional fields (PLX 3.2)."""
        await self.send(continuous_payload(spo2, pulse_rate))


def continuous_payload(spo2: float, pulse_rate: float) -> bytes:
    """A 0x2A5F payload: flags 0, SpO2PR-Normal as two SFLOATs."""
    return b"\x00" + encode_sfloat(spo2) + encode_sfloat(pulse_rate)
