"""`iomt-gateway scan`: what is advertising nearby, to pick a wearable to pair."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.errors import ExitCode
from sensors.ble.bleak_central import Advertisement, BleakCentral

# Services a clinical engineer will look for, by their 16-bit SIG UUIDs.
SERVICE_NAMES = {
    "180d": "heart rate",
    "180f": "battery",
    "1822": "pulse oximeter",
    "1809": "thermometer",
    "1810": "blood pressure",
    "1808": "glucose",
}


async def scan(*, timeout: float, virtual: bool = False) -> int:
    """Scan for `timeout` seconds and print one line per device.

    Raises:
        BleError: No Bluetooth adapter or BlueZ (the message says what to check).
    """
    async with _central(virtual) as central:
        found = await central.scan(timeout)
    if not found:
        print(f"nothing advertising within {timeout:g} s")
    for adv in sorted(found, key=lambda a: -(a.rssi or -999)):
        print(describe(adv))
    return ExitCode.OK


def describe(adv: Advertisement) -> str:
    """One device: address, RSSI, name, services (medical ones by name)."""
    services = ", ".join(SERVICE_NAMES.get(u, u) for u in adv.service_uuids) or "-"
    rssi = f"{adv.rssi} dBm" if adv.rssi is not None else "? dBm"
    return f"{adv.address}  {rssi:>8}  {adv.name or '(no name)':<20}  {services}"


@contextlib.asynccontextmanager
async def _central(virtual: bool) -> AsyncIterator[BleakCentral]:
    if not virtual:
        yield BleakCentral()
        return
    from sensors.ble.virtual import VirtualHeartRateStrap, VirtualRadio

    radio = VirtualRadio()
    await radio.start()
    strap = VirtualHeartRateStrap(radio, name="HRM-Virtual")
    await strap.start()
    try:
        yield BleakCentral(backend=radio.backends())
    finally:
        await strap.stop()
