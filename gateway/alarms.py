"""Alarm conditions as the rules see them, before they become alerts.

Priorities and categories follow IEC 60601-1-8: physiological alarms (about the
patient) are kept apart from technical ones (about the equipment), and each has a
priority that tells the responder how fast to act.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway.readings import Kind


class Priority(enum.IntEnum):
    """IEC 60601-1-8 alarm priority."""

    LOW = 1
    """Awareness."""
    MEDIUM = 2
    """Prompt response."""
    HIGH = 3
    """Immediate response."""

    @property
    def label(self) -> str:
        """Lower-case name, as used in topics and JSON."""
        return self.name.lower()


class Category(enum.StrEnum):
    """What an alarm is about."""

    PHYSIOLOGICAL = "physiological"
    TECHNICAL = "technical"
    ENVIRONMENTAL = "environmental"


class Action(enum.StrEnum):
    """Whether a condition started or ended."""

    RAISE = "raise"
    CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class Evidence:
    """One reading that supports an alarm (the values the ERT sees)."""

    kind: Kind
    value: float
    unit: str
    measured_at: float


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """A condition that started (after its persistence delay) or cleared.

    Attributes:
        condition: Stable key of the condition, unique per subject, e.g.
            ``"<patient_ref>/heart_rate/high"`` or ``"<room>/no_motion"``.
        action: RAISE when it starts, CLEAR when it ends (after hysteresis).
        category: Physiological, technical or environmental.
        priority: IEC 60601-1-8 priority.
        reason: One line for the responder, e.g. "Heart rate >= 131 bpm".
        at: Event time (the measurement or clock time that completed it).
        patient_ref: Pseudonymous patient reference, if about a patient.
        room: Room reference, if about a room.
        device_id: The device concerned, for technical alarms.
        evidence: Readings that support it, oldest first.
        detected_at: The gateway's clock when the rules produced it (set by the
            pipeline); alerts are raised and cleared at this time, not when the
            alert manager gets to the event.
    """

    condition: str
    action: Action
    category: Category
    priority: Priority
    reason: str
    at: float
    patient_ref: str | None = None
    room: str | None = None
    device_id: str | None = None
    evidence: tuple[Evidence, ...] = field(default=())
    detected_at: float | None = None
