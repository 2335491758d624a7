"""Score each wearer's RR windows with the installed model as beats arrive.

The scorer keeps the last `WINDOW_BEATS` clean RR intervals per device. When a
window is complete (and then every `stride` beats) its features go through the
TFLite model, and the score comes back as a `Kind.RHYTHM_SCORE` reading of the
same patient, stamped at the window's last beat. That reading is stored and goes
through the rules like any other, so an "irregular rhythm" alarm gets the same
persistence, hysteresis, de-duplication and escalation as a heart-rate alarm.

A gap in the beats (lost contact, a dropped notification) or a flagged RR reading
empties the device's window: no window spans a gap, as in training.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.learning.dataset import GAP_TOLERANCE_S
from gateway.litert import CURRENT, Scorer
from gateway.readings import Kind, Reading
from models import features

log = logging.getLogger(__name__)

DEFAULT_STRIDE = 4
"""Beats between scored windows: a score every ~3 s at 70 bpm."""


@dataclass(slots=True)
class _Beats:
    times: deque[float] = field(
        default_factory=lambda: deque(maxlen=features.WINDOW_BEATS)
    )
    rr_ms: deque[float] = field(
        default_factory=lambda: deque(maxlen=features.WINDOW_BEATS)
    )
    since_scored: int = 0


class RhythmScorer:
    """Turns RR readings into rhythm-score readings with one .tflite model.

    Args:
        scorer: The loaded model.
        stride: Score every this many beats once a window is full.
    """

    def __init__(self, scorer: Scorer, stride: int = DEFAULT_STRIDE) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.scorer = scorer
        self.stride = stride
        self.scored = 0
        self._devices: dict[str, _Beats] = {}

    @classmethod
    def from_models_dir(
        cls, models_dir: Path, fallback: Path, stride: int = DEFAULT_STRIDE
    ) -> RhythmScorer:
        """The scorer of `current.tflite` in `models_dir`, else of `fallback`.

        Raises:
            ModelError: The model cannot be loaded.
        """
        current = Path(models_dir) / CURRENT
        return cls(Scorer(current if current.exists() else fallback), stride)

    def swap(self, scorer: Scorer) -> None:
        """Use a newly installed model from the next window on."""
        self.scorer = scorer
        log.info("rhythm model swapped in (%s)", scorer.path.name)

    def feed(self, reading: Reading) -> Reading | None:
        """Take any reading; return a score reading when an RR window is due."""
        if reading.kind is not Kind.RR_INTERVAL or reading.patient_ref is None:
            return None
        beats = self._devices.setdefault(reading.device_id, _Beats())
        if not self._extends(beats, reading):
            beats.times.clear()
            beats.rr_ms.clear()
            beats.since_scored = 0
            if not _clean(reading):
                return None
        beats.times.append(reading.measured_at)
        beats.rr_ms.append(reading.value)
        beats.since_scored += 1
        if len(beats.rr_ms) < features.WINDOW_BEATS or beats.since_scored < self.stride:
            return None
        beats.since_scored = 0
        return self._score(beats, reading)

    def forget(self, device_id: str) -> None:
        """Drop a device's partial window (its recording ended, or it was removed)."""
        self._devices.pop(device_id, None)

    def _extends(self, beats: _Beats, r: Reading) -> bool:
        if not _clean(r) or not beats.times:
            return False
        step = r.measured_at - beats.times[-1]
        return abs(step - r.value / 1000.0) <= GAP_TOLERANCE_S

    # TODO(learning): windows are scored one at a time, and numpy's features of a
    # single 16-beat window cost ~160 us (TFLite ~15 us): harmless at straps'
    # 1 Hz, but a flat-out replay of 20 straps spends half its time here;
    # scoring the windows due in one loop turn together would vectorise it.
    def _score(self, beats: _Beats, last: Reading) -> Reading:
        window = np.fromiter(beats.rr_ms, dtype=np.float64)
        score = float(self.scorer.score(features.features(window))[0])
        self.scored += 1
        return Reading(
            device_id=last.device_id,
            kind=Kind.RHYTHM_SCORE,
            value=score,
            measured_at=last.measured_at,
            patient_ref=last.patient_ref,
        )


def _clean(r: Reading) -> bool:
    return (
        r.is_clean
        and r.value is not None
        and bool(np.isfinite(r.value))
        and r.value > 0
    )
