"""Replay of real recordings: MIT-BIH beats as BLE, MIMIC trends, UCI room MQTT."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clock import ManualClock
from gateway.readings import Kind, Quality
from sensors.ble.hrm import decode_heart_rate_measurement, encode_heart_rate_measurement
from sensors.errors import DecodeError
from sensors.replay import (
    ReplayEvent,
    data_path,
    merge,
    mimic,
    mitdb,
    readings_from_hrm,
    replay,
    uci,
)

START = 1_700_000_000.0
FS = mitdb.SAMPLE_RATE_HZ
MIMIC_CSV = "mimic3wdb_s00001_numerics_per_minute.csv"
UCI_CSV = "occupancy_estimation_2017-12-22.csv"


@pytest.fixture(scope="module")
def record_100() -> list[ReplayEvent]:
    path = data_path("mitdb/100_all.csv")
    return list(mitdb.heart_rate_notifications(path, start=START, device_id="strap-1"))


def _rr_readings(events: list[ReplayEvent]):
    for ev in events:
        readings = readings_from_hrm(
            ev.payload, device_id=ev.device_id, patient_ref="p-1", at=ev.at
        )
        yield from (r for r in readings if r.kind is Kind.RR_INTERVAL)


def test_data_path_finds_shipped_files_and_refuses_unknown() -> None:
    assert data_path("mitdb/123_pvc.csv").is_file()
    assert data_path(MIMIC_CSV).is_file()
    with pytest.raises(FileNotFoundError):
        data_path("mitdb/999_all.csv")


def test_shipped_uci_day_is_the_first_day_only() -> None:
    with data_path(UCI_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1462
    assert {row["Date"] for row in rows} == {"2017-12-22"}


def test_mitdb_100_notifications_reproduce_every_beat_time(record_100) -> None:
    beats = mitdb.read_sample_indices(data_path("mitdb/100_all.csv"))
    rr = list(_rr_readings(record_100))

    # Every beat after the first ends exactly one RR interval, once, in order.
    assert len(rr) == len(beats) - 1 == 2272
    for reading, beat, previous in zip(rr, beats[1:], beats[:-1], strict=True):
        assert reading.measured_at == pytest.approx(START + beat / FS, abs=1 / 1024)
        true_ms = (beat - previous) / FS * 1000
        assert reading.value == pytest.approx(true_ms, abs=1000 / 1024)


def test_mitdb_100_rr_sum_matches_recording_within_rounding(record_100) -> None:
    beats = mitdb.read_sample_indices(data_path("mitdb/100_all.csv"))
    raw = [
        rr
        for ev in record_100
        for rr in decode_heart_rate_measurement(ev.payload).rr_raw
    ]
    total_s = (beats[-1] - beats[0]) / FS
    assert sum(raw) / 1024 == pytest.approx(total_s, abs=len(raw) * 0.5 / 1024)


def test_mitdb_100_notifications_look_like_a_strap(record_100) -> None:
    decoded = [decode_heart_rate_measurement(ev.payload) for ev in record_100]
    times = [ev.at for ev in record_100]

    assert all(70 <= m.heart_rate <= 90 for m in decoded)
    assert {m.flags for m in decoded} <= {0x16, 0x06}
    assert all(m.flags == 0x16 for m in decoded if m.rr_raw)
    assert times == sorted(times)
    # About one notification per second over the 30-minute record.
    assert len(record_100) == pytest.approx(1805, abs=5)
    assert max(b - a for a, b in itertools.pairwise(times)) < 2.0
    assert {ev.kind for ev in record_100} == {"ble"}


def test_mitdb_second_without_beat_repeats_hr_without_rr() -> None:
    # Synthetic: beats at 0 s, 1.5 s, 3.5 s (360 Hz indices): second 3 has no beat.
    events = list(
        mitdb.heart_rate_notifications_from_beats(
            [0, 540, 1260], start=0.0, device_id="s"
        )
    )
    decoded = [decode_heart_rate_measurement(ev.payload) for ev in events]
    assert [ev.at for ev in events] == [1.5, 3.0, 3.5]
    assert [m.flags for m in decoded] == [0x16, 0x06, 0x16]
    assert [m.rr_raw for m in decoded] == [(1536,), (), (2048,)]
    assert [m.heart_rate for m in decoded] == [40, 40, round(60 / 1.75)]


@given(st.lists(st.integers(min_value=60, max_value=1500), min_size=1, max_size=60))
def test_every_beat_interval_is_sent_exactly_once(gaps: list[int]) -> None:
    beats = [77]
    for gap in gaps:
        beats.append(beats[-1] + gap)
    events = mitdb.heart_rate_notifications_from_beats(beats, start=0.0, device_id="s")
    sent = [
        rr for ev in events for rr in decode_heart_rate_measurement(ev.payload).rr_raw
    ]
    assert sent == [round(gap / FS * 1024) for gap in gaps]


def test_readings_from_hrm_stamps_rr_backwards_synthetic() -> None:
    # Synthetic notification: HR 60, RR 1.0 s, 0.5 s, 0.75 s (in 1/1024 s).
    data = encode_heart_rate_measurement(60, (1024, 512, 768))
    readings = readings_from_hrm(data, device_id="s", patient_ref="p", at=100.0)

    hr, *rr = readings
    assert (hr.kind, hr.value, hr.measured_at, hr.quality) == (
        Kind.HEART_RATE,
        60.0,
        100.0,
        Quality.OK,
    )
    assert [(r.value, r.measured_at) for r in rr] == [
        (1000.0, 98.75),
        (500.0, 99.25),
        (750.0, 100.0),
    ]
    assert {(r.kind, r.patient_ref, r.device_id) for r in rr} == {
        (Kind.RR_INTERVAL, "p", "s")
    }


def test_readings_from_hrm_flags_technical_conditions() -> None:
    zero = readings_from_hrm(
        encode_heart_rate_measurement(0), device_id="s", patient_ref=None, at=1.0
    )
    lost = readings_from_hrm(
        encode_heart_rate_measurement(72, contact=False),
        device_id="s",
        patient_ref=None,
        at=1.0,
    )
    assert [r.quality for r in zero] == [Quality.NO_READING]
    assert [r.quality for r in lost] == [Quality.CONTACT_LOST]


def test_readings_from_hrm_rejects_malformed_bytes() -> None:
    with pytest.raises(DecodeError):
        readings_from_hrm(b"\x01\x48", device_id="s", patient_ref=None, at=1.0)


def test_mimic_trends_flag_sensor_off_minutes() -> None:
    events = list(
        mimic.trend_readings(
            data_path(MIMIC_CSV), start=START, device_id="mon-1", patient_ref="p-2"
        )
    )
    hr = [ev.payload for ev in events if ev.payload.kind is Kind.HEART_RATE]
    spo2 = [ev.payload for ev in events if ev.payload.kind is Kind.SPO2]

    assert len(hr) == len(spo2) == 1936
    assert sum(r.quality is Quality.NO_READING for r in hr) == 46
    assert sum(r.quality is Quality.NO_READING for r in spo2) == 363
    assert all(r.value == 0.0 for r in hr + spo2 if r.quality is Quality.NO_READING)
    assert events[0].at == START and hr[0].measured_at == START
    assert hr[1].measured_at == START + 60 and hr[1].value == 62.8
    assert all(ev.at == ev.payload.measured_at for ev in events)
    assert [ev.at for ev in events] == sorted(ev.at for ev in events)


def test_uci_room_messages_follow_the_csv() -> None:
    with data_path(UCI_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    events = list(uci.room_messages(data_path(UCI_CSV), start=START, room="r-101"))

    sensors = ["temperature", "co2", "light", "motion", "occupancy"]
    assert len(events) == 5 * len(rows)
    assert [ev.payload[0] for ev in events[:5]] == [f"rooms/r-101/{s}" for s in sensors]
    bodies = [json.loads(ev.payload[1]) for ev in events]
    assert bodies[0]["ts"] == events[0].at == START
    # Row 2 is 31 s after row 1 (10:49:41 -> 10:50:12).
    assert bodies[5]["ts"] == START + 31
    for i, row in enumerate(rows):
        values = [b["value"] for b in bodies[5 * i : 5 * i + 5]]
        motion = int(row["S6_PIR"] == "1" or row["S7_PIR"] == "1")
        assert values == [
            float(row["S1_Temp"]),
            float(row["S5_CO2"]),
            float(row["S1_Light"]),
            motion,
            int(row["Room_Occupancy_Count"]),
        ]


def test_uci_topic_prefix_is_configurable() -> None:
    events = uci.room_messages(
        data_path(UCI_CSV), start=0.0, room="r", topic_prefix="site/ward"
    )
    assert next(iter(events)).payload[0] == "site/ward/r/temperature"


def _events(times: list[float]) -> list[ReplayEvent]:
    return [ReplayEvent(t, "d", "reading", b"") for t in times]


def test_replay_unpaced_emits_in_order_and_ticks_at_virtual_times() -> None:
    clock = ManualClock()
    log: list[tuple[str, float, float]] = []

    async def emit(ev: ReplayEvent) -> None:
        log.append(("event", ev.at, clock.now()))

    async def tick(now: float) -> None:
        log.append(("tick", now, clock.now()))

    count = asyncio.run(
        replay(
            _events([101.0, 103.0, 112.0, 112.0, 115.0]),
            speed=None,
            clock=clock,
            emit=emit,
            tick=tick,
        )
    )
    assert count == 5
    assert log == [
        ("event", 101.0, 101.0),
        ("event", 103.0, 103.0),
        ("tick", 105.0, 105.0),
        ("tick", 110.0, 110.0),
        ("event", 112.0, 112.0),
        ("event", 112.0, 112.0),
        ("tick", 115.0, 115.0),
        ("event", 115.0, 115.0),
    ]


def test_merge_interleaves_sources_by_time() -> None:
    merged = merge(_events([1.0, 4.0, 9.0]), _events([2.0, 3.0, 10.0]))
    assert [ev.at for ev in merged] == [1.0, 2.0, 3.0, 4.0, 9.0, 10.0]


def test_replay_refuses_events_out_of_order() -> None:
    async def emit(ev: ReplayEvent) -> None:
        return None

    with pytest.raises(ValueError, match="out of order"):
        asyncio.run(
            replay(_events([5.0, 4.0]), speed=None, clock=ManualClock(), emit=emit)
        )


def test_replay_paced_tracks_wall_time() -> None:
    # 10 virtual seconds at 1000x: about 10 ms of wall time.
    arrivals: list[float] = []

    async def emit(ev: ReplayEvent) -> None:
        arrivals.append(time.monotonic())

    began = time.monotonic()
    asyncio.run(
        replay(
            _events([float(t) for t in range(11)]),
            speed=1000,
            clock=ManualClock(),
            emit=emit,
        )
    )
    elapsed = arrivals[-1] - arrivals[0]
    assert 0.009 <= elapsed < 0.5
    assert time.monotonic() - began < 2.0


def test_replay_paced_slower_speed_takes_longer() -> None:
    # 10 virtual seconds at 50x: about 0.2 s.
    async def emit(ev: ReplayEvent) -> None:
        return None

    began = time.monotonic()
    asyncio.run(
        replay(_events([0.0, 5.0, 10.0]), speed=50, clock=ManualClock(), emit=emit)
    )
    assert 0.19 <= time.monotonic() - began < 1.0
