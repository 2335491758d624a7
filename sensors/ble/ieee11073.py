"""IEEE 11073-20601 SFLOAT and FLOAT, as the Bluetooth SIG health profiles use them.

Both are little-endian decimal floats: value = mantissa * 10 ** exponent.

======  ======  ===========================  ===========================
type    bytes   exponent                     mantissa
======  ======  ===========================  ===========================
SFLOAT  2       bits 12-15, 4-bit signed     bits 0-11, 12-bit signed
FLOAT   4       bits 24-31, 8-bit signed     bits 0-23, 24-bit signed
======  ======  ===========================  ===========================

Five mantissas are not numbers (IEEE 11073-20601 annex F, FLOAT-Type and
SFLOAT-Type; GATT Specification Supplement, data types medfloat32 and medfloat16):

========  ==========  ==========
meaning   SFLOAT      FLOAT
========  ==========  ==========
NaN       0x07FF      0x007FFFFF
NRes      0x0800      0x00800000
+INF      0x07FE      0x007FFFFE
-INF      0x0802      0x00800002
reserved  0x0801      0x00800001
========  ==========  ==========

The standard sends them with exponent 0; they are matched on the mantissa alone, so
that no exponent can turn "not a number" into one (a tool showing SpO2 2047 % is
the failure this prevents). A decoded value is a `Medfloat`: either a finite float
or a `Special`, never a float NaN or infinity.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from gateway.readings import Quality
from sensors.errors import DecodeError


class Special(enum.Enum):
    """The IEEE 11073 values that are not numbers; `value` is how they print."""

    NAN = "NaN"
    NRES = "NRes"
    PLUS_INF = "+INF"
    MINUS_INF = "-INF"
    RESERVED = "reserved"


@dataclass(frozen=True, slots=True)
class _Layout:
    mantissa_bits: int
    exponent_bits: int
    specials: dict[int, Special]

    @property
    def size(self) -> int:
        return (self.mantissa_bits + self.exponent_bits) // 8


_SFLOAT = _Layout(
    12,
    4,
    {
        0x07FF: Special.NAN,
        0x0800: Special.NRES,
        0x07FE: Special.PLUS_INF,
        0x0802: Special.MINUS_INF,
        0x0801: Special.RESERVED,
    },
)
_FLOAT = _Layout(
    24,
    8,
    {
        0x007FFFFF: Special.NAN,
        0x00800000: Special.NRES,
        0x007FFFFE: Special.PLUS_INF,
        0x00800002: Special.MINUS_INF,
        0x00800001: Special.RESERVED,
    },
)


@dataclass(frozen=True, slots=True)
class Medfloat:
    """A decoded SFLOAT or FLOAT: exactly one of `value` and `special` is set.

    Attributes:
        value: The finite number, or None when the device sent a special value.
        special: The special value, or None when the device sent a number.
    """

    value: float | None
    special: Special | None = None

    @property
    def is_number(self) -> bool:
        """True when the device sent a number."""
        return self.special is None

    def as_json(self) -> float | str:
        """The number, or the special value's name ("NaN", "NRes", "+INF", ...)."""
        if self.special is not None:
            return self.special.value
        assert self.value is not None
        return self.value

    def map(self, convert: float) -> Medfloat:
        """This value times `convert` (a unit change); specials stay as they are."""
        if self.value is None:
            return self
        return Medfloat(self.value * convert)

    def reading_value(self) -> tuple[float, Quality]:
        """The value for a `Reading`: a special becomes NaN flagged SENSOR_NAN.

        >>> Medfloat(97.0).reading_value()
        (97.0, <Quality.OK: 0>)
        >>> decode_sfloat(0x07FF).reading_value()
        (nan, <Quality.SENSOR_NAN: 2>)
        """
        if self.value is None:
            return math.nan, Quality.SENSOR_NAN
        return self.value, Quality.OK


def decode_sfloat(raw: int) -> Medfloat:
    """Decode a 16-bit SFLOAT given as an unsigned integer.

    >>> decode_sfloat(0x0062)  # mantissa 98, exponent 0
    Medfloat(value=98.0, special=None)
    >>> decode_sfloat(0xF16D)  # mantissa 365, exponent -1
    Medfloat(value=36.5, special=None)
    >>> decode_sfloat(0x2FFF)  # mantissa -1, exponent 2
    Medfloat(value=-100.0, special=None)
    >>> decode_sfloat(0x07FF).special
    <Special.NAN: 'NaN'>
    >>> decode_sfloat(0x0800).special
    <Special.NRES: 'NRes'>

    Raises:
        ValueError: `raw` does not fit in 16 bits (a programming error).
    """
    return _decode(raw, _SFLOAT)


def decode_float(raw: int) -> Medfloat:
    """Decode a 32-bit FLOAT given as an unsigned integer.

    >>> decode_float(0xFF00016D)  # mantissa 365, exponent -1
    Medfloat(value=36.5, special=None)
    >>> decode_float(0xFE000E6C)  # mantissa 3692, exponent -2
    Medfloat(value=36.92, special=None)
    >>> decode_float(0x00FFFFFF)  # mantissa -1, exponent 0
    Medfloat(value=-1.0, special=None)
    >>> decode_float(0x007FFFFE).special
    <Special.PLUS_INF: '+INF'>

    Raises:
        ValueError: `raw` does not fit in 32 bits (a programming error).
    """
    return _decode(raw, _FLOAT)


def read_sfloat(data: bytes, offset: int, source: str) -> Medfloat:
    """Decode the little-endian SFLOAT at `data[offset:offset + 2]`.

    Raises:
        DecodeError: Fewer than two bytes are left at `offset`.
    """
    return _decode(_read(data, offset, _SFLOAT.size, source), _SFLOAT)


def read_float(data: bytes, offset: int, source: str) -> Medfloat:
    """Decode the little-endian FLOAT at `data[offset:offset + 4]`.

    Raises:
        DecodeError: Fewer than four bytes are left at `offset`.
    """
    return _decode(_read(data, offset, _FLOAT.size, source), _FLOAT)


def encode_sfloat(value: float | Special, exponent: int = 0) -> bytes:
    """Encode an SFLOAT: `value` is rounded to a multiple of 10 ** `exponent`.

    >>> encode_sfloat(36.5, -1).hex()
    '6df1'
    >>> encode_sfloat(Special.NAN).hex()
    'ff07'

    Raises:
        ValueError: The value does not fit the 12-bit mantissa at that exponent,
            or the exponent does not fit in 4 bits.
    """
    return _encode(value, exponent, _SFLOAT)


def encode_float(value: float | Special, exponent: int = 0) -> bytes:
    """Encode a FLOAT: `value` is rounded to a multiple of 10 ** `exponent`.

    >>> encode_float(36.5, -1).hex()
    '6d0100ff'

    Raises:
        ValueError: The value does not fit the 24-bit mantissa at that exponent,
            or the exponent does not fit in 8 bits.
    """
    return _encode(value, exponent, _FLOAT)


def _read(data: bytes, offset: int, size: int, source: str) -> int:
    if len(data) < offset + size:
        raise DecodeError(source, f"{len(data)} bytes, too short for a field")
    return int.from_bytes(data[offset : offset + size], "little")


def _decode(raw: int, layout: _Layout) -> Medfloat:
    if not 0 <= raw < 1 << (8 * layout.size):
        raise ValueError(f"{raw:#x} does not fit in {layout.size} bytes")
    mask = (1 << layout.mantissa_bits) - 1
    raw_mantissa = raw & mask
    special = layout.specials.get(raw_mantissa)
    if special is not None:
        return Medfloat(None, special)
    mantissa = _signed(raw_mantissa, layout.mantissa_bits)
    exponent = _signed(raw >> layout.mantissa_bits, layout.exponent_bits)
    # Integer arithmetic, then one correctly rounded division: 365 * 10**-1 in
    # floats is 36.5000...01, 365 / 10 is the nearest float to 36.5.
    if exponent >= 0:
        return Medfloat(float(mantissa * 10**exponent))
    return Medfloat(mantissa / 10**-exponent)


def _encode(value: float | Special, exponent: int, layout: _Layout) -> bytes:
    exp_limit = 1 << (layout.exponent_bits - 1)
    if not -exp_limit <= exponent < exp_limit:
        raise ValueError(f"exponent {exponent} does not fit")
    if isinstance(value, Special):
        codes = {special: code for code, special in layout.specials.items()}
        return codes[value].to_bytes(layout.size, "little")

    scaled = value * 10**-exponent if exponent < 0 else value / 10**exponent
    mantissa = round(scaled)
    raw_mantissa = mantissa % (1 << layout.mantissa_bits)
    limit = 1 << (layout.mantissa_bits - 1)
    if not -limit <= mantissa < limit or raw_mantissa in layout.specials:
        raise ValueError(f"{value} does not fit at exponent {exponent}")
    raw = (exponent % (1 << layout.exponent_bits)) << layout.mantissa_bits
    return (raw | raw_mantissa).to_bytes(layout.size, "little")


def _signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw & (1 << (bits - 1)) else raw
