"""Alerts over real parts: mosquitto on loopback, apprise to an HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.alarms import Action, AlarmEvent, Category, Evidence, Priority
from gateway.alerts import AlertManager
from gateway.apprise_push import AppriseNotifier
from gateway.broker import LocalBroker
from gateway.clock import ManualClock
from gateway.errors import DeliveryError
from gateway.notify import MQTT_TARGET, Alert, MqttNotifier, Notifier
from gateway.outbox import Outbox
from gateway.paho import MqttLink, MqttMessage, MqttSettings
from gateway.readings import Kind
from tests.http_receiver import HttpReceiver
from tests.waiting import until

T0 = 1_700_000_000.0


def hr_event(at: float = T0) -> AlarmEvent:
    return AlarmEvent(
        condition="p-17/heart_rate/high",
        action=Action.RAISE,
        category=Category.PHYSIOLOGICAL,
        priority=Priority.HIGH,
        reason="Heart rate >= 131 bpm",
        at=at,
        patient_ref="p-17",
        evidence=(Evidence(Kind.HEART_RATE, 137.0, "bpm", at - 1.0),),
    )


@contextlib.asynccontextmanager
async def mqtt_link(broker: LocalBroker, name: str) -> AsyncIterator[MqttLink]:
    settings = MqttSettings(
        port=broker.port, client_id=f"{name}-{uuid.uuid4().hex[:6]}", clean_start=True
    )
    link = MqttLink(settings)
    await link.connect()
    try:
        yield link
    finally:
        await link.close()


def router(mqtt: Notifier | None, push: Notifier) -> Callable[[str], Notifier]:
    def pick(target: str) -> Notifier:
        if target == MQTT_TARGET and mqtt is not None:
            return mqtt
        return push

    return pick


@contextlib.asynccontextmanager
async def running(manager: AlertManager) -> AsyncIterator[AlertManager]:
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()


def make_manager(
    outbox: Outbox, notifiers: Callable[[str], Notifier], targets: list[str]
) -> AlertManager:
    return AlertManager(
        outbox,
        notifiers,
        targets=targets,
        escalation_targets=[],
        clock=ManualClock(T0),
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )


@pytest.mark.broker
def test_alert_reaches_mqtt_and_the_phone_and_an_ack_comes_back(
    broker: LocalBroker, receiver: HttpReceiver, tmp_path: Path
) -> None:
    heard: list[MqttMessage] = []

    async def scenario() -> None:
        async with (
            mqtt_link(broker, "gateway") as gateway,
            mqtt_link(broker, "ert") as ert,
        ):
            ert.subscribe("ert/alerts/#", heard.append)
            push = AppriseNotifier([receiver.apprise_url])
            with Outbox(tmp_path / "outbox.db") as outbox:
                manager = make_manager(
                    outbox,
                    router(MqttNotifier(gateway), push),
                    [MQTT_TARGET, receiver.apprise_url],
                )
                gateway.subscribe("ert/ack/+", manager.ack_handler())
                await until(lambda: "ert/ack/+" in gateway.granted)
                await until(lambda: "ert/alerts/#" in ert.granted)
                async with running(manager):
                    alert = await manager.handle(hr_event())
                    assert alert is not None
                    await until(lambda: len(heard) == 1)
                    await asyncio.to_thread(receiver.wait_for, 1)
                    check_mqtt(heard[0], alert)
                    check_phone(receiver, alert)

                    ack = json.dumps({"by": "nurse-3", "outcome": "true_alarm"})
                    await ert.publish(f"ert/ack/{alert.id}", ack.encode(), qos=1)
                    await until(lambda: manager.stats.acknowledged == 1)
                    stored = outbox.get(alert.id)
                    assert stored is not None
                    assert (stored.acked_by, stored.outcome) == (
                        "nurse-3",
                        "true_alarm",
                    )
                    assert stored.acked_at == T0

    asyncio.run(scenario())


def check_mqtt(message: MqttMessage, alert: Alert) -> None:
    assert message.topic == "ert/alerts/high"
    assert message.qos == 1
    document = json.loads(message.payload)
    assert document["id"] == alert.id
    assert document["priority"] == "high"
    assert document["reason"] == "Heart rate >= 131 bpm"
    assert document["evidence"][0]["value"] == 137.0


def check_phone(receiver: HttpReceiver, alert: Alert) -> None:
    (posted,) = receiver.accepted_json()
    assert posted["title"] == "HIGH: p-17"
    assert alert.id in posted["message"]
    assert "Heart rate >= 131 bpm" in posted["message"]


@pytest.mark.broker
def test_mqtt_notifier_times_out_without_a_broker(broker: LocalBroker) -> None:
    alert = Alert.from_event(hr_event(), uuid.uuid4().hex, label=None)

    async def scenario() -> None:
        async with mqtt_link(broker, "gateway") as link:
            broker.stop()
            await until(lambda: not link.connected.is_set())
            with pytest.raises(DeliveryError, match=r"no PUBACK within 0\.3 s"):
                await MqttNotifier(link, timeout_s=0.3).send(alert, MQTT_TARGET)

    asyncio.run(scenario())


def test_phone_answering_500_is_retried_and_delivered_once(
    receiver: HttpReceiver, tmp_path: Path
) -> None:
    receiver.fail_next(2)

    async def scenario() -> Alert | None:
        push = AppriseNotifier([receiver.apprise_url])
        with Outbox(tmp_path / "outbox.db") as outbox:
            manager = make_manager(outbox, router(None, push), [receiver.apprise_url])
            async with running(manager):
                alert = await manager.handle(hr_event())
                await asyncio.to_thread(receiver.wait_for, 1)
                await until(lambda: manager.stats.delivered == 1)
            assert manager.stats.failed_attempts == 2
            return alert

    alert = asyncio.run(scenario())
    assert alert is not None
    assert [r.status for r in receiver.received] == [500, 500, 200]
    assert [alert.id in p["message"] for p in receiver.accepted_json()] == [True]


def test_unknown_apprise_url_is_refused_up_front() -> None:
    with pytest.raises(DeliveryError, match="not a URL apprise supports"):
        AppriseNotifier(["nosuchscheme://example.org/token"])


def test_alert_left_undelivered_is_delivered_once_after_restart(
    receiver: HttpReceiver, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    target = receiver.apprise_url
    receiver.fail_next(10**6)

    async def first_run() -> Alert | None:
        with Outbox(path) as outbox:
            manager = make_manager(
                outbox, router(None, AppriseNotifier([target])), [target]
            )
            async with running(manager):
                alert = await manager.handle(hr_event())
                await until(lambda: manager.stats.failed_attempts >= 1)
            return alert

    async def second_run() -> None:
        with Outbox(path) as outbox:
            manager = make_manager(
                outbox, router(None, AppriseNotifier([target])), [target]
            )
            async with running(manager):
                await until(lambda: manager.stats.delivered == 1)
                await asyncio.sleep(0.3)  # room for a wrong second delivery
            assert manager.stats.raised == 0

    alert = asyncio.run(first_run())
    assert alert is not None
    assert receiver.accepted() == []
    failed_posts = len(receiver.received)

    receiver.fail_next(0)
    asyncio.run(second_run())

    delivered = [p for p in receiver.accepted_json() if alert.id in p["message"]]
    assert len(delivered) == 1
    assert len(receiver.received) == failed_posts + 1
    with Outbox(path) as outbox:
        stored = outbox.get(alert.id)
    assert stored is not None
    assert [d.delivered_at is not None for d in stored.deliveries] == [True]
