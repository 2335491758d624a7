"""Training windows from the store: RR readings plus label spans."""

import math
from pathlib import Path

import numpy as np
import pytest

from gateway.learning import dataset
from gateway.readings import Kind, Quality, Reading
from gateway.store import LabelSpan, ReadingStore
from models import features

MITDB = Path(__file__).resolve().parents[1] / "sensors" / "data" / "mitdb"
START = 1_700_000_000.0


def _rr(at: float, ms: float, quality: Quality = Quality.OK) -> Reading:
    return Reading(
        device_id="strap-1",
        kind=Kind.RR_INTERVAL,
        value=ms,
        measured_at=at,
        patient_ref="p-1",
        quality=quality,
    )


def _beats(n: int, rr_ms: float = 800.0, t0: float = START) -> list[Reading]:
    return [_rr(t0 + (i + 1) * rr_ms / 1000.0, rr_ms) for i in range(n)]


@pytest.mark.parametrize("record", ["100", "105"])
def test_imported_record_gives_the_reference_windows_and_labels(tmp_path, record):
    store_file = tmp_path / "store.db"
    n = dataset.import_annotated_record(
        store_file,
        "p-1",
        "strap-1",
        MITDB / f"{record}_all.csv",
        MITDB / f"{record}_pvc.csv",
        START,
    )
    x, y = dataset.training_set(store_file, ["p-1"])
    ref_x, ref_y = features.record_dataset(MITDB, record)
    assert n == len(features.load_beats(MITDB / f"{record}_all.csv")) - 1
    assert x.shape == ref_x.shape
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_allclose(x, ref_x, atol=1e-5)


def test_a_gap_or_a_flagged_beat_breaks_windows():
    beats = _beats(40)
    # Beat 20 flagged contact-lost; beats after 30 arrive after a 5 s silence.
    beats[20] = _rr(beats[20].measured_at, 800.0, Quality.CONTACT_LOST)
    beats[30:] = [_rr(r.measured_at + 5.0, r.value) for r in beats[30:]]
    w = dataset.rr_windows(beats)
    # Runs: beats 0-19 (20 beats: 5 windows), 21-29 (9: none), 30-39 (10: none).
    assert len(w) == 5
    assert w.first_beat[0] == beats[0].measured_at
    assert w.last_beat[-1] == beats[19].measured_at


def test_labels_positive_wins_negative_needs_cover_rest_unlabelled():
    beats = _beats(40)
    w = dataset.rr_windows(beats)
    assert len(w) == 25
    t = [b.measured_at for b in beats]
    spans = [
        LabelSpan("p-1", t[0] - 0.1, t[29] + 0.1, False, "annotation"),
        LabelSpan("p-1", t[5] - 0.1, t[5] + 0.1, True, "annotation"),
    ]
    labels = dataset.window_labels(w, spans)
    # Windows 0..5 hold beat 5; 6..14 lie inside the negative span; 15.. reach
    # past beat 29 and are unlabelled.
    assert labels[:6].tolist() == [1.0] * 6
    assert labels[6:15].tolist() == [0.0] * 9
    assert all(math.isnan(v) for v in labels[15:])


def test_training_set_only_reads_the_given_patients(tmp_path):
    store_file = tmp_path / "store.db"
    for ref, record in (("p-a", "100"), ("p-b", "105")):
        dataset.import_annotated_record(
            store_file,
            ref,
            f"strap-{ref}",
            MITDB / f"{record}_all.csv",
            MITDB / f"{record}_pvc.csv",
            START,
        )
    x_a, _ = dataset.training_set(store_file, ["p-a"])
    x_ab, _ = dataset.training_set(store_file, ["p-a", "p-b"])
    x_none, y_none = dataset.training_set(store_file, [])
    assert len(x_a) == len(features.record_dataset(MITDB, "100")[0])
    assert len(x_ab) == len(x_a) + len(features.record_dataset(MITDB, "105")[0])
    assert x_none.shape == (0, features.N_FEATURES) and y_none.shape == (0,)


def test_label_spans_round_trip_and_bad_span_refused(tmp_path):
    with ReadingStore(tmp_path / "s.db") as store:
        span = LabelSpan("p-1", 10.0, 20.0, True, "ert", "a-1")
        store.add_labels([span])
        store.add_labels([span])  # same key: replaced, not doubled
        assert store.labels("p-1") == [span]
        with pytest.raises(ValueError, match="ends before it starts"):
            store.add_labels([LabelSpan("p-1", 5.0, 4.0, False, "ert")])


def _rhythm_alert(ref: str, first: float, last: float):
    import uuid

    from gateway.alarms import Category, Evidence, Priority
    from gateway.notify import Alert

    return Alert(
        id=uuid.uuid4().hex,
        condition=f"{ref}/rhythm_score",
        priority=Priority.LOW,
        category=Category.PHYSIOLOGICAL,
        patient_ref=ref,
        label=None,
        room=None,
        device_id="strap-1",
        reason="Irregular rhythm",
        evidence=(
            Evidence(Kind.RHYTHM_SCORE, 0.9, "1", first),
            Evidence(Kind.RHYTHM_SCORE, 0.95, "1", last),
        ),
        raised_at=last,
    )


def test_ert_verdicts_on_rhythm_alerts_become_label_spans(tmp_path):
    from gateway.outbox import Outbox

    with Outbox(tmp_path / "outbox.db") as outbox:
        confirmed = _rhythm_alert("p-1", START + 10, START + 40)
        refuted = _rhythm_alert("p-2", START + 100, START + 130)
        unanswered = _rhythm_alert("p-3", START + 200, START + 230)
        for alert in (confirmed, refuted, unanswered):
            outbox.insert(alert, ["mqtt"], START)
        outbox.acknowledge(confirmed.id, START + 50, "nurse", "true_alarm")
        outbox.acknowledge(refuted.id, START + 140, "nurse", "false_alarm")
        outbox.acknowledge(unanswered.id, START + 240, "nurse", None)
        spans = dataset.ert_labels(outbox.list_alerts())
    by_ref = {s.patient_ref: s for s in spans}
    assert set(by_ref) == {"p-1", "p-2"}
    assert by_ref["p-1"] == LabelSpan(
        "p-1", START + 10, START + 40, True, "ert", confirmed.id
    )
    assert by_ref["p-2"].positive is False
    assert (by_ref["p-2"].start, by_ref["p-2"].end) == (START + 100, START + 130)
