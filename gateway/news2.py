"""NEWS2 single-parameter scores for the three parameters a gateway can see.

Royal College of Physicians, National Early Warning Score (NEWS) 2, 2017, chart 1.
Values are rounded half up to the chart's resolution (1 bpm, 1 %, 0.1 Cel) before
banding, as a monitor displays them (40.5 bpm shows as 41, not as 40). A gateway sees
heart rate, SpO2 and temperature: 3 of the 7 parameters, so any aggregate it forms is
partial and must be labelled so.

>>> heart_rate_score(131), heart_rate_score(110.4), heart_rate_score(50.6)
(3, 1, 0)
>>> heart_rate_score(40.5), heart_rate_score(130.5)
(1, 3)
>>> spo2_score(91.9), spo2_score(95)
(2, 1)
>>> temperature_score(35.04), temperature_score(39.1)
(3, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gateway.readings import Kind


def heart_rate_score(bpm: float) -> int:
    """NEWS2 score of a pulse rate: <=40 or >=131: 3; 111-130: 2; 41-50, 91-110: 1."""
    v = _half_up(bpm)
    if v <= 40 or v >= 131:
        return 3
    if v >= 111:
        return 2
    if v <= 50 or v >= 91:
        return 1
    return 0


def spo2_score(percent: float) -> int:
    """NEWS2 score of SpO2 on scale 1: <=91: 3; 92-93: 2; 94-95: 1."""
    v = _half_up(percent)
    if v <= 91:
        return 3
    if v <= 93:
        return 2
    if v <= 95:
        return 1
    return 0


def temperature_score(celsius: float) -> int:
    """NEWS2 score of a temperature: <=35.0: 3; >=39.1: 2; 35.1-36.0, 38.1-39.0: 1."""
    v = _half_up(celsius * 10) / 10
    if v <= 35.0:
        return 3
    if v >= 39.1:
        return 2
    if v <= 36.0 or v >= 38.1:
        return 1
    return 0


def _half_up(value: float) -> int:
    # Python's round() goes half to even (round(40.5) == 40): not what a display
    # does. The inner round() absorbs binary noise such as 35.05 * 10 == 350.4999...
    return math.floor(round(value, 6) + 0.5)


SCORES: dict[Kind, Callable[[float], int]] = {
    Kind.HEART_RATE: heart_rate_score,
    Kind.PULSE_RATE: heart_rate_score,
    Kind.SPO2: spo2_score,
    Kind.BODY_TEMPERATURE: temperature_score,
}

NORMAL: dict[Kind, float] = {
    Kind.HEART_RATE: 70.0,
    Kind.PULSE_RATE: 70.0,
    Kind.SPO2: 100.0,
    Kind.BODY_TEMPERATURE: 37.0,
}
"""The middle of each parameter's score-0 band: which side of it a value lies on
tells whether an alarm is "high" or "low"."""
