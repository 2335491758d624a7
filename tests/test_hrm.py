"""Heart Rate Measurement 0x2A37: real captures, spec vectors and properties."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import main
from gateway.errors import ExitCode
from sensors.ble.hrm import (
    decode_heart_rate_measurement,
    encode_heart_rate_measurement,
)
from sensors.errors import DecodeError

CAPTURES = Path(__file__).parent / "data" / "ble_captures.csv"


def hrm_captures() -> list[dict[str, str]]:
    with CAPTURES.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row["characteristic"] == "2A37"]


@pytest.mark.parametrize("row", hrm_captures(), ids=lambda r: r["capture_id"])
def test_real_captures_decode_to_their_documented_values(row: dict[str, str]) -> None:
    m = decode_heart_rate_measurement(bytes.fromhex(row["payload_hex"]))
    assert f"0x{m.flags:02x}" == row["flags"]
    assert m.heart_rate == int(row["hr_bpm"])
    assert ("uint16" if m.hr_uint16 else "uint8") == row["hr_format"]
    contact = {"detected": (True, True), "not supported": (False, False)}
    assert (m.contact_supported, m.contact_detected) == contact[row["contact"]]
    assert list(m.rr_raw) == [int(x) for x in row["rr_raw_1_1024s"].split()]
    assert [round(ms, 1) for ms in m.rr_ms] == [float(x) for x in row["rr_ms"].split()]
    assert m.energy_kj is None and m.trailing_bytes == 0


def test_all_fourteen_real_captures_are_covered() -> None:
    assert len(hrm_captures()) == 14


@pytest.mark.parametrize("row", hrm_captures(), ids=lambda r: r["capture_id"])
def test_decode_command_prints_the_same_json(
    row: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    assert main(["decode", "2a37", *row["payload_hex"].split()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["heart_rate_bpm"] == int(row["hr_bpm"])
    assert out["rr_raw_1_1024s"] == [int(x) for x in row["rr_raw_1_1024s"].split()]


# Synthetic vectors, built by hand from the Heart Rate Service byte layout.
@pytest.mark.parametrize(
    ("hexbytes", "hr", "energy", "rr", "trailing"),
    [
        ("00b4", 180, None, (), 0),  # uint8 HR above 127 stays unsigned
        ("01b400", 180, None, (), 0),  # uint16 HR
        ("012c01", 300, None, (), 0),  # uint16 HR above 255
        ("1848e803000401", 72, 1000, (1024,), 1),  # EE then RR, odd trailing byte
        ("104800040004", 72, None, (1024, 1024), 0),  # two RR
        ("11480000040004", 72, None, (1024, 1024), 0),  # uint16 HR then two RR
        ("104800", 72, None, (), 1),  # RR flag, only one odd byte: no RR
        ("0848e803", 72, 1000, (), 0),  # EE only: not an RR, not the HR
    ],
)
def test_spec_layouts(
    hexbytes: str, hr: int, energy: int | None, rr: tuple[int, ...], trailing: int
) -> None:
    m = decode_heart_rate_measurement(bytes.fromhex(hexbytes))
    assert (m.heart_rate, m.energy_kj, m.rr_raw, m.trailing_bytes) == (
        hr,
        energy,
        rr,
        trailing,
    )


def test_rr_units_are_1_1024_seconds() -> None:
    m = decode_heart_rate_measurement(bytes.fromhex("10480004"))
    assert m.rr_raw == (1024,)
    assert m.rr_ms == (1000.0,)


@pytest.mark.parametrize(
    ("hexbytes", "reason"),
    [("", "empty payload"), ("01b4", "too short for the HR field"),
     ("0848e8", "energy-expended flag set but field missing")],
)  # fmt: skip
def test_malformed_payloads_raise_decode_error(hexbytes: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        decode_heart_rate_measurement(bytes.fromhex(hexbytes))
    assert info.value.source == "2a37"


def test_decode_command_rejects_malformed(capsys: pytest.CaptureFixture) -> None:
    assert main(["decode", "2a37", "01"]) == ExitCode.DECODE_FAILED
    assert "too short" in capsys.readouterr().err
    assert main(["decode", "2a37", "zz"]) == ExitCode.USAGE


@given(st.binary(max_size=32))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        m = decode_heart_rate_measurement(data)
    except DecodeError:
        return
    header = 1 + (2 if m.hr_uint16 else 1) + (2 if m.energy_kj is not None else 0)
    assert 2 * len(m.rr_raw) + m.trailing_bytes == len(data) - header
    assert not m.rr_raw or data[0] & 0x10
    assert m.trailing_bytes in (0, 1) or not data[0] & 0x10


@given(
    st.integers(0, 0xFFFF),
    st.lists(st.integers(0, 0xFFFF), max_size=9),
    st.sampled_from([None, True, False]),
    st.one_of(st.none(), st.integers(0, 0xFFFF)),
)
def test_encode_decode_round_trip(
    hr: int, rr: list[int], contact: bool | None, energy: int | None
) -> None:
    data = encode_heart_rate_measurement(
        hr, tuple(rr), contact=contact, energy_kj=energy
    )
    m = decode_heart_rate_measurement(data)
    assert (m.heart_rate, m.rr_raw, m.energy_kj) == (hr, tuple(rr), energy)
    assert m.contact_lost == (contact is False)


@pytest.mark.parametrize(
    "words",
    [
        ["16", "4e", "1b"],
        ["164e1b"],
        ["0x16", "0x4e", "0x1b"],
        ["16:4E:1B"],
        ["16-4e-1b"],
    ],
)
def test_decode_command_takes_hex_as_tools_print_it(
    words: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert main(["decode", "2a37", *words]) == 0
    assert json.loads(capsys.readouterr().out)["heart_rate_bpm"] == 78


def test_decode_command_explains_bad_hex(capsys: pytest.CaptureFixture) -> None:
    assert main(["decode", "2a37", "164"]) == ExitCode.USAGE
    assert "3 hex digits" in capsys.readouterr().err


def test_payload_longer_than_an_attribute_is_refused(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["decode", "2a37", "1048" + "0004" * 300]) == ExitCode.DECODE_FAILED
    assert "512-byte maximum" in capsys.readouterr().err
