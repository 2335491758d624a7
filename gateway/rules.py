"""Emergency rules: per-stream state that turns readings into alarm events.

Alarm fatigue is the main risk, so every condition goes through the same gate:
it must hold for a persistence delay before it is raised, and it clears only after
the value has been back inside its band, by a hysteresis margin, for a while.
Physiological alarms (NEWS2 single-parameter bands) are kept apart from technical
ones (stale stream, HR 0, contact lost, sensor NaN) and from room conditions.

The engine is pure: no I/O, no clock of its own. `evaluate()` is called per reading
with the time it arrived; `tick()` with the current time finds what silence means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from gateway import news2
from gateway.alarms import Action, AlarmEvent, Category, Evidence, Priority
from gateway.readings import Kind, Quality, Reading

_MAX_EVIDENCE = 4

_LABELS = {
    Kind.HEART_RATE: ("Heart rate", "bpm"),
    Kind.PULSE_RATE: ("Pulse rate", "bpm"),
    Kind.SPO2: ("SpO2", "%"),
    Kind.BODY_TEMPERATURE: ("Temperature", "°C"),
    Kind.ROOM_TEMPERATURE: ("Room temperature", "°C"),
}

_ZERO_MEANS_NO_READING = frozenset({Kind.HEART_RATE, Kind.PULSE_RATE, Kind.SPO2})

_TECHNICAL_REASONS = {
    Quality.NO_READING: "sensor off: the device reports no measurement",
    Quality.CONTACT_LOST: "no skin contact",
    Quality.SENSOR_NAN: "sensor reports a value that is not a number",
}


@dataclass(frozen=True, slots=True)
class PatientRules:
    """Settings for one patient's streams (defaults, or a patient's overrides).

    Attributes:
        persistence_s: A physiological condition must hold this long to raise.
        clear_after_s: ...and must be gone this long (past hysteresis) to clear.
        min_score: Lowest NEWS2 single-parameter score that alarms (1-3).
        hysteresis: Margin per kind a value must be back inside its band to clear.
        technical_persistence_s: Delay before a technical condition raises.
        stale_after_s: No data from a wearable for this long is a technical alarm.
        technical_priority: Priority of technical alarms (stale, sensor off...).
        stale_priority: Priority of the stale-stream alarm.
        rhythm_threshold: Model score (0-1) at or above which an RR window counts
            as irregular rhythm.
        rhythm_hysteresis: How far below the threshold scores must fall to clear.
        rhythm_persistence_s: Irregular windows must persist this long to raise.
        rhythm_priority: Priority of the irregular-rhythm alarm (low or medium:
            a screening model's score, never a diagnosis).
    """

    persistence_s: float = 60.0
    clear_after_s: float = 60.0
    min_score: int = 1
    hysteresis: Mapping[Kind, float] = field(
        default_factory=lambda: {
            Kind.HEART_RATE: 5.0,
            Kind.PULSE_RATE: 5.0,
            Kind.SPO2: 1.0,
            Kind.BODY_TEMPERATURE: 0.2,
        }
    )
    technical_persistence_s: float = 60.0
    stale_after_s: float = 120.0
    technical_priority: Priority = Priority.LOW
    stale_priority: Priority = Priority.MEDIUM
    rhythm_threshold: float = 0.8
    rhythm_hysteresis: float = 0.2
    rhythm_persistence_s: float = 30.0
    rhythm_priority: Priority = Priority.LOW


@dataclass(frozen=True, slots=True)
class RoomRules:
    """Settings for room sensors.

    Attributes:
        temperature_low: Room temperature below this alarms (Cel).
        temperature_high: Room temperature above this alarms (Cel).
        temperature_hysteresis: Margin back inside the band to clear (Cel).
        persistence_s: Delay before a room temperature condition raises.
        temperature_priority: Priority of the room temperature alarm.
        no_motion_after_s: No motion for this long while someone is present alarms.
        no_motion_priority: Priority of the no-motion alarm.
        stale_after_s: No data from a room sensor for this long is a technical alarm.
        stale_priority: Its priority.
    """

    temperature_low: float = 18.0
    temperature_high: float = 26.0
    temperature_hysteresis: float = 0.5
    persistence_s: float = 600.0
    temperature_priority: Priority = Priority.LOW
    no_motion_after_s: float = 1800.0
    no_motion_priority: Priority = Priority.MEDIUM
    stale_after_s: float = 600.0
    stale_priority: Priority = Priority.LOW


class Gate:
    """Persistence delay and hysteresis for one condition of one stream.

    `update()` takes the level a sample alarms at (0: none) and the level it would
    alarm at if it were `hysteresis` worse (which decides clearing), and returns the
    new level when the alarm rises or clears, else None.
    """

    def __init__(self, persistence_s: float, clear_after_s: float) -> None:
        self.persistence_s = persistence_s
        self.clear_after_s = clear_after_s
        self.level = 0
        self._pending_level = 0
        self._pending_since: float | None = None
        self._clear_since: float | None = None
        self.evidence: list[Evidence] = []

    def update(
        self, level: int, level_worse: int, at: float, ev: Evidence
    ) -> int | None:
        """Feed one sample; return the new level if the alarm rose or cleared."""
        if level > self.level:
            return self._rising(level, at, ev)
        self._pending_since = None
        if self.level and level_worse == 0:
            return self._clearing(at)
        self._clear_since = None
        return None

    def reset_pending(self) -> None:
        """Forget a condition still inside its persistence delay (gap, artefact)."""
        self._pending_since = None
        self._clear_since = None

    def _rising(self, level: int, at: float, ev: Evidence) -> int | None:
        self._clear_since = None
        if self._pending_since is None:
            self._pending_since, self._pending_level = at, level
            self.evidence = [ev]
        else:
            self._pending_level = min(self._pending_level, level)
            self.evidence = [*self.evidence[-(_MAX_EVIDENCE - 1) :], ev]
        if at - self._pending_since < self.persistence_s:
            return None
        self.level, self._pending_since = self._pending_level, None
        return self.level

    def _clearing(self, at: float) -> int | None:
        if self._clear_since is None:
            self._clear_since = at
        if at - self._clear_since < self.clear_after_s:
            return None
        self.level, self._clear_since = 0, None
        return 0


@dataclass(slots=True)
class _Stream:
    """What the engine knows of one device."""

    patient_ref: str | None
    room: str | None
    last_seen: float
    stale: bool = False
    last_at: dict[Kind, float] = field(default_factory=dict)
    down_since: float | None = None
    down_alarm: bool = False


@dataclass(slots=True)
class _Room:
    present: bool = False
    present_since: float | None = None
    last_motion: float | None = None
    alarmed: bool = False


class RuleEngine:
    """Per-patient, per-device and per-room state; readings in, alarm events out.

    Args:
        defaults: Rules for patients without overrides.
        patients: Per-patient overrides, by patient ref.
        rooms: Room-sensor rules.
    """

    def __init__(
        self,
        defaults: PatientRules | None = None,
        patients: Mapping[str, PatientRules] | None = None,
        rooms: RoomRules | None = None,
    ) -> None:
        self.defaults = defaults or PatientRules()
        self.patients = dict(patients or {})
        self.rooms_rules = rooms or RoomRules()
        self._gates: dict[str, Gate] = {}
        self._streams: dict[str, _Stream] = {}
        self._rooms: dict[str, _Room] = {}

    def rules_for(self, patient_ref: str | None) -> PatientRules:
        """The rules that apply to a patient (overrides, else defaults)."""
        return self.patients.get(patient_ref or "", self.defaults)

    def evaluate(self, reading: Reading, now: float) -> list[AlarmEvent]:
        """Update state with one reading that arrived at `now`; return new events."""
        events = self._seen(reading, now)
        if reading.kind in _ZERO_MEANS_NO_READING and reading.value == 0:
            # Monitors and straps send 0 for "no measurement" (DESIGN.md): whatever
            # the source flagged, it is never bradycardia or desaturation.
            reading = replace(reading, quality=reading.quality | Quality.NO_READING)
        if reading.kind in news2.SCORES:
            events += self._technical(reading)
            events += self._physiological(reading)
        elif reading.kind is Kind.RHYTHM_SCORE:
            events += self._rhythm(reading)
        elif reading.kind is Kind.ROOM_TEMPERATURE:
            events += self._technical(reading)
            events += self._room_temperature(reading)
        elif reading.kind in (Kind.MOTION, Kind.OCCUPANCY) and reading.room:
            events += self._presence(reading)
        return events

    def tick(self, now: float) -> list[AlarmEvent]:
        """Find streams that went quiet, and links down too long, by `now`."""
        events: list[AlarmEvent] = []
        for device_id, stream in self._streams.items():
            after, _ = self._staleness(stream)
            if stream.down_since is not None:
                if not stream.down_alarm and now - stream.down_since >= after:
                    stream.down_alarm = True
                    events.append(
                        self._down_event(device_id, stream, Action.RAISE, now)
                    )
            elif not stream.stale and now - stream.last_seen >= after:
                stream.stale = True
                events.append(self._stale_event(device_id, stream, Action.RAISE, now))
        return events

    def link_state(
        self, device_id: str, patient_ref: str | None, connected: bool, at: float
    ) -> list[AlarmEvent]:
        """A wearable's link went down or came back.

        A link down for `stale_after_s` is its own technical alarm ("disconnected"),
        raised by `tick()`; while it is down, silence is not also "no data".
        """
        stream = self._streams.get(device_id)
        if stream is None:
            stream = self._streams[device_id] = _Stream(patient_ref, None, at)
        if connected == (stream.down_since is None):
            return []
        events = []
        if connected:
            stream.down_since, stream.last_seen = None, at
            if stream.down_alarm:
                stream.down_alarm = False
                events.append(self._down_event(device_id, stream, Action.CLEAR, at))
        else:
            stream.down_since = at
            if stream.stale:
                stream.stale = False
                events.append(self._stale_event(device_id, stream, Action.CLEAR, at))
        return events

    def retire(self, device_id: str) -> list[AlarmEvent]:
        """Stop watching a device that was removed on purpose; clear its stale alarm."""
        stream = self._streams.pop(device_id, None)
        if stream is None or not stream.stale:
            return []
        return [self._stale_event(device_id, stream, Action.CLEAR, stream.last_seen)]

    # -- streams and technical conditions -----------------------------------------

    def _seen(self, r: Reading, now: float) -> list[AlarmEvent]:
        stream = self._streams.get(r.device_id)
        if stream is None:
            stream = self._streams[r.device_id] = _Stream(r.patient_ref, r.room, now)
        stream.last_seen = max(stream.last_seen, now)
        if not stream.stale:
            return []
        stream.stale = False
        return [self._stale_event(r.device_id, stream, Action.CLEAR, now)]

    def _staleness(self, stream: _Stream) -> tuple[float, Priority]:
        if stream.patient_ref is None and stream.room is not None:
            return self.rooms_rules.stale_after_s, self.rooms_rules.stale_priority
        rules = self.rules_for(stream.patient_ref)
        return rules.stale_after_s, rules.stale_priority

    def _stale_event(
        self, device_id: str, stream: _Stream, action: Action, at: float
    ) -> AlarmEvent:
        return self._device_event(device_id, stream, action, at, "stale")

    def _down_event(
        self, device_id: str, stream: _Stream, action: Action, at: float
    ) -> AlarmEvent:
        return self._device_event(device_id, stream, action, at, "disconnected")

    def _device_event(
        self,
        device_id: str,
        stream: _Stream,
        action: Action,
        at: float,
        condition: Literal["stale", "disconnected"],
    ) -> AlarmEvent:
        after, priority = self._staleness(stream)
        subject = stream.patient_ref or stream.room or "-"
        what = "no data from the device" if condition == "stale" else "disconnected"
        return AlarmEvent(
            condition=f"{subject}/{device_id}/{condition}",
            action=action,
            category=Category.TECHNICAL,
            priority=priority,
            reason=f"{what} for {after:.0f} s",
            at=at,
            patient_ref=stream.patient_ref,
            room=stream.room,
            device_id=device_id,
        )

    def _technical(self, r: Reading) -> list[AlarmEvent]:
        rules = self.rules_for(r.patient_ref)
        subject = r.patient_ref or r.room or "-"
        events = []
        for flag, reason in _TECHNICAL_REASONS.items():
            key = f"{subject}/{r.device_id}/{r.kind}/{flag.name.lower()}"
            gate = self._gate(key, rules.technical_persistence_s, 0.0)
            level = int(rules.technical_priority) if r.quality & flag else 0
            changed = gate.update(level, level, r.measured_at, _evidence(r))
            if changed is not None:
                name = _LABELS.get(r.kind, (r.kind.value, ""))[0]
                events.append(
                    self._event(
                        key, changed, Category.TECHNICAL, r, gate, f"{name}: {reason}"
                    )
                )
        return events

    # -- physiological conditions -------------------------------------------------

    def _physiological(self, r: Reading) -> list[AlarmEvent]:
        rules = self.rules_for(r.patient_ref)
        key = f"{r.patient_ref}/{r.kind}"
        gate = self._gate(key, rules.persistence_s, rules.clear_after_s)
        if not r.is_clean:
            # A flagged sample says nothing about the patient: it neither confirms a
            # pending condition nor counts towards clearing one.
            gate.reset_pending()
            return []
        score = news2.SCORES[r.kind]
        hyst = rules.hysteresis.get(r.kind, 0.0)
        side = 1.0 if r.value >= news2.NORMAL[r.kind] else -1.0
        level = _alarm_level(score(r.value), rules.min_score)
        worse = _alarm_level(score(r.value + side * hyst), rules.min_score)
        changed = self._gap_checked(gate, r, rules.stale_after_s, level, worse)
        if changed is None:
            return []
        return [self._event(key, changed, Category.PHYSIOLOGICAL, r, gate, None)]

    def _rhythm(self, r: Reading) -> list[AlarmEvent]:
        rules = self.rules_for(r.patient_ref)
        key = f"{r.patient_ref}/{r.kind}"
        gate = self._gate(key, rules.rhythm_persistence_s, rules.clear_after_s)
        level = int(rules.rhythm_priority) * int(r.value >= rules.rhythm_threshold)
        worse = int(rules.rhythm_priority) * int(
            r.value + rules.rhythm_hysteresis >= rules.rhythm_threshold
        )
        changed = self._gap_checked(gate, r, rules.stale_after_s, level, worse)
        if changed is None:
            return []
        reason = (
            f"Irregular rhythm: RR-window model score >= {rules.rhythm_threshold:g} "
            f"for {rules.rhythm_persistence_s:g} s (ventricular ectopy suspected; "
            "a screening score, check the patient)"
        )
        return [self._event(key, changed, Category.PHYSIOLOGICAL, r, gate, reason)]

    def _gap_checked(
        self, gate: Gate, r: Reading, max_gap: float, level: int, worse: int
    ) -> int | None:
        stream = self._streams[r.device_id]
        last = stream.last_at.get(r.kind)
        stream.last_at[r.kind] = r.measured_at
        if last is not None and r.measured_at - last > max_gap:
            gate.reset_pending()
        return gate.update(level, worse, r.measured_at, _evidence(r))

    # -- room conditions ----------------------------------------------------------

    def _room_temperature(self, r: Reading) -> list[AlarmEvent]:
        rr = self.rooms_rules
        key = f"{r.room}/{r.device_id}/room_temperature"
        gate = self._gate(key, rr.persistence_s, rr.persistence_s)
        if not r.is_clean:
            gate.reset_pending()
            return []
        hyst = rr.temperature_hysteresis
        out = _out_of(r.value, rr.temperature_low, rr.temperature_high)
        out_worse = _out_of(
            r.value + (hyst if r.value > rr.temperature_high - hyst else -hyst),
            rr.temperature_low,
            rr.temperature_high,
        )
        pri = int(rr.temperature_priority)
        changed = gate.update(pri * out, pri * out_worse, r.measured_at, _evidence(r))
        if changed is None:
            return []
        side = "above" if r.value > rr.temperature_high - hyst else "below"
        limit = rr.temperature_high if side == "above" else rr.temperature_low
        reason = f"Room temperature {side} {limit:g} °C"
        return [self._event(key, changed, Category.ENVIRONMENTAL, r, gate, reason)]

    def _presence(self, r: Reading) -> list[AlarmEvent]:
        room = self._rooms.setdefault(r.room or "-", _Room())
        if r.kind is Kind.MOTION and r.value >= 1:
            room.last_motion = r.measured_at
        elif r.kind is Kind.OCCUPANCY:
            present = r.value > 0
            if present and not room.present:
                room.present_since = r.measured_at
            room.present = present
        return self._no_motion(r, room)

    def _no_motion(self, r: Reading, room: _Room) -> list[AlarmEvent]:
        rr = self.rooms_rules
        quiet_since = max(room.last_motion or 0.0, room.present_since or 0.0)
        alarming = room.present and r.measured_at - quiet_since >= rr.no_motion_after_s
        if alarming == room.alarmed:
            return []
        room.alarmed = alarming
        return [
            AlarmEvent(
                condition=f"{r.room}/no_motion",
                action=Action.RAISE if alarming else Action.CLEAR,
                category=Category.ENVIRONMENTAL,
                priority=rr.no_motion_priority,
                reason=f"no motion for {rr.no_motion_after_s / 60:g} min "
                "while the room is occupied",
                at=r.measured_at,
                room=r.room,
                device_id=r.device_id,
            )
        ]

    # -- helpers ------------------------------------------------------------------

    def _gate(self, key: str, persistence_s: float, clear_after_s: float) -> Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = Gate(persistence_s, clear_after_s)
        return gate

    def _event(
        self,
        key: str,
        level: int,
        category: Category,
        r: Reading,
        gate: Gate,
        reason: str | None,
    ) -> AlarmEvent:
        action = Action.RAISE if level else Action.CLEAR
        priority = Priority(level) if level else Priority.LOW
        return AlarmEvent(
            condition=key,
            action=action,
            category=category,
            priority=priority,
            reason=reason or _physiological_reason(r, level),
            at=r.measured_at,
            patient_ref=r.patient_ref,
            room=r.room,
            device_id=r.device_id,
            evidence=tuple(gate.evidence),
        )


def with_overrides(base: PatientRules, **changes: object) -> PatientRules:
    """A copy of `base` with the given fields changed (None values ignored)."""
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def _alarm_level(score: int, min_score: int) -> int:
    """NEWS2 score 3: high, 2: medium, 1: low; below `min_score`: no alarm."""
    return score if score >= min_score else 0


def _out_of(value: float, low: float, high: float) -> int:
    return int(value < low or value > high)


def _evidence(r: Reading) -> Evidence:
    return Evidence(r.kind, r.value, r.unit, r.measured_at)


def _physiological_reason(r: Reading, level: int) -> str:
    name, unit = _LABELS[r.kind]
    side = "high" if r.value >= news2.NORMAL[r.kind] else "low"
    return f"{name} {side}: {r.value:g} {unit} (NEWS2 single-parameter score {level})"
