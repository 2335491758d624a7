"""What an alert looks like on the way out, and the notifiers that carry it.

A target is a string: ``"mqtt"`` means the ERT's MQTT topics, anything else is an
apprise URL (ntfy, Pushover, Gotify, an SMS gateway...). Target URLs carry tokens,
so logs only ever show `redact(target)`.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlsplit

from gateway.alarms import AlarmEvent, Category, Evidence, Priority
from gateway.errors import DeliveryError
from gateway.paho import MqttLink

MQTT_TARGET = "mqtt"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as the ERT receives it.

    Attributes:
        id: uuid4 hex; the ERT acknowledges by it and removes duplicates with it.
        condition: The rules' condition key that raised it.
        priority: IEC 60601-1-8 priority.
        category: Physiological, technical or environmental.
        patient_ref: Pseudonymous patient reference, if about a patient.
        label: What responders call the patient or bed (site-provided), if known.
        room: Room reference, if known.
        device_id: The device concerned, for technical alarms.
        reason: One line for the responder.
        evidence: The readings that support it, oldest first.
        raised_at: When the condition was raised (clock time, epoch seconds).
        escalation: True when this copy goes to the escalation targets.
    """

    id: str
    condition: str
    priority: Priority
    category: Category
    patient_ref: str | None
    label: str | None
    room: str | None
    device_id: str | None
    reason: str
    evidence: tuple[Evidence, ...]
    raised_at: float
    escalation: bool = False

    @classmethod
    def from_event(cls, event: AlarmEvent, alert_id: str, label: str | None) -> Alert:
        """The alert for a RAISE event."""
        return cls(
            id=alert_id,
            condition=event.condition,
            priority=event.priority,
            category=event.category,
            patient_ref=event.patient_ref,
            label=label,
            room=event.room,
            device_id=event.device_id,
            reason=event.reason,
            evidence=event.evidence,
            raised_at=event.at,
        )

    def to_json(self) -> bytes:
        """The MQTT message body (UTF-8 JSON, times in ISO-8601 UTC)."""
        document = {
            "id": self.id,
            "priority": self.priority.label,
            "category": str(self.category),
            "patient_ref": self.patient_ref,
            "label": self.label,
            "room": self.room,
            "device_id": self.device_id,
            "reason": self.reason,
            "evidence": [_evidence_json(e) for e in self.evidence],
            "raised_at": iso_utc(self.raised_at),
            "condition": self.condition,
            "escalation": self.escalation,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def title(self) -> str:
        """Phone notification title: priority, then who or where."""
        prefix = "ESCALATED " if self.escalation else ""
        return f"{prefix}{self.priority.label.upper()}: {self.subject()}"

    def body(self) -> str:
        """Phone notification text: reason, supporting values, time and alert id."""
        lines = [self.reason]
        lines += [
            f"{e.kind} {e.value:g} {e.unit} at {iso_utc(e.measured_at)}"
            for e in self.evidence
        ]
        if self.room:
            lines.append(f"room {self.room}")
        lines.append(f"raised {iso_utc(self.raised_at)}")
        lines.append(f"alert {self.id}")
        return "\n".join(lines)

    def subject(self) -> str:
        """Who or what it is about; the pseudonymous ref only without a label."""
        return (
            self.label or self.patient_ref or self.room or self.device_id or "gateway"
        )


class Notifier(Protocol):
    """Something that delivers one alert to one target."""

    async def send(self, alert: Alert, target: str) -> None:
        """Deliver `alert` to `target`; return only once it is accepted.

        Raises:
            DeliveryError: It was not accepted; the caller retries later.
        """
        ...


class MqttNotifier:
    """Publishes alerts at QoS 1 to ``{prefix}/alerts/{priority}``.

    Args:
        link: A connected MQTT link.
        prefix: Topic prefix the ERT subscribes under.
        timeout_s: How long to wait for the broker's PUBACK.
    """

    def __init__(self, link: MqttLink, prefix: str = "ert", timeout_s: float = 10.0):
        self._link = link
        self._prefix = prefix
        self._timeout_s = timeout_s

    async def send(self, alert: Alert, target: str = MQTT_TARGET) -> None:
        """Publish the alert and wait for the broker's PUBACK.

        A publish that timed out may still reach the broker after a reconnect, so
        the ERT can see an alert twice: QoS 1 is at-least-once, the id dedups.

        Raises:
            DeliveryError: No PUBACK within the timeout, or the link was closed.
        """
        topic = f"{self._prefix}/alerts/{alert.priority.label}"
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._link.publish(topic, alert.to_json(), qos=1)
        except TimeoutError as exc:
            reason = f"no PUBACK within {self._timeout_s:g} s"
            raise DeliveryError(MQTT_TARGET, reason) from exc
        except ConnectionError as exc:
            raise DeliveryError(MQTT_TARGET, f"MQTT link: {exc}") from exc


class MemoryNotifier:
    """In-memory twin of a notifier: records what it was given, fails on request.

    Args:
        fail_first: How many sends fail before sends succeed.
    """

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[Alert, str]] = []
        self.attempts = 0
        self.fail_remaining = fail_first
        self.failing = False

    async def send(self, alert: Alert, target: str) -> None:
        """Record the alert, or fail as told.

        Raises:
            DeliveryError: `failing` is set or `fail_remaining` is not yet used up.
        """
        self.attempts += 1
        if self.failing or self.fail_remaining > 0:
            self.fail_remaining = max(0, self.fail_remaining - 1)
            raise DeliveryError(redact(target), "told to fail")
        self.sent.append((alert, target))


def redact(target: str) -> str:
    """A log-safe name for a target: scheme and host, never paths or tokens.

    Several apprise schemes put a secret where a host would be (``pover://user@token``,
    ``ntfy://topic``, ``tgram://bottoken/chat``), so the host is shown only when it
    looks like a host name or address.

    >>> redact("gotify://push.example.org/AbCdEf123")
    'gotify://push.example.org'
    >>> redact("pover://user@secrettoken")
    'pover://'
    >>> redact("mqtt")
    'mqtt'
    """
    if "://" not in target:
        # A bare name (the in-memory twin's targets); anything else is not shown.
        return target if _NAME.fullmatch(target) else "unnamed-target"
    try:
        parts = urlsplit(target)
        host = parts.hostname or ""
    except ValueError:
        return "unparsable-target"
    looks_like_host = "." in host or ":" in host or host == "localhost"
    return f"{parts.scheme}://{host if looks_like_host else ''}"


def iso_utc(epoch: float) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``.

    A time no calendar can show (a sensor's clock gone wild) is given as seconds,
    so that nothing that prints an alert can fail on it.

    >>> iso_utc(0.25)
    '1970-01-01T00:00:00.250Z'
    >>> iso_utc(1.7e12)
    '@1700000000000'
    """
    try:
        stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return f"@{epoch:.0f}"
    return stamp.removesuffix("+00:00") + "Z"


def _evidence_json(evidence: Evidence) -> dict[str, object]:
    return {
        "kind": str(evidence.kind),
        "value": evidence.value,
        "unit": evidence.unit,
        "measured_at": iso_utc(evidence.measured_at),
    }
