"""Rules: NEWS2 bands, persistence, hysteresis, technical and room conditions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import news2
from gateway.alarms import Action, Category, Priority
from gateway.readings import Kind, Quality, Reading
from gateway.rules import PatientRules, RoomRules, RuleEngine

P = "p-1"


def hr(value: float, at: float, quality: Quality = Quality.OK) -> Reading:
    return Reading(
        "strap-1", Kind.HEART_RATE, value, at, patient_ref=P, quality=quality
    )


def feed(engine: RuleEngine, readings: list[Reading]) -> list:
    events = []
    for r in readings:
        events += engine.evaluate(r, r.measured_at)
    return events


@pytest.mark.parametrize(
    ("bpm", "score"),
    [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2),
     (130, 2), (131, 3), (0, 3), (250, 3), (40.5, 1), (40.49, 3), (130.5, 3),
     (50.5, 0), (90.5, 1)],
)  # fmt: skip
def test_heart_rate_bands_follow_news2(bpm: int, score: int) -> None:
    assert news2.heart_rate_score(bpm) == score


@pytest.mark.parametrize(
    ("spo2", "score"),
    [
        (91, 3),
        (92, 2),
        (93, 2),
        (94, 1),
        (95, 1),
        (96, 0),
        (100, 0),
        (91.5, 2),
        (95.5, 0),
    ],
)
def test_spo2_bands_follow_news2_scale_1(spo2: int, score: int) -> None:
    assert news2.spo2_score(spo2) == score


@pytest.mark.parametrize(
    ("temp", "score"),
    [(35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1),
     (39.1, 2), (41.0, 2), (35.05, 1), (35.04, 3), (39.05, 2)],
)  # fmt: skip
def test_temperature_bands_follow_news2(temp: float, score: int) -> None:
    assert news2.temperature_score(temp) == score


def test_condition_must_persist_before_it_raises() -> None:
    engine = RuleEngine(PatientRules(persistence_s=60))
    assert feed(engine, [hr(140, t) for t in range(0, 60, 10)]) == []
    (event,) = feed(engine, [hr(140, 60)])
    assert event.action is Action.RAISE
    assert event.priority is Priority.HIGH
    assert event.category is Category.PHYSIOLOGICAL
    assert event.condition == f"{P}/heart_rate"
    assert [e.value for e in event.evidence] == [140] * 4
    assert "NEWS2" in event.reason and "140" in event.reason


def test_a_short_spike_never_raises() -> None:
    engine = RuleEngine(PatientRules(persistence_s=60))
    seq = [hr(140, 0), hr(140, 30), hr(75, 50), hr(140, 70), hr(140, 100)]
    assert feed(engine, seq) == []


def test_priority_is_the_level_that_held_throughout() -> None:
    engine = RuleEngine(PatientRules(persistence_s=60))
    (event,) = feed(engine, [hr(135, 0), hr(120, 30), hr(140, 60)])
    assert event.priority is Priority.MEDIUM


def test_min_score_filters_low_scores() -> None:
    engine = RuleEngine(PatientRules(persistence_s=0, min_score=2))
    assert feed(engine, [hr(100, 0), hr(100, 10)]) == []
    (event,) = feed(engine, [hr(115, 20)])
    assert event.priority is Priority.MEDIUM


def test_hysteresis_and_clear_delay() -> None:
    engine = RuleEngine(PatientRules(persistence_s=0, clear_after_s=60))
    (raised,) = feed(engine, [hr(135, 0)])
    # 88 bpm scores 0, but 88 + 5 bpm of hysteresis would score 1: not clear yet.
    assert feed(engine, [hr(88, t) for t in range(10, 200, 10)]) == []
    assert feed(engine, [hr(80, 200), hr(80, 230)]) == []
    (cleared,) = feed(engine, [hr(80, 260)])
    assert cleared.action is Action.CLEAR and cleared.condition == raised.condition


def test_upgrade_raises_again_at_the_higher_priority() -> None:
    engine = RuleEngine(PatientRules(persistence_s=0))
    first = feed(engine, [hr(115, 0)])
    second = feed(engine, [hr(140, 10)])
    assert [e.priority for e in first + second] == [Priority.MEDIUM, Priority.HIGH]


def test_hr_zero_is_technical_never_bradycardia() -> None:
    engine = RuleEngine(PatientRules(persistence_s=0, technical_persistence_s=30))
    events = feed(engine, [hr(0, t, Quality.NO_READING) for t in range(0, 120, 10)])
    assert [(e.category, e.action) for e in events] == [
        (Category.TECHNICAL, Action.RAISE)
    ]
    assert "no measurement" in events[0].reason
    (cleared,) = feed(engine, [hr(70, 130)])
    assert cleared.category is Category.TECHNICAL and cleared.action is Action.CLEAR


def test_unflagged_zero_is_still_no_reading() -> None:
    engine = RuleEngine(PatientRules(persistence_s=0, technical_persistence_s=0))
    (event,) = feed(engine, [hr(0, 0)])
    assert event.category is Category.TECHNICAL


def test_contact_lost_is_technical_even_with_a_plausible_value() -> None:
    engine = RuleEngine(PatientRules(persistence_s=0, technical_persistence_s=0))
    (event,) = feed(engine, [hr(30, 0, Quality.CONTACT_LOST)])
    assert event.category is Category.TECHNICAL
    assert "contact" in event.reason


def test_flagged_sample_interrupts_a_pending_condition() -> None:
    engine = RuleEngine(PatientRules(persistence_s=60, technical_persistence_s=600))
    seq = [hr(30, 0), hr(0, 30, Quality.NO_READING), hr(30, 60), hr(30, 90)]
    assert feed(engine, seq) == []


def test_stale_stream_raises_once_and_clears_when_data_returns() -> None:
    engine = RuleEngine(PatientRules(stale_after_s=120))
    feed(engine, [hr(70, 0)])
    assert engine.tick(100) == []
    (stale,) = engine.tick(121)
    assert stale.category is Category.TECHNICAL and stale.priority is Priority.MEDIUM
    assert stale.device_id == "strap-1" and stale.condition.endswith("/stale")
    assert engine.tick(500) == []
    (back,) = engine.evaluate(hr(72, 600), 600)
    assert back.action is Action.CLEAR and back.condition == stale.condition


def test_disconnected_is_its_own_alarm_not_also_stale() -> None:
    engine = RuleEngine(PatientRules(stale_after_s=30))
    feed(engine, [hr(70, 0)])
    assert engine.link_state("strap-1", P, connected=False, at=5) == []
    assert engine.tick(20) == []
    (down,) = engine.tick(36)
    assert down.condition == f"{P}/strap-1/disconnected"
    assert down.category is Category.TECHNICAL and down.action is Action.RAISE
    assert engine.tick(500) == []  # no "no data" alarm on top of it
    (back,) = engine.link_state("strap-1", P, connected=True, at=600)
    assert back.action is Action.CLEAR and back.condition == down.condition
    (stale,) = engine.tick(631)  # connected, silent: now that is "no data"
    assert stale.condition.endswith("/stale")


def test_a_short_drop_raises_nothing() -> None:
    engine = RuleEngine(PatientRules(stale_after_s=30))
    feed(engine, [hr(70, 0)])
    engine.link_state("strap-1", P, connected=False, at=5)
    assert engine.link_state("strap-1", P, connected=True, at=15) == []
    assert engine.tick(40) == []


def test_a_data_gap_restarts_persistence() -> None:
    engine = RuleEngine(PatientRules(persistence_s=60, stale_after_s=120))
    assert feed(engine, [hr(140, 0), hr(140, 300)]) == []


def test_per_patient_overrides() -> None:
    engine = RuleEngine(
        PatientRules(persistence_s=600), patients={P: PatientRules(persistence_s=0)}
    )
    assert len(feed(engine, [hr(140, 0)])) == 1
    other = Reading("strap-2", Kind.HEART_RATE, 140, 0, patient_ref="p-2")
    assert engine.evaluate(other, 0) == []


def room(kind: Kind, value: float, at: float) -> Reading:
    return Reading(f"r1-{kind}", kind, value, at, room="r1")


def test_room_temperature_out_of_band_with_persistence() -> None:
    engine = RuleEngine(rooms=RoomRules(temperature_high=26, persistence_s=300))
    seq = [room(Kind.ROOM_TEMPERATURE, 26.4, t) for t in range(0, 300, 30)]
    assert feed(engine, seq) == []
    (event,) = feed(engine, [room(Kind.ROOM_TEMPERATURE, 26.4, 300)])
    assert event.category is Category.ENVIRONMENTAL and event.room == "r1"
    assert "above 26" in event.reason


def test_no_motion_while_present() -> None:
    engine = RuleEngine(rooms=RoomRules(no_motion_after_s=300))
    feed(engine, [room(Kind.OCCUPANCY, 1, 0), room(Kind.MOTION, 1, 0)])
    quiet = [room(Kind.MOTION, 0, t) for t in range(30, 300, 30)]
    assert feed(engine, quiet) == []
    (event,) = feed(engine, [room(Kind.MOTION, 0, 300)])
    assert event.action is Action.RAISE and event.condition == "r1/no_motion"
    (cleared,) = feed(engine, [room(Kind.MOTION, 1, 330)])
    assert cleared.action is Action.CLEAR


def test_no_motion_in_an_empty_room_is_fine() -> None:
    engine = RuleEngine(rooms=RoomRules(no_motion_after_s=300))
    seq = [room(Kind.OCCUPANCY, 0, 0)] + [
        room(Kind.MOTION, 0, t) for t in range(0, 3000, 30)
    ]
    assert feed(engine, seq) == []


@given(
    st.lists(
        st.tuples(
            st.one_of(st.just(0.0), st.floats(0, 300, allow_nan=False)),
            st.sampled_from([0, 1, 2, 8]),
        ),
        max_size=200,
    )
)
def test_events_alternate_per_condition(samples: list[tuple[float, int]]) -> None:
    """Property: per condition, raises and clears alternate; never two clears in a row
    and a clear never comes first; physiological alarms never come from flagged data."""
    engine = RuleEngine(PatientRules(persistence_s=20, clear_after_s=20))
    state: dict[str, int] = {}
    for i, (value, flag) in enumerate(samples):
        for e in engine.evaluate(hr(value, i * 10.0, Quality(flag)), i * 10.0):
            level = int(e.priority) if e.action is Action.RAISE else 0
            if e.action is Action.CLEAR:
                assert state.get(e.condition, 0) > 0
            else:
                assert level > state.get(e.condition, 0)
            state[e.condition] = level
            if e.category is Category.PHYSIOLOGICAL and e.action is Action.RAISE:
                assert all(ev.value > 0 for ev in e.evidence)
