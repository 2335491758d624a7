"""Training windows from the gateway's own store: RR readings plus label spans.

A window is `models.features.WINDOW_BEATS` consecutive RR intervals of one patient
with no gap between them. It holds the beats that end those intervals, and it is
labelled from the store's label spans (see `gateway.store.LabelSpan`):

- positive when a positive span (a ventricular ectopic beat from the reference
  annotations, or an alert the ERT confirmed) touches any of its beats;
- negative when it lies inside a negative span (an annotated stretch, or an alert
  the ERT called a false alarm) and touches no positive one;
- unlabelled otherwise, and then it is not used for training.

The windows are derived from the readings whenever they are needed, so forgetting
a patient's readings forgets their windows too. Only numpy is imported here: the
agent builds training sets without torch, which stays in the training child.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.outbox import AlertRecord
from gateway.readings import Kind, Reading
from gateway.store import LabelSpan, ReadingStore
from models import features

log = logging.getLogger(__name__)

BEAT_TOLERANCE_S = 0.1
"""How far a labelled beat's time may be from the stored beat time (RR intervals
travel in 1/1024 s steps, so reconstructed beat times drift by a few ms)."""

GAP_TOLERANCE_S = 0.25
"""Two RR readings are consecutive beats when the later one's time is the earlier
one's plus its interval, within this; anything else is a gap (lost contact, a
dropped notification) and no window spans it."""

ANNOTATION = "annotation"
ERT = "ert"


@dataclass(frozen=True, slots=True)
class Windows:
    """One patient's RR windows.

    Attributes:
        rr_ms: Shape (n, WINDOW_BEATS), RR intervals in ms.
        first_beat: Time of each window's first beat (end of its first interval).
        last_beat: Time of each window's last beat.
    """

    rr_ms: np.ndarray
    first_beat: np.ndarray
    last_beat: np.ndarray

    def __len__(self) -> int:
        return int(self.rr_ms.shape[0])


def rr_windows(readings: Sequence[Reading], stride: int = 1) -> Windows:
    """Cut a patient's RR readings into gap-free windows, one every `stride` beats.

    Readings with a technical flag (contact lost, no reading, ...) break the run.

    Raises:
        ValueError: If stride is not positive.
    """
    times, rr = _clean_rr(readings)
    pieces = [
        _segment_windows(times[a:b], rr[a:b], stride) for a, b in _runs(times, rr)
    ]
    if not pieces:
        empty = np.empty(0)
        return Windows(np.empty((0, features.WINDOW_BEATS)), empty, empty)
    return Windows(*(np.concatenate(part) for part in zip(*pieces, strict=True)))


def window_labels(windows: Windows, spans: Iterable[LabelSpan]) -> np.ndarray:
    """Per window: 1.0 positive, 0.0 negative, NaN unlabelled (see module docs)."""
    labels = np.full(len(windows), np.nan)
    spans = list(spans)
    for span in (s for s in spans if not s.positive):
        inside = (windows.first_beat >= span.start) & (windows.last_beat <= span.end)
        labels[inside] = 0.0
    for span in (s for s in spans if s.positive):
        touches = (windows.first_beat <= span.end) & (windows.last_beat >= span.start)
        labels[touches] = 1.0
    return labels


def patient_set(
    store: ReadingStore, ref: str, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one patient's labelled windows.

    Returns:
        (X float32 (n, N_FEATURES), y float32 (n,)), unlabelled windows left out.

    Raises:
        StoreError: The store cannot be read.
    """
    windows = rr_windows(store.readings(patient_ref=ref, kind=Kind.RR_INTERVAL), stride)
    labels = window_labels(windows, store.labels(ref))
    keep = ~np.isnan(labels)
    x = features.features(windows.rr_ms[keep]) if keep.any() else _no_features()
    return x, labels[keep].astype(np.float32)


def training_set(
    store_path: Path, refs: Iterable[str], stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled windows of these patients (those consenting to training).

    Returns:
        (X float32 (n, N_FEATURES), y float32 (n,)); empty arrays when none.

    Raises:
        StoreError: The store cannot be read.
    """
    return joined(training_parts(store_path, refs, stride))


def joined(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """All patients' windows in one training set (empty arrays when none)."""
    if not parts:
        return _no_features(), np.empty(0, dtype=np.float32)
    x = np.concatenate([p[0] for p in parts.values()]).astype(np.float32)
    y = np.concatenate([p[1] for p in parts.values()]).astype(np.float32)
    log.info("training set: %d windows of %d patients", len(y), len(parts))
    return x, y


def training_parts(
    store_path: Path, refs: Iterable[str], stride: int = 1
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per patient with at least one labelled window: their features and labels.

    Raises:
        StoreError: The store cannot be read.
    """
    store = ReadingStore(Path(store_path))
    parts = {ref: patient_set(store, ref, stride) for ref in sorted(set(refs))}
    return {ref: part for ref, part in parts.items() if len(part[1])}


def annotation_labels(
    ref: str, beats: Sequence[int], pvc: Sequence[int], *, start: float
) -> list[LabelSpan]:
    """Label spans from a record's reference beat annotations (360 Hz samples).

    The annotated stretch, from the first to the last beat, is one negative span;
    each ventricular ectopic beat is a short positive span around its time.
    """
    fs = features.DEFAULT_FS
    if len(beats) < 2:
        return []
    tol = BEAT_TOLERANCE_S
    covered = LabelSpan(
        ref,
        start + beats[0] / fs - tol,
        start + beats[-1] / fs + tol,
        False,
        ANNOTATION,
    )
    ectopic = [
        LabelSpan(ref, start + v / fs - tol, start + v / fs + tol, True, ANNOTATION)
        for v in pvc
    ]
    return [covered, *ectopic]


def ert_labels(records: Iterable[AlertRecord]) -> list[LabelSpan]:
    """Label spans from the ERT's verdicts on irregular-rhythm alerts.

    A confirmed alert ("true_alarm") makes the stretch its evidence covers
    positive; a false alarm makes it negative. Other alerts label nothing.
    """
    spans = []
    for record in records:
        alert = record.alert
        if (
            record.outcome is None
            or alert.patient_ref is None
            or not alert.condition.endswith(f"/{Kind.RHYTHM_SCORE}")
            or not alert.evidence
        ):
            continue
        times = [e.measured_at for e in alert.evidence]
        spans.append(
            LabelSpan(
                alert.patient_ref,
                min(times),
                max(times),
                record.outcome == "true_alarm",
                ERT,
                alert.id,
            )
        )
    return spans


def import_annotated_record(
    store_path: Path,
    ref: str,
    device: str,
    all_csv: Path,
    pvc_csv: Path,
    start: float,
) -> int:
    """Write a MIT-BIH record's RR intervals and beat labels into a store file.

    For evaluation, tests and the federated demo: the RR readings are stamped at
    their beats' times as a strap's would be, the labels come from the reference
    annotations.

    Returns:
        The number of RR readings written.

    Raises:
        StoreError: The store cannot be opened or written.
        ValueError: The annotation files are malformed.
    """
    beats = features.load_beats(all_csv)
    pvc = features.load_beats(pvc_csv)
    rr = features.rr_from_beats(beats)
    times = start + beats[1:] / features.DEFAULT_FS
    readings = [
        Reading(
            device_id=device,
            kind=Kind.RR_INTERVAL,
            value=float(value),
            measured_at=float(at),
            patient_ref=ref,
        )
        for at, value in zip(times, rr, strict=True)
    ]
    with ReadingStore(Path(store_path)) as store:
        store.put_many(readings)
        store.flush_sync()
        store.add_labels(
            annotation_labels(ref, beats.tolist(), pvc.tolist(), start=start)
        )
    return len(readings)


def _clean_rr(readings: Sequence[Reading]) -> tuple[np.ndarray, np.ndarray]:
    good = [
        (r.measured_at, r.value)
        for r in readings
        if r.kind is Kind.RR_INTERVAL
        and r.is_clean
        and r.value is not None
        and np.isfinite(r.value)
        and r.value > 0
    ]
    if not good:
        return np.empty(0), np.empty(0)
    times, rr = np.array(good, dtype=np.float64).T
    return times, rr


def _runs(times: np.ndarray, rr: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges of gap-free runs of beats."""
    if times.size == 0:
        return []
    step_ok = np.abs(np.diff(times) - rr[1:] / 1000.0) <= GAP_TOLERANCE_S
    breaks = np.flatnonzero(~step_ok) + 1
    edges = [0, *breaks.tolist(), times.size]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def _segment_windows(
    times: np.ndarray, rr: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    windows = features.windows_from_rr(rr, stride)
    n = windows.shape[0]
    first = times[: times.size - features.WINDOW_BEATS + 1 : stride][:n]
    last = times[features.WINDOW_BEATS - 1 :: stride][:n]
    return windows, first, last


def _no_features() -> np.ndarray:
    return np.empty((0, features.N_FEATURES), dtype=np.float32)
