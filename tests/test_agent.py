"""The whole agent against a real mosquitto and an HTTP push receiver.

A reading crosses a band and the alert reaches the ERT's MQTT topic and a phone
target (apprise); a repeat of the condition is suppressed; an unacknowledged high
alert is escalated; and an agent killed with SIGKILL between writing an alert to its
outbox and delivering it delivers it after restart, exactly once by alert id.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import Config, load_config
from gateway.paho import MqttLink, MqttSettings
from gateway.readings import Kind, Reading
from tests.http_receiver import HttpReceiver
from tests.waiting import until, wait_until

pytestmark = pytest.mark.broker

CONFIG = """
[gateway]
id = "test-gw"
data_dir = "{data_dir}"

[mqtt]
port = {port}
client_id = "test-gw-{tag}"

[[mqtt.topics]]
filter = "rooms/+/temperature"
kind = "room_temperature"

[rules]
persistence_s = 0
clear_after_s = 0

[rooms]
persistence_s = 0
temperature_high = 26.0

[alerts]
targets = {targets}
escalation_targets = {escalation}
escalate_after_s = {escalate}
retry_initial_s = 0.2
retry_max_s = 0.5

[[patients]]
ref = "p-7"
label = "Bed 7"
"""


def write_config(
    tmp_path: Path,
    broker: LocalBroker,
    targets: list[str],
    escalation: list[str] = (),  # type: ignore[assignment]
    escalate: float = 600,
) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        CONFIG.format(
            data_dir=tmp_path / "state",
            port=broker.port,
            tag=uuid.uuid4().hex[:6],
            targets=json.dumps(targets),
            escalation=json.dumps(list(escalation)),
            escalate=escalate,
        )
    )
    return path


async def ert_phone(broker: LocalBroker, received: list[dict]) -> MqttLink:
    link = MqttLink(
        MqttSettings(port=broker.port, client_id="ert-phone", clean_start=True)
    )
    link.subscribe("ert/alerts/#", lambda m: received.append(json.loads(m.payload)))
    await link.connect()
    return link


async def publish_room_temperature(broker: LocalBroker, value: float) -> None:
    link = MqttLink(MqttSettings(port=broker.port, client_id="room-12-node"))
    await link.connect()
    payload = json.dumps({"ts": time.time(), "value": value}).encode()
    await link.publish("rooms/room-12/temperature", payload, qos=1)
    await link.close()


def hr(value: float) -> Reading:
    return Reading("strap-7", Kind.HEART_RATE, value, time.time(), patient_ref="p-7")


def test_band_crossing_reaches_mqtt_and_phone_and_repeats_are_suppressed(
    tmp_path: Path, broker: LocalBroker, receiver: HttpReceiver
) -> None:
    cfg = load_config(write_config(tmp_path, broker, ["mqtt", receiver.apprise_url]))

    async def scenario() -> None:
        received: list[dict] = []
        phone = await ert_phone(broker, received)
        agent = Agent(cfg)
        await agent.start()
        try:
            # A room sensor over the broker crosses the band...
            await publish_room_temperature(broker, 29.5)
            await until(lambda: len(received) == 1, what="room alert on MQTT")
            room_alert = received[0]
            assert room_alert["category"] == "environmental"
            assert room_alert["room"] == "room-12"
            assert room_alert["evidence"][0]["value"] == 29.5
            # ...and so does a wearable's heart rate.
            agent.pipeline.ingest(hr(142))
            await until(lambda: len(received) == 2, what="HR alert on MQTT")
            alert = received[1]
            assert (alert["priority"], alert["label"]) == ("high", "Bed 7")
            assert alert["reason"].startswith("Heart rate high: 142 bpm")
            await asyncio.to_thread(receiver.wait_for, 2)

            # The same conditions again, still open: no new alert anywhere.
            await publish_room_temperature(broker, 29.9)
            agent.pipeline.ingest(hr(150))
            await agent.pipeline.drain()
            await asyncio.sleep(1.0)
            assert len(received) == 2
            assert len(receiver.accepted()) == 2
            assert agent.pipeline.stats.events == 2
        finally:
            await agent.stop()

        # A restarted agent has forgotten its rule state, but the outbox has not:
        # the condition is still open, so its new raise is suppressed.
        agent = Agent(cfg)
        await agent.start()
        try:
            agent.pipeline.ingest(hr(150))
            await agent.pipeline.drain()
            await asyncio.sleep(1.0)
            assert agent.alerts.stats.suppressed == 1
            assert len(received) == 2
        finally:
            await agent.stop()
            await phone.close()

        phone_alerts = [json.loads(b) for b in receiver.accepted()]
        assert {a["title"] for a in phone_alerts} == {
            "LOW: room-12",
            "HIGH: Bed 7",
        }
        assert all(received[1]["id"] in a["message"] for a in phone_alerts[1:])

    asyncio.run(scenario())


def test_unacknowledged_high_alert_is_escalated_acknowledged_is_not(
    tmp_path: Path, broker: LocalBroker, receiver: HttpReceiver
) -> None:
    lead = receiver.apprise_url + "lead"
    cfg = load_config(
        write_config(tmp_path, broker, ["mqtt"], escalation=[lead], escalate=1.5)
    )

    async def scenario() -> None:
        received: list[dict] = []
        phone = await ert_phone(broker, received)
        agent = Agent(cfg)
        await agent.start()
        try:
            agent.pipeline.ingest(hr(142))
            await until(lambda: len(received) == 1)
            await asyncio.to_thread(receiver.wait_for, 1, 10.0)
            escalated = json.loads(receiver.accepted()[0])
            assert escalated["title"] == "ESCALATED HIGH: Bed 7"
            assert received[0]["id"] in escalated["message"]
            assert receiver.received[0].path == "/lead"
            assert [m["escalation"] for m in received] == [False]

            # A second patient's alert, acknowledged in time, is not escalated.
            await ack_over_mqtt(broker, agent, cfg)
        finally:
            await agent.stop()
            await phone.close()
        assert len(receiver.accepted()) == 1

    asyncio.run(scenario())


async def ack_over_mqtt(broker: LocalBroker, agent: Agent, cfg: Config) -> None:
    agent.pipeline.ingest(
        Reading("strap-8", Kind.SPO2, 85, time.time(), patient_ref="p-8")
    )
    await agent.pipeline.drain()
    (record,) = [r for r in agent.outbox.list_alerts() if r.alert.patient_ref == "p-8"]
    link = MqttLink(MqttSettings(port=broker.port, client_id="ert-lead"))
    await link.connect()
    body = json.dumps({"by": "nurse-3", "outcome": "true_alarm"}).encode()
    await link.publish(f"ert/ack/{record.alert.id}", body)
    await link.close()
    await until(lambda: agent.outbox.get(record.alert.id).acked_at is not None)
    acked = agent.outbox.get(record.alert.id)
    assert (acked.acked_by, acked.outcome) == ("nurse-3", "true_alarm")
    await asyncio.sleep(2.5)  # past escalate_after_s
    assert agent.outbox.get(record.alert.id).escalated_at is None


# -- the agent as a process, killed between outbox and delivery --------------------


def outbox_rows(path: Path) -> list[tuple]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT a.id, d.attempts, d.delivered_at FROM alerts a "
            "JOIN deliveries d ON d.alert_id = a.id"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


@pytest.mark.slow
def test_sigkill_before_delivery_delivers_after_restart_exactly_once(
    tmp_path: Path, broker: LocalBroker, receiver: HttpReceiver, agent_process
) -> None:
    config = write_config(tmp_path, broker, [receiver.apprise_url])
    outbox = tmp_path / "state" / "outbox.db"
    receiver.fail_next(10**6)  # the push service is down

    first = agent_process(config)
    deadline = time.monotonic() + 30
    while not any(attempts for _, attempts, _ in outbox_rows(outbox)):
        assert first.poll() is None, (tmp_path / "agent.log").read_text()
        assert time.monotonic() < deadline, "alert never reached the outbox"
        asyncio.run(publish_room_temperature(broker, 31.0))
        time.sleep(0.3)
    first.kill()  # SIGKILL: no clean-up, no goodbye
    first.wait()
    ((alert_id, _, delivered_at),) = outbox_rows(outbox)
    assert delivered_at is None
    assert receiver.accepted() == []

    receiver.fail_next(0)  # the push service is back
    second = agent_process(config)
    receiver.wait_for(1, timeout=30)
    wait_until(lambda: outbox_rows(outbox)[0][2] is not None, what="marked delivered")
    time.sleep(1.5)  # would a second copy follow?
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0

    bodies = [json.loads(b)["message"] for b in receiver.accepted()]
    assert [b for b in bodies if f"alert {alert_id}" in b] == bodies
    assert len(bodies) == 1
    assert len(outbox_rows(outbox)) == 1
    log = (tmp_path / "agent.log").read_text()
    assert "p-7" not in log and "Bed 7" not in log and "31.0" not in log


@pytest.mark.slow
def test_accelerated_run_replays_then_stops_and_sigterm_ends_a_live_run(
    tmp_path: Path, broker: LocalBroker
) -> None:
    beats = tmp_path / "beats.csv"
    beats.write_text(",R\n" + "".join(f"{i},{i * 270}\n" for i in range(200)))
    config = write_config(tmp_path, broker, ["mqtt"])
    config.write_text(
        config.read_text() + f'\n[[replay]]\nsource = "mitdb"\nfile = "{beats}"\n'
        'device = "strap-7"\npatient = "p-7"\n'
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            str(config),
            "--speed",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "accelerated replay finished" in run.stderr
    with sqlite3.connect(tmp_path / "state" / "readings.db") as db:
        (hr,) = db.execute("SELECT count(*) FROM readings WHERE kind='heart_rate'")
    assert hr[0] > 100  # 200 beats at 80 bpm: one notification a second

    live = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # replaying in real time now
    live.send_signal(signal.SIGTERM)
    assert live.wait(timeout=20) == 0
    assert "stopped" in live.stderr.read()
    live.stderr.close()
