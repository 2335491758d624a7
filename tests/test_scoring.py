"""Scoring RR windows in the pipeline, and the irregular-rhythm rule."""

from pathlib import Path

import numpy as np
import pytest

from gateway.alarms import Action, Category, Priority
from gateway.learning import dataset
from gateway.litert import Scorer
from gateway.readings import Kind, Quality, Reading
from gateway.rules import PatientRules, RuleEngine
from gateway.scoring import RhythmScorer
from models import INITIAL_PATH, features

MITDB = Path(__file__).resolve().parents[1] / "sensors" / "data" / "mitdb"
START = 1_700_000_000.0


def _record_rr(record: str, ref: str = "p-1") -> list[Reading]:
    beats = features.load_beats(MITDB / f"{record}_all.csv")
    rr = features.rr_from_beats(beats)
    times = START + beats[1:] / features.DEFAULT_FS
    return [
        Reading("strap-1", Kind.RR_INTERVAL, float(v), float(t), patient_ref=ref)
        for t, v in zip(times, rr, strict=True)
    ]


def test_scores_equal_the_models_scores_of_the_same_windows():
    readings = _record_rr("105")[:400]
    scorer = RhythmScorer(Scorer(INITIAL_PATH), stride=4)
    scores = [s for r in readings if (s := scorer.feed(r)) is not None]
    windows = dataset.rr_windows(readings, stride=4)
    # The first score comes once 16 beats are in, then one every 4 beats.
    assert len(scores) == len(windows) == (400 - 16) // 4 + 1
    expected = Scorer(INITIAL_PATH).score(features.features(windows.rr_ms))
    got = np.array([s.value for s in scores])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [s.measured_at for s in scores] == windows.last_beat.tolist()
    assert {s.kind for s in scores} == {Kind.RHYTHM_SCORE}
    assert {s.patient_ref for s in scores} == {"p-1"}


def test_a_flagged_beat_or_a_gap_restarts_the_window():
    readings = _record_rr("100")[:40]
    readings[20] = Reading(
        "strap-1",
        Kind.RR_INTERVAL,
        readings[20].value,
        readings[20].measured_at,
        patient_ref="p-1",
        quality=Quality.CONTACT_LOST,
    )
    scorer = RhythmScorer(Scorer(INITIAL_PATH), stride=1)
    scored_at = [i for i, r in enumerate(readings) if scorer.feed(r) is not None]
    # Beats 0-15 complete a window at 15, then 16-19; beat 20 is flagged; the next
    # clean window ends at beat 21 + 15 = 36.
    assert scored_at == [15, 16, 17, 18, 19, 36, 37, 38, 39]


def _engine(**rules) -> RuleEngine:
    return RuleEngine(PatientRules(**rules))


def _score(at: float, value: float) -> Reading:
    return Reading("strap-1", Kind.RHYTHM_SCORE, value, at, patient_ref="p-1")


def test_sustained_high_score_raises_then_clears_below_the_hysteresis():
    engine = _engine(rhythm_threshold=0.8, rhythm_persistence_s=30, clear_after_s=20)
    events = []
    for t in range(0, 40, 3):  # high for 39 s
        events += engine.evaluate(_score(START + t, 0.9), START + t)
    raised = [e for e in events if e.action is Action.RAISE]
    assert len(raised) == 1
    assert raised[0].at == START + 30
    assert raised[0].priority is Priority.LOW
    assert raised[0].category is Category.PHYSIOLOGICAL
    assert "Irregular rhythm" in raised[0].reason
    # 0.7 is below the threshold but inside the hysteresis: no clearing.
    events = []
    for t in range(42, 90, 3):
        events += engine.evaluate(_score(START + t, 0.7), START + t)
    assert events == []
    for t in range(90, 120, 3):
        events += engine.evaluate(_score(START + t, 0.1), START + t)
    assert [e.action for e in events] == [Action.CLEAR]


@pytest.mark.parametrize("priority", [Priority.LOW, Priority.MEDIUM])
def test_brief_high_scores_do_not_alarm_and_priority_is_configurable(priority):
    engine = _engine(rhythm_persistence_s=30, rhythm_priority=priority)
    events = []
    for t in range(0, 300, 3):
        value = 0.95 if (t // 3) % 5 == 0 else 0.05  # one isolated ectopic window
        events += engine.evaluate(_score(START + t, value), START + t)
    assert events == []
    for t in range(300, 340, 3):
        events += engine.evaluate(_score(START + t, 0.95), START + t)
    assert [e.priority for e in events] == [priority]


def _rhythm_alarms(record: str) -> list[float]:
    scorer = RhythmScorer(Scorer(INITIAL_PATH), stride=4)
    engine = _engine(rhythm_threshold=0.8, rhythm_persistence_s=30, clear_after_s=60)
    raised = []
    for r in _record_rr(record):
        score = scorer.feed(r)
        if score is None:
            continue
        events = engine.evaluate(score, score.measured_at)
        raised += [e.at for e in events if e.action is Action.RAISE]
    return raised


@pytest.mark.parametrize("record", ["100", "123"])
def test_records_with_rare_ectopy_raise_no_rhythm_alarm(record):
    assert _rhythm_alarms(record) == []


def test_frequent_ectopy_in_record_114_raises_one_alarm_where_it_clusters():
    raised = _rhythm_alarms("114")
    assert len(raised) == 1
    pvc_times = START + features.load_beats(MITDB / "114_pvc.csv") / features.DEFAULT_FS
    before = pvc_times[(pvc_times <= raised[0]) & (pvc_times >= raised[0] - 40)]
    # At least four ventricular beats in the 40 s before the alarm, the first of
    # them more than the persistence delay earlier.
    assert len(before) >= 4
    assert raised[0] - before[0] >= 30
