"""Rules against real recordings: the alarms a clinician expects, and no others.

These run the shipped recordings through the same decoder and rule engine the agent
uses, with the demo's rule settings, and compare with what the recordings hold.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gateway.alarms import Action, AlarmEvent, Category, Priority
from gateway.config import load_config
from gateway.readings import Kind
from gateway.rules import RuleEngine
from sensors.replay import data_path, mimic, mitdb, readings_from_hrm

ROOT = Path(__file__).resolve().parents[1]
START = 1_800_000_000.0


def demo_engine() -> RuleEngine:
    cfg = load_config(ROOT / "config" / "demo.toml")
    defaults, patients = cfg.patient_rules()
    return RuleEngine(defaults, patients, cfg.rooms.to_rules())


def strap_events(record: str) -> list[AlarmEvent]:
    engine = demo_engine()
    events: list[AlarmEvent] = []
    path = data_path(f"mitdb/{record}_all.csv")
    for ev in mitdb.heart_rate_notifications(path, start=START, device_id="strap"):
        for r in readings_from_hrm(
            ev.payload, device_id="strap", patient_ref="p", at=ev.at
        ):
            events += engine.evaluate(r, ev.at)
        events += engine.tick(ev.at)
    return events


def test_record_100_raises_no_alarm_at_all() -> None:
    # Sinus rhythm, 70-86 bpm: nothing for the ERT.
    assert strap_events("100") == []


def test_record_123_dips_to_50_bpm_but_never_for_a_minute() -> None:
    # The rate hovers around 50 bpm (NEWS2 score 1 at <= 50) in dips shorter than the
    # 60 s persistence delay: the delay is what keeps the phones quiet.
    assert strap_events("123") == []
    engine = RuleEngine(demo_engine().defaults.__class__(persistence_s=10))
    path = data_path("mitdb/123_all.csv")
    raised = []
    for ev in mitdb.heart_rate_notifications(path, start=START, device_id="strap"):
        for r in readings_from_hrm(
            ev.payload, device_id="strap", patient_ref="p", at=ev.at
        ):
            raised += [e for e in engine.evaluate(r, ev.at) if e.action is Action.RAISE]
    assert raised and all(e.priority is Priority.LOW for e in raised)
    assert all("Heart rate low" in e.reason for e in raised)


def zero_runs(column: str) -> list[tuple[int, int]]:
    """(first minute, length) of each stretch where the monitor sent 0."""
    path = data_path("mimic3wdb_s00001_numerics_per_minute.csv")
    with path.open(newline="") as f:
        values = [float(row[column] or "nan") for row in csv.DictReader(f)]
    runs, begin = [], None
    for minute, v in enumerate([*values, 1.0]):
        if v == 0 and begin is None:
            begin = minute
        elif v != 0 and begin is not None:
            runs.append((begin, minute - begin))
            begin = None
    return runs


@pytest.fixture(scope="module")
def mimic_events() -> list[AlarmEvent]:
    engine = demo_engine()
    path = data_path("mimic3wdb_s00001_numerics_per_minute.csv")
    events: list[AlarmEvent] = []
    for ev in mimic.trend_readings(path, start=START, device_id="mon", patient_ref="p"):
        events += engine.evaluate(ev.payload, ev.at)
        events += engine.tick(ev.at)
    return events


@pytest.mark.parametrize(
    ("kind", "column"), [("spo2", "SpO2_%"), ("heart_rate", "HR_bpm")]
)
def test_mimic_sensor_off_stretches_raise_technical_alarms(
    mimic_events: list[AlarmEvent], kind: str, column: str
) -> None:
    raised = [
        round((e.at - START) / 60)
        for e in mimic_events
        if e.action is Action.RAISE
        and e.category is Category.TECHNICAL
        and e.condition.startswith(f"p/mon/{kind}/")
    ]
    # A stretch of two minutes or more outlasts the 60 s technical persistence delay.
    expected = [begin + 1 for begin, length in zero_runs(column) if length >= 2]
    assert raised == expected
    assert len(expected) == {"spo2": 10, "heart_rate": 4}[kind]


@pytest.mark.parametrize(
    ("kind", "column"), [("spo2", "SpO2_%"), ("heart_rate", "HR_bpm")]
)
def test_mimic_raises_no_physiological_alarm_in_sensor_off_minutes(
    mimic_events: list[AlarmEvent], kind: str, column: str
) -> None:
    # Per parameter: the oximeter can be on while the ECG leads are off, and the
    # other way round; each sensor's silence mutes only its own parameter.
    off = {
        minute
        for begin, length in zero_runs(column)
        for minute in range(begin, begin + length)
    }
    physiological = [
        e
        for e in mimic_events
        if e.category is Category.PHYSIOLOGICAL and e.condition == f"p/{kind}"
    ]
    assert physiological, "the record's low-SpO2 and low-HR spells should alarm"
    for e in physiological:
        assert e.priority is Priority.LOW
        assert round((e.at - START) / 60) not in off
        assert all(ev.value > 0 for ev in e.evidence)
        assert all(round((ev.measured_at - START) / 60) not in off for ev in e.evidence)


def test_mimic_hr_artefact_between_zeros_is_not_bradycardia(
    mimic_events: list[AlarmEvent],
) -> None:
    # Minute 1389 holds HR 11.5 between sensor-off zeros: an artefact, not a patient
    # at 11 bpm. It must not become a high-priority alarm.
    assert not [e for e in mimic_events if e.priority is Priority.HIGH]
    assert Kind.HEART_RATE in {ev.kind for e in mimic_events for ev in e.evidence}
