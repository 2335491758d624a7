"""BLE wearables: GATT characteristic decoders (pure functions) and the bleak link."""

from sensors.ble.hrm import (
    HeartRateMeasurement,
    decode_heart_rate_measurement,
    hrm_readings,
)
from sensors.ble.ieee11073 import Medfloat, Special, decode_float, decode_sfloat
from sensors.ble.registry import Measurement, decode, to_readings
from sensors.ble.vendors import VendorDecoder, register_vendor

__all__ = [
    "HeartRateMeasurement",
    "Measurement",
    "Medfloat",
    "Special",
    "VendorDecoder",
    "decode",
    "decode_float",
    "decode_heart_rate_measurement",
    "decode_sfloat",
    "hrm_readings",
    "register_vendor",
    "to_readings",
]
