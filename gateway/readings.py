"""The one record every source produces: a typed, pseudonymous `Reading`."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    """What a reading measures; each kind has one canonical unit (`UNITS`)."""

    HEART_RATE = "heart_rate"
    RR_INTERVAL = "rr_interval"
    SPO2 = "spo2"
    PULSE_RATE = "pulse_rate"
    BODY_TEMPERATURE = "body_temperature"
    ROOM_TEMPERATURE = "room_temperature"
    HUMIDITY = "humidity"
    CO2 = "co2"
    LIGHT = "light"
    MOTION = "motion"
    OCCUPANCY = "occupancy"
    SYSTOLIC_PRESSURE = "systolic_pressure"
    DIASTOLIC_PRESSURE = "diastolic_pressure"
    MEAN_ARTERIAL_PRESSURE = "mean_arterial_pressure"
    GLUCOSE = "glucose"
    BATTERY = "battery"
    ENERGY_EXPENDED = "energy_expended"
    RHYTHM_SCORE = "rhythm_score"
    """The on-device model's score of an RR window (0-1): derived, not measured."""


UNITS: dict[Kind, str] = {
    Kind.HEART_RATE: "bpm",
    Kind.RR_INTERVAL: "ms",
    Kind.SPO2: "%",
    Kind.PULSE_RATE: "bpm",
    Kind.BODY_TEMPERATURE: "Cel",
    Kind.ROOM_TEMPERATURE: "Cel",
    Kind.HUMIDITY: "%RH",
    Kind.CO2: "ppm",
    Kind.LIGHT: "lx",
    Kind.MOTION: "1",
    Kind.OCCUPANCY: "1",
    Kind.SYSTOLIC_PRESSURE: "mmHg",
    Kind.DIASTOLIC_PRESSURE: "mmHg",
    Kind.MEAN_ARTERIAL_PRESSURE: "mmHg",
    Kind.GLUCOSE: "mmol/L",
    Kind.BATTERY: "%",
    Kind.ENERGY_EXPENDED: "kJ",
    Kind.RHYTHM_SCORE: "1",
}


class Quality(enum.IntFlag):
    """Technical conditions that travel with a reading.

    A reading carrying any of these flags says something about the sensor, not the
    patient: rules turn them into technical alarms and never into physiological ones.
    """

    OK = 0
    CONTACT_LOST = 1
    """The wearable supports skin-contact detection and reports no contact."""
    SENSOR_NAN = 2
    """The sensor reported a value that is not a number (IEEE-11073 NaN, NRes...)."""
    CLOCK_UNSYNCED = 4
    """`measured_at` is monotonic time; it is re-stamped once the clock is synced."""
    NO_READING = 8
    """The device sent a zero meaning "no measurement" (HR 0, SpO2 0: sensor off)."""


TECHNICAL = Quality.CONTACT_LOST | Quality.SENSOR_NAN | Quality.NO_READING


@dataclass(frozen=True, slots=True)
class Reading:
    """One measurement, as every source hands it to the pipeline.

    Attributes:
        device_id: The sensor that measured it (BLE address, MQTT sensor id, replay id).
        kind: What was measured.
        value: The value in the kind's canonical unit (`UNITS`).
        measured_at: When it was measured, seconds since the Unix epoch.
        patient_ref: Pseudonymous patient reference, for wearables.
        room: Room reference, for room sensors (and patients' rooms).
        quality: Technical flags; `Quality.OK` when the reading is clean.
    """

    device_id: str
    kind: Kind
    value: float
    measured_at: float
    patient_ref: str | None = None
    room: str | None = None
    quality: Quality = Quality.OK

    @property
    def unit(self) -> str:
        """The canonical unit of this reading's kind."""
        return UNITS[self.kind]

    @property
    def is_clean(self) -> bool:
        """True when no technical flag is set."""
        return not (self.quality & TECHNICAL)
