"""Virtual BLE for tests and the demo: a bleak backend over bumble, and wearables.

Nothing here runs on a real gateway; see `backend` for what is simulated.
"""

from sensors.ble.virtual.backend import VirtualRadio
from sensors.ble.virtual.peripherals import (
    VirtualHeartRateStrap,
    VirtualPeripheral,
    VirtualPulseOximeter,
)

__all__ = [
    "VirtualHeartRateStrap",
    "VirtualPeripheral",
    "VirtualPulseOximeter",
    "VirtualRadio",
]
