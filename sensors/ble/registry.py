"""One entry point for every BLE decoder: characteristic or model in, readings out.

`decode` picks the decoder by characteristic UUID (16-bit "2a37" in any case, "0x2a37",
or the full 128-bit form on the Bluetooth base UUID), or by vendor model name
(`sensors.ble.vendors`). `to_readings` turns the measurement into `Reading`s in each
kind's canonical unit.

Device clocks can be wrong (no clock set since the batteries were changed, no time
zone in the SIG Date Time): a measurement keeps the device's own timestamp, but its
readings are stamped `at`, the gateway's receive time, unless the caller asks for
`use_device_time=True`. A timestamp the device does not know stays `at` either way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

from gateway.readings import Reading
from sensors.ble import basic, blood_pressure, glucose, hrm, plx, thermometer
from sensors.ble.basic import ReadingStamp
from sensors.ble.vendors import vendor_decoder, vendor_for, vendor_models
from sensors.errors import DecodeError

log = logging.getLogger(__name__)

_BASE_UUID = re.compile(r"^0000([0-9a-f]{4})-0000-1000-8000-00805f9b34fb$")
_SHORT_UUID = re.compile(r"^(?:0x)?([0-9a-f]{4})$")


class Measurement(Protocol):
    """What every decoder returns: a frozen record with a JSON view."""

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        ...


def _hrm(m: Any, stamp: ReadingStamp, *, use_device_time: bool) -> list[Reading]:
    del use_device_time  # 0x2A37 carries no time
    return hrm.hrm_readings(
        m, device_id=stamp.device_id, patient_ref=stamp.patient_ref, at=stamp.at
    )


def _none(m: Any, stamp: ReadingStamp, *, use_device_time: bool) -> list[Reading]:
    del m, stamp, use_device_time  # configuration, not a measurement of the patient
    return []


def _battery(m: Any, stamp: ReadingStamp, *, use_device_time: bool) -> list[Reading]:
    del use_device_time
    return basic.battery_readings(m, stamp)


# characteristic -> (decoder, measurement type, readings)
_SIG: dict[str, tuple[Callable[[bytes], Any], type, Callable[..., list[Reading]]]] = {
    hrm.UUID: (hrm.decode_heart_rate_measurement, hrm.HeartRateMeasurement, _hrm),
    basic.BODY_SENSOR_LOCATION_UUID: (
        basic.decode_body_sensor_location,
        basic.BodySensorLocation,
        _none,
    ),
    basic.BATTERY_LEVEL_UUID: (
        basic.decode_battery_level,
        basic.BatteryLevel,
        _battery,
    ),
    plx.SPOT_CHECK_UUID: (plx.decode_spot_check, plx.PlxSpotCheck, plx.plx_readings),
    plx.CONTINUOUS_UUID: (plx.decode_continuous, plx.PlxContinuous, plx.plx_readings),
    thermometer.UUID: (
        thermometer.decode_temperature_measurement,
        thermometer.TemperatureMeasurement,
        thermometer.temperature_readings,
    ),
    blood_pressure.UUID: (
        blood_pressure.decode_blood_pressure_measurement,
        blood_pressure.BloodPressureMeasurement,
        blood_pressure.blood_pressure_readings,
    ),
    glucose.UUID: (
        glucose.decode_glucose_measurement,
        glucose.GlucoseMeasurement,
        glucose.glucose_readings,
    ),
}
_READINGS_BY_TYPE = {kind: readings for _, kind, readings in _SIG.values()}


def characteristics() -> list[str]:
    """The SIG characteristics with a decoder, as 16-bit UUID strings."""
    return list(_SIG)


def models() -> list[str]:
    """The vendor models with a decoder (including ones registered at runtime)."""
    return vendor_models()


def short_uuid(characteristic: str) -> str:
    """The 16-bit form of a UUID on the Bluetooth base; other text, lower-cased.

    >>> short_uuid("00002A37-0000-1000-8000-00805F9B34FB")
    '2a37'
    >>> short_uuid("0x2A5F")
    '2a5f'
    """
    text = characteristic.strip().lower()
    match = _BASE_UUID.match(text) or _SHORT_UUID.match(text)
    return match.group(1) if match else text


MAX_ATTRIBUTE_BYTES = 512
"""Core Specification, Vol 3 Part F 3.2.9: no attribute value is longer."""


def decode(characteristic: str, data: bytes, *, model: str | None = None) -> Any:
    """Decode one characteristic value into its measurement record.

    Args:
        characteristic: A SIG characteristic UUID, a vendor characteristic UUID
            (with `model`), or a vendor model name.
        data: The value as notified or read.
        model: The device model, for vendor characteristics.

    Raises:
        DecodeError: The payload is malformed, or no decoder handles this
            characteristic (for this model).
    """
    key = short_uuid(characteristic)
    if len(data) > MAX_ATTRIBUTE_BYTES:
        raise DecodeError(key, f"longer than the {MAX_ATTRIBUTE_BYTES}-byte maximum")
    sig = _SIG.get(key)
    if sig is not None:
        return sig[0](bytes(data))
    vendor = vendor_decoder(model or key)
    if vendor is None:
        raise DecodeError(key, "no decoder for this characteristic")
    if model is not None and key not in (short_uuid(vendor.characteristic), model):
        raise DecodeError(key, f"not a {vendor.model} characteristic")
    return vendor.decode(bytes(data))


def to_readings(
    measurement: Measurement,
    *,
    device_id: str,
    patient_ref: str | None,
    at: float,
    use_device_time: bool = False,
) -> list[Reading]:
    """The readings one measurement yields, in each kind's canonical unit.

    Special IEEE-11073 values become NaN flagged SENSOR_NAN; sensor-off and
    no-value conditions flag CONTACT_LOST or NO_READING (see each module).
    Configuration-like values (Body Sensor Location, vendor waveform frames)
    yield no readings.

    Raises:
        TypeError: `measurement` did not come from a registered decoder.
    """
    stamp = ReadingStamp(device_id=device_id, patient_ref=patient_ref, at=at)
    readings = _READINGS_BY_TYPE.get(type(measurement))
    if readings is not None:
        return readings(measurement, stamp, use_device_time=use_device_time)
    vendor = vendor_for(measurement)
    if vendor is None:
        raise TypeError(f"no decoder produces {type(measurement).__name__}")
    return vendor.to_readings(measurement, stamp, use_device_time=use_device_time)
