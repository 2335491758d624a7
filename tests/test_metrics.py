"""The Prometheus endpoint of a real agent against a real mosquitto.

Room readings published over MQTT, a quarantined message, an alert raised,
delivered and acknowledged: each shows up as a number on /metrics, and nothing
personal (refs, labels, values) appears in the exposition.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.agent import Agent
from gateway.broker import LocalBroker, free_port
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.metrics import Metrics, reason_label, source_label, target_label
from gateway.paho import MqttLink, MqttSettings
from gateway.readings import Kind, Reading
from tests.test_agent import write_config
from tests.waiting import until


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def publish(broker: LocalBroker, payloads: list[bytes]) -> None:
    link = MqttLink(MqttSettings(port=broker.port, client_id="room-12-node"))
    await link.connect()
    for payload in payloads:
        await link.publish("rooms/room-12/temperature", payload, qos=1)
    await link.close()


def room(value: float) -> bytes:
    return json.dumps({"ts": time.time(), "value": value}).encode()


@pytest.mark.broker
def test_metrics_move_as_readings_and_alerts_flow(
    tmp_path: Path, broker: LocalBroker
) -> None:
    port = free_port()
    path = write_config(tmp_path, broker, ["mqtt"])
    path.write_text(path.read_text() + f"\n[metrics]\nport = {port}\n")
    cfg = load_config(path)

    async def scenario() -> None:
        agent = Agent(cfg)
        await agent.start()
        try:
            await flow(agent, broker, port)
        finally:
            await agent.stop()

    asyncio.run(scenario())
    with pytest.raises(OSError):
        scrape(port)  # the endpoint closed with the agent


async def flow(agent: Agent, broker: LocalBroker, port: int) -> None:
    # Five readings inside the band and one message that is not JSON.
    await publish(broker, [room(21.0 + i / 10) for i in range(5)] + [b"{oops"])
    await until(lambda: agent.pipeline.stats.quarantined == 1, what="quarantine")
    _, m = await asyncio.to_thread(scrape, port)
    assert value(m, "iomt_readings_total", source="mqtt", kind="room_temperature") == 5
    assert value(m, "iomt_quarantined_total", source="mqtt", reason="not JSON") == 1
    assert value(m, "iomt_alerts_raised_total", priority="low") == 0
    assert value(m, "iomt_mqtt_connected") == 1
    assert value(m, "iomt_mqtt_reconnects_total") == 0
    assert value(m, "iomt_store_bytes") > 0
    assert value(m, "iomt_privacy_epsilon_max") == 8.0

    # A room too warm (low) and a heart rate too high (high): raised, delivered.
    await publish(broker, [room(29.5)])
    agent.pipeline.ingest(
        Reading("strap-7", Kind.HEART_RATE, 142, time.time(), patient_ref="p-7")
    )
    await until(lambda: agent.alerts.stats.delivered == 2, what="two deliveries")
    text, m = await asyncio.to_thread(scrape, port)
    assert value(m, "iomt_readings_total", source="mqtt", kind="room_temperature") == 6
    assert value(m, "iomt_readings_total", source="ble", kind="heart_rate") == 1
    for priority in ("low", "high"):
        assert value(m, "iomt_alerts_raised_total", priority=priority) == 1
        assert (
            value(m, "iomt_alerts_delivered_total", priority=priority, target="mqtt")
            == 1
        )
        assert value(m, "iomt_alert_delivery_seconds_count", priority=priority) == 1
    assert "p-7" not in text and "Bed 7" not in text and "29.5" not in text

    await acknowledge_high(agent, broker)
    # The counter follows the outbox read that finds the alert's priority.
    acked = "iomt_alerts_acknowledged_total"
    await until(lambda: value(scrape(port)[1], acked, priority="high") == 1)
    _, m = await asyncio.to_thread(scrape, port)
    assert value(m, "iomt_alerts_acknowledged_total", priority="low") == 0


async def acknowledge_high(agent: Agent, broker: LocalBroker) -> None:
    (high,) = [r for r in agent.outbox.list_alerts() if r.alert.patient_ref == "p-7"]
    link = MqttLink(MqttSettings(port=broker.port, client_id="ert-lead"))
    await link.connect()
    await link.publish(f"ert/ack/{high.alert.id}", b"{}")
    await link.close()
    await until(lambda: agent.alerts.stats.acknowledged == 1, what="ack")


def test_serving_on_a_taken_port_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            Metrics().serve(taken.getsockname()[1])


def test_labels_carry_no_data() -> None:
    assert source_label("mqtt:rooms/room-12/temperature") == "mqtt"
    assert source_label("ble:C8:4F:2A:10:77:01") == "ble"
    assert reason_label("time out of range: over 300 s ahead") == (
        "time out of range: over N s ahead"
    )
    assert target_label("json://127.0.0.1:8080/token-abc") == "json"
    assert target_label("pover://user@token") == "pover"
