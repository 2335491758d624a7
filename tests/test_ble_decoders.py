"""BLE GATT decoders: spec vectors per flag, real Contec frames, registry, CLI."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import main
from gateway.errors import ExitCode
from gateway.readings import UNITS, Kind, Quality, Reading
from sensors.ble import registry
from sensors.ble.basic import encode_date_time
from sensors.ble.blood_pressure import MMHG_PER_KPA
from sensors.ble.hrm import encode_heart_rate_measurement
from sensors.ble.ieee11073 import Special, encode_float, encode_sfloat
from sensors.ble.vendors import (
    VendorDecoder,
    register_vendor,
    unregister_vendor,
    vendor_decoder,
)
from sensors.ble.vendors.contec import ContecVitals, ContecWaveform
from sensors.errors import DecodeError
from sensors.replay import readings_from_hrm

CAPTURES = Path(__file__).parent / "data" / "ble_captures.csv"
WHEN = dt.datetime(2024, 3, 15, 10, 30, 0, tzinfo=dt.UTC)
STAMP = encode_date_time(WHEN)
AT = 1_800_000_000.0


def sf(value: float | Special, exponent: int = 0) -> bytes:
    return encode_sfloat(value, exponent)


def readings(m: object, **kw: object) -> list[Reading]:
    return registry.to_readings(m, device_id="dev", patient_ref="p1", at=AT, **kw)


def by_kind(rs: list[Reading]) -> dict[Kind, Reading]:
    return {r.kind: r for r in rs}


def contec_captures() -> list[dict[str, str]]:
    with CAPTURES.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["characteristic"].startswith("FF02")]


# ---- PLX Spot-Check 0x2A5E -------------------------------------------------
# synthetic, from the spec layout (PLXS 1.0, 3.1 PLX Spot-Check Measurement)


def spot_check(flags: int) -> bytes:
    out = bytes([flags]) + sf(97) + sf(64)
    if flags & 0x01:
        out += STAMP
    if flags & 0x02:
        out += (0x0080).to_bytes(2, "little")  # validated data
    if flags & 0x04:
        out += (0x000020).to_bytes(3, "little")  # low perfusion
    if flags & 0x08:
        out += sf(5.2, -1)
    return out


@pytest.mark.parametrize("flags", range(32))
def test_plx_spot_check_every_flag_combination(flags: int) -> None:
    m = registry.decode("2a5e", spot_check(flags))
    assert (m.reading.spo2.value, m.reading.pulse_rate.value) == (97.0, 64.0)
    assert (m.timestamp is not None) == bool(flags & 0x01)
    assert (m.status.measurement == 0x0080) == bool(flags & 0x02)
    assert m.status.flag("validated_data") == bool(flags & 0x02)
    assert m.status.flag("low_perfusion") == bool(flags & 0x04)
    pai = m.pulse_amplitude_index
    assert (pai.value if pai else None) == (5.2 if flags & 0x08 else None)
    assert m.device_clock_not_set == bool(flags & 0x10)
    with pytest.raises(DecodeError):
        registry.decode("2a5e", spot_check(flags)[:-1])


def test_plx_spot_check_timestamp_used_only_on_request_and_when_clock_set() -> None:
    m = registry.decode("2a5e", spot_check(0x01))
    assert m.timestamp.epoch == WHEN.timestamp()
    assert {r.measured_at for r in readings(m)} == {AT}
    assert {r.measured_at for r in readings(m, use_device_time=True)} == {
        WHEN.timestamp()
    }
    unset = registry.decode("2a5e", spot_check(0x11))
    assert {r.measured_at for r in readings(unset, use_device_time=True)} == {AT}


# ---- PLX Continuous 0x2A5F -------------------------------------------------
# synthetic, from the spec layout (PLXS 1.0, 3.2 PLX Continuous Measurement)


def continuous(
    flags: int,
    spo2: bytes | None = None,
    measurement: int = 0,
    device: int = 0,
) -> bytes:
    out = bytes([flags]) + (spo2 or sf(95)) + sf(110)
    if flags & 0x01:
        out += sf(94) + sf(111)
    if flags & 0x02:
        out += sf(96) + sf(109)
    if flags & 0x04:
        out += measurement.to_bytes(2, "little")
    if flags & 0x08:
        out += device.to_bytes(3, "little")
    if flags & 0x10:
        out += sf(Special.NAN)
    return out


@pytest.mark.parametrize("flags", range(32))
def test_plx_continuous_every_flag_combination(flags: int) -> None:
    m = registry.decode("2A5F", continuous(flags))
    assert (m.normal.spo2.value, m.normal.pulse_rate.value) == (95.0, 110.0)
    assert (m.fast.spo2.value if m.fast else None) == (94.0 if flags & 1 else None)
    assert (m.slow.pulse_rate.value if m.slow else None) == (
        109.0 if flags & 2 else None
    )
    assert (m.status.measurement is not None) == bool(flags & 0x04)
    assert (m.status.device is not None) == bool(flags & 0x08)
    pai = m.pulse_amplitude_index
    assert (pai.special if pai else None) == (Special.NAN if flags & 0x10 else None)
    by = by_kind(readings(m))
    assert by[Kind.SPO2].value == 95.0 and by[Kind.SPO2].quality == Quality.OK
    assert by[Kind.PULSE_RATE].value == 110.0
    with pytest.raises(DecodeError):
        registry.decode("2a5f", continuous(flags)[:-1])


def test_plx_reserved_spo2_becomes_nan_flagged_sensor_nan_never_2047() -> None:
    m = registry.decode("2a5f", continuous(0, spo2=bytes.fromhex("ff07")))
    spo2 = by_kind(readings(m))[Kind.SPO2]
    assert math.isnan(spo2.value)
    assert spo2.quality == Quality.SENSOR_NAN
    assert m.as_dict()["spo2_pct"] == "NaN"


@pytest.mark.parametrize(
    ("device_bit", "name"),
    [
        (11, "sensor_unconnected_to_user"),
        (13, "sensor_displaced"),
        (15, "sensor_disconnected"),
    ],
)
def test_plx_sensor_off_flags_contact_lost(device_bit: int, name: str) -> None:
    m = registry.decode("2a5f", continuous(0x08, spo2=sf(0), device=1 << device_bit))
    assert m.status.flag(name) and m.status.sensor_off
    spo2 = by_kind(readings(m))[Kind.SPO2]
    assert spo2.quality == Quality.CONTACT_LOST | Quality.NO_READING
    assert spo2.value == 0.0


@pytest.mark.parametrize(
    ("measurement", "device"),
    [(1 << 13, 0), (1 << 15, 0), (0, 1 << 1), (0, 1 << 14)],
    ids=["unavailable", "invalid", "equipment-malfunction", "sensor-malfunction"],
)
def test_plx_no_measurement_statuses_flag_no_reading(
    measurement: int, device: int
) -> None:
    m = registry.decode(
        "2a5f", continuous(0x0C, measurement=measurement, device=device)
    )
    assert m.status.no_measurement and not m.status.sensor_off
    assert {r.quality for r in readings(m)} == {Quality.NO_READING}


def test_plx_zero_spo2_without_status_is_no_reading() -> None:
    m = registry.decode("2a5f", continuous(0, spo2=sf(0)))
    assert by_kind(readings(m))[Kind.SPO2].quality == Quality.NO_READING


def test_plx_questionable_only_keeps_the_value_clean() -> None:
    m = registry.decode("2a5f", continuous(0x04, measurement=1 << 14))
    assert m.as_dict()["status_flags"] == ["questionable_measurement"]
    assert {r.quality for r in readings(m)} == {Quality.OK}


def test_plx_unknown_status_name_is_a_key_error() -> None:
    m = registry.decode("2a5f", continuous(0))
    with pytest.raises(KeyError):
        m.status.flag("no_such_bit")


# ---- Health Thermometer 0x2A1C ---------------------------------------------
# synthetic, from the spec layout (HTS 1.0, 3.1 Temperature Measurement)


def temperature(flags: int, value: bytes) -> bytes:
    out = bytes([flags]) + value
    if flags & 0x02:
        out += STAMP
    if flags & 0x04:
        out += b"\x06"  # mouth
    return out


@pytest.mark.parametrize("flags", range(8))
def test_thermometer_every_flag_combination(flags: int) -> None:
    fahrenheit = bool(flags & 0x01)
    value = encode_float(98.6 if fahrenheit else 37.0, -1)
    m = registry.decode("2a1c", temperature(flags, value))
    assert m.fahrenheit == fahrenheit
    assert m.value.value == (98.6 if fahrenheit else 37.0)
    assert m.celsius.value == pytest.approx(37.0, abs=1e-9)
    assert (m.timestamp is not None) == bool(flags & 0x02)
    assert m.type_name == ("Mouth" if flags & 0x04 else None)
    (reading,) = readings(m)
    assert reading.kind is Kind.BODY_TEMPERATURE and reading.unit == "Cel"
    assert reading.value == pytest.approx(37.0, abs=1e-9)
    with pytest.raises(DecodeError):
        registry.decode("2a1c", temperature(flags, value)[:-1])


@pytest.mark.parametrize(
    ("fahrenheit", "celsius"),
    [(32.0, 0.0), (212.0, 100.0), (104.0, 40.0), (95.0, 35.0)],
)
def test_fahrenheit_conversion(fahrenheit: float, celsius: float) -> None:
    m = registry.decode("2a1c", temperature(0x01, encode_float(fahrenheit, -1)))
    assert readings(m)[0].value == pytest.approx(celsius, abs=1e-9)
    assert m.as_dict()["temperature_cel"] == celsius


def test_thermometer_special_is_nan_and_device_time_on_request() -> None:
    m = registry.decode("2a1c", temperature(0x03, encode_float(Special.PLUS_INF)))
    (reading,) = readings(m, use_device_time=True)
    assert math.isnan(reading.value) and reading.quality == Quality.SENSOR_NAN
    assert reading.measured_at == WHEN.timestamp()
    assert m.as_dict()["temperature"] == "+INF"


@pytest.mark.parametrize(
    "stamp",
    [
        bytes.fromhex("e8070d0f0a1e00"),  # month 13
        bytes.fromhex("e807021f0a1e00"),  # 31 February
        bytes.fromhex("e807030f181e00"),  # hour 24
        bytes.fromhex("0a00030f0a1e00"),  # year 10
    ],
)
def test_impossible_timestamps_are_decode_errors(stamp: bytes) -> None:
    with pytest.raises(DecodeError, match="timestamp"):
        registry.decode("2a1c", b"\x02" + encode_float(37.0) + stamp)


def test_unknown_device_date_keeps_gateway_time() -> None:
    unknown = bytes.fromhex("00000000000000")
    m = registry.decode("2a1c", b"\x02" + encode_float(37.0) + unknown)
    assert m.timestamp.epoch is None
    assert readings(m, use_device_time=True)[0].measured_at == AT


# ---- Blood Pressure Measurement 0x2A35 -------------------------------------
# synthetic, from the spec layout (BLS 1.0, 3.1 Blood Pressure Measurement)


def blood_pressure(flags: int, sys_: float, dia: float, map_: float) -> bytes:
    exp = -1 if flags & 0x01 else 0
    out = bytes([flags]) + sf(sys_, exp) + sf(dia, exp) + sf(map_, exp)
    if flags & 0x02:
        out += STAMP
    if flags & 0x04:
        out += sf(72)
    if flags & 0x08:
        out += b"\x02"
    if flags & 0x10:
        out += (0b101110).to_bytes(2, "little")
    return out


@pytest.mark.parametrize("flags", range(32))
def test_blood_pressure_every_flag_combination(flags: int) -> None:
    kpa = bool(flags & 0x01)
    values = (16.0, 10.7, 12.4) if kpa else (120.0, 80.0, 93.0)
    m = registry.decode("2a35", blood_pressure(flags, *values))
    assert m.kpa == kpa
    assert (m.systolic.value, m.diastolic.value, m.mean_arterial.value) == values
    assert (m.timestamp is not None) == bool(flags & 0x02)
    assert (m.pulse_rate.value if m.pulse_rate else None) == (
        72.0 if flags & 0x04 else None
    )
    assert m.user_id == (2 if flags & 0x08 else None)
    if flags & 0x10:
        status = m.status
        assert not status.body_movement and status.cuff_too_loose
        assert status.irregular_pulse and status.pulse_range == "above upper limit"
        assert status.improper_position
    else:
        assert m.status is None
    by = by_kind(readings(m))
    scale = MMHG_PER_KPA if kpa else 1.0
    assert by[Kind.SYSTOLIC_PRESSURE].value == pytest.approx(values[0] * scale)
    assert by[Kind.MEAN_ARTERIAL_PRESSURE].value == pytest.approx(values[2] * scale)
    assert (Kind.PULSE_RATE in by) == bool(flags & 0x04)
    assert all(r.unit in ("mmHg", "bpm") for r in by.values())
    with pytest.raises(DecodeError):
        registry.decode("2a35", blood_pressure(flags, *values)[:-1])


def test_kpa_conversion_to_mmhg() -> None:
    m = registry.decode("2a35", blood_pressure(0x01, 16.0, 10.7, 12.4))
    by = by_kind(readings(m))
    assert by[Kind.SYSTOLIC_PRESSURE].value == pytest.approx(120.00992)
    assert by[Kind.DIASTOLIC_PRESSURE].value == pytest.approx(80.256634)
    assert m.as_dict()["systolic_mmhg"] == 120.01


def test_blood_pressure_nres_diastolic_is_nan() -> None:
    data = b"\x00" + sf(120) + sf(Special.NRES) + sf(93)
    m = registry.decode("2a35", data)
    dia = by_kind(readings(m))[Kind.DIASTOLIC_PRESSURE]
    assert math.isnan(dia.value) and dia.quality == Quality.SENSOR_NAN
    assert m.as_dict()["diastolic"] == "NRes"


# ---- Glucose Measurement 0x2A18 --------------------------------------------
# synthetic, from the spec layout (GLS 1.0, 3.1 Glucose Measurement)


def glucose(flags: int, concentration: bytes, offset: int = -15) -> bytes:
    out = bytes([flags]) + (7).to_bytes(2, "little") + STAMP
    if flags & 0x01:
        out += offset.to_bytes(2, "little", signed=True)
    if flags & 0x02:
        out += concentration + bytes([0x1 << 4 | 0x2])  # finger, capillary plasma
    if flags & 0x08:
        out += (1 << 5 | 1 << 11).to_bytes(2, "little")  # too high, time fault
    return out


@pytest.mark.parametrize("flags", range(32))
def test_glucose_every_flag_combination(flags: int) -> None:
    mol = bool(flags & 0x04)
    concentration = sf(0.0055, -4) if mol else sf(0.001, -5)  # 5.5 mmol/L, 100 mg/dL
    m = registry.decode("2a18", glucose(flags, concentration))
    assert m.sequence == 7 and m.unit == ("mol/L" if mol else "kg/L")
    assert m.time_offset_min == (-15 if flags & 0x01 else None)
    assert m.context_follows == bool(flags & 0x10)
    rs = readings(m)
    if flags & 0x02:
        assert (m.sample_type, m.sample_location) == (2, 1)
        assert rs[0].kind is Kind.GLUCOSE and rs[0].unit == "mmol/L"
        assert rs[0].value == pytest.approx(5.5 if mol else 5.5506216, rel=1e-6)
    else:
        assert m.concentration is None and rs == []
    assert m.flag("result_too_high") == bool(flags & 0x08)
    with pytest.raises(DecodeError):
        registry.decode("2a18", glucose(flags, concentration)[:-1])


def test_glucose_device_time_is_base_plus_offset_unless_time_fault() -> None:
    m = registry.decode("2a18", glucose(0x03, sf(0.001, -5), offset=-15))
    (r,) = readings(m, use_device_time=True)
    assert r.measured_at == WHEN.timestamp() - 15 * 60
    faulty = registry.decode("2a18", glucose(0x0B, sf(0.001, -5)))
    assert readings(faulty, use_device_time=True)[0].measured_at == AT
    assert faulty.as_dict()["annunciation"] == ["result_too_high", "time_fault"]


# ---- Battery Level 0x2A19, Body Sensor Location 0x2A38 ---------------------
# synthetic, from the spec layout (GSS Battery Level, Body Sensor Location)


@pytest.mark.parametrize("level", [0, 1, 57, 100])
def test_battery_level(level: int) -> None:
    m = registry.decode("2a19", bytes([level]))
    (r,) = readings(m)
    assert (r.kind, r.value, r.unit) == (Kind.BATTERY, float(level), "%")


@pytest.mark.parametrize("data", [b"", b"\x65", b"\xff", b"\x10\x10"])
def test_battery_level_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError):
        registry.decode("2a19", data)


@pytest.mark.parametrize(
    ("code", "name"),
    [(0, "Other"), (1, "Chest"), (3, "Finger"), (6, "Foot"), (7, "reserved")],
)
def test_body_sensor_location(code: int, name: str) -> None:
    m = registry.decode("2a38", bytes([code]))
    assert m.name == name and readings(m) == []


# ---- Heart Rate Measurement 0x2A37 through the registry --------------------
# synthetic, from the spec layout (Heart Rate Service 1.0, 3.1)


@pytest.mark.parametrize("flags", range(32))
def test_hrm_every_flag_combination_through_the_registry(flags: int) -> None:
    data = bytes([flags]) + (b"\x48\x00" if flags & 0x01 else b"\x48")
    data += b"\x10\x00" if flags & 0x08 else b""
    data += b"\x00\x04\x00\x02" if flags & 0x10 else b""
    rs = readings(registry.decode("2a37", data))
    assert rs == readings_from_hrm(data, device_id="dev", patient_ref="p1", at=AT)
    assert rs[0].value == 72.0
    lost = bool(flags & 0x04) and not flags & 0x02
    assert rs[0].quality == (Quality.CONTACT_LOST if lost else Quality.OK)
    rr = [r for r in rs if r.kind is Kind.RR_INTERVAL]
    # each RR belongs to its own beat: the last ends at `at`, the first 0.5 s before
    assert [(r.value, r.measured_at) for r in rr] == (
        [(1000.0, AT - 0.5), (500.0, AT)] if flags & 0x10 else []
    )


# ---- Contec CMS50D-BT vendor frames ----------------------------------------


@pytest.mark.parametrize("row", contec_captures(), ids=lambda r: r["capture_id"])
def test_real_contec_frames_decode(row: dict[str, str]) -> None:
    m = registry.decode("contec-cms50d-bt", bytes.fromhex(row["payload_hex"]))
    if row["capture_id"] == "C21":
        assert isinstance(m, ContecVitals)
        assert (m.pulse_bpm, m.spo2_pct, m.finger_in) == (83, 99, False)
        by = by_kind(readings(m))
        assert (by[Kind.PULSE_RATE].value, by[Kind.SPO2].value) == (83.0, 99.0)
        assert {r.quality for r in by.values()} == {Quality.CONTACT_LOST}
    else:
        assert isinstance(m, ContecWaveform)
        assert m.samples == (0x03, 0x48, 0x09, 0x3F)
        assert readings(m) == []


def test_contec_captures_present() -> None:
    assert [r["capture_id"] for r in contec_captures()] == ["C21", "C22"]


def test_contec_finger_in_is_clean_and_no_value_is_nan() -> None:
    m = registry.decode(
        "ff02", bytes.fromhex("eb 01 06 53 63 7f 00 25"), model="contec-cms50d-bt"
    )
    assert {r.quality for r in readings(m)} == {Quality.OK}
    none = registry.decode("contec-cms50d-bt", bytes.fromhex("eb 01 06 ff 7f 7f 00 25"))
    assert (none.pulse_bpm, none.spo2_pct) == (None, None)
    for r in readings(none):
        assert math.isnan(r.value) and r.quality == Quality.NO_READING


@pytest.mark.parametrize(
    "hexbytes",
    [
        "",
        "eb",
        "ea 01 04 53 63 7f 00 25",
        "eb 02 04 53 63 7f 00 25",
        "eb 01 04 53 63 7f",
        "eb 00 03 48",
        "eb 01 06 53 65 7f 00 25",
    ],
)
def test_contec_malformed_frames(hexbytes: str) -> None:
    with pytest.raises(DecodeError):
        registry.decode("contec-cms50d-bt", bytes.fromhex(hexbytes))


# ---- registry --------------------------------------------------------------


@pytest.mark.parametrize(
    "uuid", ["2a19", "2A19", "0x2a19", "00002A19-0000-1000-8000-00805F9B34FB"]
)
def test_registry_accepts_uuid_forms(uuid: str) -> None:
    assert registry.decode(uuid, b"\x32").percent == 50


def test_registry_unknown_characteristic_or_wrong_vendor_characteristic() -> None:
    with pytest.raises(DecodeError, match="no decoder"):
        registry.decode("2a6e", b"\x00\x00")
    with pytest.raises(DecodeError, match="no decoder"):
        registry.decode("ff02", bytes.fromhex("eb 00 03 48 09 3f"))
    with pytest.raises(DecodeError, match="not a contec"):
        registry.decode(
            "ff03", bytes.fromhex("eb 00 03 48 09 3f"), model="contec-cms50d-bt"
        )
    with pytest.raises(TypeError):
        readings(object())


def test_vendor_registry_extends_at_runtime() -> None:
    model = "acme-ox1"
    register_vendor(
        VendorDecoder(
            model=model,
            characteristic="0000fff1-0000-1000-8000-00805f9b34fb",
            decode=lambda data: Reading("x", Kind.SPO2, float(data[0]), 0.0),
            readings=lambda m, stamp, use_device_time: [
                stamp.reading(Kind.SPO2, m.value)
            ],
            measurement_types=(Reading,),
        )
    )
    try:
        assert vendor_decoder("ACME-OX1") is not None
        with pytest.raises(ValueError, match="already registered"):
            register_vendor(vendor_decoder(model))
        m = registry.decode("fff1", b"\x60", model=model)
        assert [(r.kind, r.value) for r in readings(m)] == [(Kind.SPO2, 96.0)]
    finally:
        unregister_vendor(model)
    assert vendor_decoder(model) is None


ALL_CHARACTERISTICS = registry.characteristics() + registry.models()


@given(st.sampled_from(ALL_CHARACTERISTICS), st.binary(max_size=40))
def test_any_bytes_decode_or_raise_decode_error_only(char: str, data: bytes) -> None:
    try:
        m = registry.decode(char, data)
    except DecodeError as err:
        assert err.reason
        # payload-free: the bytes never travel in the reason (too short to tell)
        assert len(data) < 3 or data.hex() not in err.reason
        return
    json.dumps(m.as_dict())
    for r in readings(m):
        assert r.unit == UNITS[r.kind]
        # never a number from a non-number: NaN only with a technical flag
        assert math.isfinite(r.value) or (
            math.isnan(r.value)
            and r.quality & (Quality.SENSOR_NAN | Quality.NO_READING)
        )


# ---- CLI -------------------------------------------------------------------

CLI_CASES = [
    ("2a37", encode_heart_rate_measurement(72, (1024,)), "heart_rate_bpm", 72),
    ("2a38", b"\x01", "location", "Chest"),
    ("2a19", b"\x55", "battery_percent", 85),
    ("2a5e", spot_check(0x1F), "spo2_pct", 97.0),
    ("2a5f", continuous(0x1F), "pulse_amplitude_index_pct", "NaN"),
    ("2a1c", temperature(0x07, encode_float(98.6, -1)), "temperature_cel", 37.0),
    ("2a35", blood_pressure(0x1F, 16.0, 10.7, 12.4), "systolic_mmhg", 120.01),
    ("2a18", glucose(0x0F, sf(0.0055, -4)), "glucose_mmol_l", 5.5),
    ("contec-cms50d-bt", bytes.fromhex("eb01045363 7f0025"), "spo2_pct", 99),
    (
        "00002A5F-0000-1000-8000-00805F9B34FB",
        continuous(0, sf(Special.MINUS_INF)),
        "spo2_pct",
        "-INF",
    ),
]


@pytest.mark.parametrize(("char", "data", "key", "expected"), CLI_CASES)
def test_cli_decode_each_characteristic(
    char: str, data: bytes, key: str, expected: object, capsys: pytest.CaptureFixture
) -> None:
    assert main(["decode", char, *data.hex(" ").split()]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)[key] == expected


@pytest.mark.parametrize("char", ["2a5e", "2a5f", "2a1c", "2a35", "2a18", "2a19"])
def test_cli_malformed_exits_decode_failed(
    char: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["decode", char, "ff"]) == ExitCode.DECODE_FAILED
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot decode" in captured.err


def test_cli_non_hex_exits_usage(capsys: pytest.CaptureFixture) -> None:
    assert main(["decode", "2a5f", "zz"]) == ExitCode.USAGE == 2
    assert "not hex" in capsys.readouterr().err
