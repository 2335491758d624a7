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


@pytest.mark.broker
def test_agent_scores_strap_beats_alerts_and_swaps_a_new_model(
    tmp_path, broker, monkeypatch
):
    import asyncio
    import json
    import time

    from gateway import agent as agent_module
    from gateway.agent import Agent
    from gateway.config import load_config
    from gateway.litert import install_model
    from models import tflite_template
    from tests.test_agent import ert_phone, write_config
    from tests.waiting import until

    monkeypatch.setattr(agent_module, "MODEL_CHECK_S", 0.2)
    cfg = load_config(write_config(tmp_path, broker, ["mqtt"]))
    t0 = time.time() - 2000
    beats = [
        Reading(r.device_id, r.kind, r.value, t0 + (r.measured_at - START), "p-7")
        for r in _record_rr("114")
        if r.measured_at - START < 400
    ]

    async def scenario() -> None:
        received: list[dict] = []
        phone = await ert_phone(broker, received)
        agent = Agent(cfg)
        await agent.start()
        try:
            for r in beats:
                agent.pipeline.ingest(r)
            await until(
                lambda: any("Irregular rhythm" in m["reason"] for m in received),
                what="irregular-rhythm alert",
            )
            await agent.store.flush()
            scores = agent.store.readings(patient_ref="p-7", kind=Kind.RHYTHM_SCORE)
            assert len(scores) == (len(beats) - 16) // 4 + 1
            old = agent.scorer.scorer
            # A round installs a new model; the agent swaps it in by itself.
            weights = [np.zeros((1, 20), np.float32), np.array([2.0], np.float32)]
            install_model(
                tflite_template.with_weights("linear", weights),
                cfg.path(cfg.learning.models_dir),
                known_window=np.zeros((1, 20), np.float32),
            )
            await until(lambda: agent.scorer.scorer is not old, what="model swap")
            # The new model (zero weights, bias 2) scores every window sigmoid(2).
            moved = [
                Reading("strap-new", r.kind, r.value, r.measured_at, "p-8")
                for r in beats[:16]
            ]
            score = [agent.scorer.feed(r) for r in moved][-1]
            assert score is not None
            assert score.value == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6)
        finally:
            await agent.stop()
            await phone.close()
        alert = next(m for m in received if "Irregular rhythm" in m["reason"])
        assert alert["priority"] == "low"
        assert json.dumps(alert).count("p-7") >= 1

    asyncio.run(scenario())
