"""IEEE 11073 SFLOAT and FLOAT: vectors, reserved values, properties, doctests."""

from __future__ import annotations

import doctest
import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.readings import Quality
from sensors.ble import blood_pressure, glucose, ieee11073, registry, thermometer
from sensors.ble.ieee11073 import (
    Medfloat,
    Special,
    decode_float,
    decode_sfloat,
    encode_float,
    encode_sfloat,
    read_float,
    read_sfloat,
)
from sensors.errors import DecodeError

SFLOAT_SPECIALS = {
    0x07FF: Special.NAN,
    0x0800: Special.NRES,
    0x07FE: Special.PLUS_INF,
    0x0802: Special.MINUS_INF,
    0x0801: Special.RESERVED,
}
FLOAT_SPECIALS = {
    0x007FFFFF: Special.NAN,
    0x00800000: Special.NRES,
    0x007FFFFE: Special.PLUS_INF,
    0x00800002: Special.MINUS_INF,
    0x00800001: Special.RESERVED,
}


@pytest.mark.parametrize(
    "module", [ieee11073, thermometer, blood_pressure, glucose, registry]
)
def test_doctests(module: object) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0
    assert result.attempted > 0


# synthetic, from the spec layout (IEEE 11073-20601 annex F: exponent high nibble)
@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (0x0000, 0.0),
        (0x0062, 98.0),  # SpO2 98 %
        (0xF16D, 36.5),  # 365e-1
        (0xE4D2, 12.34),  # 1234e-2
        (0x0FFF, -1.0),  # mantissa -1
        (0x2FFF, -100.0),  # -1e2
        (0x7001, 1e7),  # largest exponent
        (0x8001, 1e-8),  # smallest exponent
        (0x07FD, 2045.0),  # largest mantissa that is a number
        (0x0803, -2045.0),  # smallest mantissa that is a number
    ],
)
def test_sfloat_vectors(raw: int, value: float) -> None:
    assert decode_sfloat(raw) == Medfloat(value)
    assert read_sfloat(raw.to_bytes(2, "little"), 0, "t") == Medfloat(value)


# synthetic, from the spec layout (IEEE 11073-20601 annex F: exponent high byte)
@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (0x00000000, 0.0),
        (0xFF00016D, 36.5),
        (0xFE000E6C, 36.92),
        (0x00FFFFFF, -1.0),
        (0x0200000A, 1000.0),
        (0x007FFFFD, 8388605.0),
        (0x00800003, -8388605.0),
    ],
)
def test_float_vectors(raw: int, value: float) -> None:
    assert decode_float(raw) == Medfloat(value)
    assert read_float(raw.to_bytes(4, "little"), 0, "t") == Medfloat(value)


@pytest.mark.parametrize(("mantissa", "special"), SFLOAT_SPECIALS.items())
@pytest.mark.parametrize("exponent", range(16))
def test_sfloat_specials_are_never_numbers_whatever_the_exponent(
    mantissa: int, special: Special, exponent: int
) -> None:
    decoded = decode_sfloat(exponent << 12 | mantissa)
    assert decoded == Medfloat(None, special)
    assert not decoded.is_number
    assert decoded.as_json() == special.value


@pytest.mark.parametrize(("mantissa", "special"), FLOAT_SPECIALS.items())
@pytest.mark.parametrize("exponent", [0, 1, 0x7F, 0x80, 0xFF])
def test_float_specials_are_never_numbers(
    mantissa: int, special: Special, exponent: int
) -> None:
    assert decode_float(exponent << 24 | mantissa) == Medfloat(None, special)


def test_special_names_print_as_the_profiles_name_them() -> None:
    names = [s.value for s in Special]
    assert names == ["NaN", "NRes", "+INF", "-INF", "reserved"]


def test_every_16_bit_pattern_is_a_finite_number_or_a_special() -> None:
    specials = 0
    for raw in range(1 << 16):
        decoded = decode_sfloat(raw)
        if decoded.special is None:
            assert decoded.value is not None and math.isfinite(decoded.value)
        else:
            assert decoded.value is None
            specials += 1
    assert specials == 5 * 16


@given(st.integers(0, (1 << 32) - 1))
def test_every_32_bit_pattern_is_a_finite_number_or_a_special(raw: int) -> None:
    decoded = decode_float(raw)
    assert (decoded.value is None) != (decoded.special is None)
    if decoded.value is not None:
        assert math.isfinite(decoded.value)


@given(st.integers(-2045, 2045), st.integers(-8, 7))
def test_sfloat_round_trips_representable_values(mantissa: int, exponent: int) -> None:
    exact = float(Decimal(mantissa).scaleb(exponent))
    decoded = read_sfloat(encode_sfloat(exact, exponent), 0, "t")
    assert decoded == Medfloat(exact)


@given(st.integers(-8388605, 8388605), st.integers(-128, 127))
def test_float_round_trips_representable_values(mantissa: int, exponent: int) -> None:
    exact = float(Decimal(mantissa).scaleb(exponent))
    decoded = read_float(encode_float(exact, exponent), 0, "t")
    assert decoded == Medfloat(exact)


@pytest.mark.parametrize("special", list(Special))
def test_specials_round_trip(special: Special) -> None:
    assert read_sfloat(encode_sfloat(special), 0, "t").special is special
    assert read_float(encode_float(special), 0, "t").special is special


@pytest.mark.parametrize(
    ("value", "exponent"), [(2046, 0), (2047, 0), (-2046, 0), (99999, 0), (1.0, 8)]
)
def test_encode_refuses_what_does_not_fit(value: float, exponent: int) -> None:
    with pytest.raises(ValueError, match="fit"):
        encode_sfloat(value, exponent)


def test_reading_value_turns_a_special_into_nan_flagged_sensor_nan() -> None:
    value, quality = decode_sfloat(0x07FF).reading_value()
    assert math.isnan(value)
    assert quality is Quality.SENSOR_NAN
    assert Medfloat(98.0).reading_value() == (98.0, Quality.OK)


def test_unit_change_keeps_specials_special() -> None:
    assert decode_sfloat(0x0800).map(7.5).special is Special.NRES
    assert Medfloat(2.0).map(7.5) == Medfloat(15.0)


@pytest.mark.parametrize("data", [b"", b"\x01"])
def test_short_field_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="too short"):
        read_sfloat(data, 0, "2a5f")
    with pytest.raises(DecodeError):
        read_float(data + b"\x00\x00", 0, "2a1c")
