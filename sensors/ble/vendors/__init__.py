"""Vendor decoders, pluggable per device model.

Many consumer devices send their numbers on a proprietary characteristic instead
of a SIG profile. Each model's decoder is registered here under its model name
(`"contec-cms50d-bt"`); `register_vendor` adds one at runtime, for a model whose
decoder lives outside this package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.readings import Reading
from sensors.ble.basic import ReadingStamp
from sensors.ble.vendors import contec

log = logging.getLogger(__name__)

DecodeFn = Callable[[bytes], Any]
ReadingsFn = Callable[..., list[Reading]]
"""Called as `readings(measurement, stamp, use_device_time=...)`."""


@dataclass(frozen=True, slots=True)
class VendorDecoder:
    """How to decode one device model's frames and turn them into readings.

    Attributes:
        model: The model name configs use, lower case.
        characteristic: The 128-bit UUID the frames arrive on, lower case.
        decode: bytes -> measurement; raises `DecodeError` for malformed input.
        readings: measurement, `ReadingStamp`, use_device_time -> readings.
        measurement_types: The types `decode` returns, so a measurement finds its
            way back to `readings`.
    """

    model: str
    characteristic: str
    decode: DecodeFn
    readings: ReadingsFn
    measurement_types: tuple[type, ...]

    def to_readings(
        self, measurement: object, stamp: ReadingStamp, *, use_device_time: bool
    ) -> list[Reading]:
        """The readings for one of this model's measurements."""
        return self.readings(measurement, stamp, use_device_time=use_device_time)


_VENDORS: dict[str, VendorDecoder] = {}


def register_vendor(decoder: VendorDecoder, *, replace: bool = False) -> None:
    """Make `decoder` available under its model name.

    Raises:
        ValueError: The model is already registered and `replace` is False.
    """
    model = decoder.model.lower()
    if model in _VENDORS and not replace:
        raise ValueError(f"vendor model {model!r} is already registered")
    _VENDORS[model] = decoder
    log.debug("vendor decoder registered: %s", model)


def unregister_vendor(model: str) -> None:
    """Remove a model's decoder; unknown models are ignored."""
    _VENDORS.pop(model.lower(), None)


def vendor_decoder(model: str) -> VendorDecoder | None:
    """The decoder registered for `model` (any case), or None."""
    return _VENDORS.get(model.lower())


def vendor_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_VENDORS)


def vendor_for(measurement: object) -> VendorDecoder | None:
    """The decoder whose `decode` produces measurements of this type, or None."""
    for decoder in _VENDORS.values():
        if isinstance(measurement, decoder.measurement_types):
            return decoder
    return None


register_vendor(
    VendorDecoder(
        model=contec.MODEL,
        characteristic=contec.CHARACTERISTIC,
        decode=contec.decode_frame,
        readings=contec.contec_readings,
        measurement_types=(contec.ContecVitals, contec.ContecWaveform),
    )
)
