"""BLE wearables: GATT characteristic decoders (pure functions) and the bleak link."""

from sensors.ble.hrm import HeartRateMeasurement, decode_heart_rate_measurement

__all__ = ["HeartRateMeasurement", "decode_heart_rate_measurement"]
