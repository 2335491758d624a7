"""`iomt-gateway status` beside a running agent process, and the log formats.

The agent runs as the service would, against a real mosquitto; the status command
runs as its own process and reads what the agent left in its data directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.broker import LocalBroker
from gateway.config import load_config
from gateway.logfmt import JsonFormatter, OneLineFormatter, formatter
from gateway.paho import MqttLink, MqttSettings
from gateway.status import STALE_AFTER_S, gather, render, write_status
from tests.waiting import wait_until

CONFIG = """
[gateway]
id = "status-gw"
data_dir = "{data_dir}"

[mqtt]
port = {port}
client_id = "status-gw"

[[mqtt.topics]]
filter = "rooms/+/temperature"
kind = "room_temperature"
device = "{{room}}-node"

[rooms]
persistence_s = 0
temperature_high = 26.0
temperature_priority = "high"

[[patients]]
ref = "p-7"
label = "Bed 7"
"""


def status_json(config: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


async def publish(port: int, values: list[float]) -> None:
    link = MqttLink(MqttSettings(port=port, client_id="room-12-node"))
    await link.connect()
    for v in values:
        payload = json.dumps({"ts": time.time(), "value": v}).encode()
        await link.publish("rooms/room-12/temperature", payload, qos=1)
    await link.close()


@pytest.mark.broker
@pytest.mark.slow
def test_status_follows_a_running_agent(
    tmp_path: Path, broker: LocalBroker, agent_process
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(data_dir=tmp_path / "state", port=broker.port))
    assert status_json(config)["agent"] == {
        "running": False,
        "reason": f"no data directory {tmp_path / 'state'}: the agent never ran "
        "with it",
    }

    agent = agent_process(config)
    wait_until(lambda: status_json(config)["agent"]["running"], 30, "agent running")
    asyncio.run(publish(broker.port, [21.0, 21.5, 22.0]))
    wait_until(
        lambda: status_json(config)["agent"]["pipeline"]["readings"] == 3, 20, "3 in"
    )
    status = status_json(config)
    assert {
        role: link["connected"] for role, link in status["agent"]["mqtt"].items()
    } == {
        "alerts": True,
        "ingest": True,
    }
    (node,) = status["agent"]["sources"]
    assert (node["device"], node["source"], node["room"]) == (
        "room-12-node",
        "mqtt",
        "room-12",
    )
    assert node["last_data_age_s"] < 10
    assert status["alerts"]["open"] == {"high": 0, "medium": 0, "low": 0}

    # Too warm, at high priority in this config: one open, unacknowledged alert.
    asyncio.run(publish(broker.port, [29.5]))
    wait_until(lambda: status_json(config)["alerts"]["open"]["high"] == 1, 20, "alert")
    status = status_json(config)
    assert status["alerts"]["unacknowledged"] == 1
    assert (
        status["disk"]["bytes"]["store"] > 0 and status["disk"]["bytes"]["outbox"] > 0
    )
    assert status["privacy"]["epsilon_left"] == 8.0
    assert status["model"] == {"installed": False}

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=20) == 0
    stopped = status_json(config)["agent"]
    assert (stopped["running"], stopped["reason"]) == (False, "the agent stopped")
    text = (tmp_path / "state" / "status.json").read_text()
    assert "Bed 7" not in text and "29.5" not in text


def test_a_status_file_not_refreshed_means_not_running(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n')
    cfg = load_config(config)
    document = {
        "gateway": "gw",
        "pid": 1,
        "running": True,
        "written_at": 1000.0,
        "clock": 1000.0,
        "mqtt": {"alerts": {"connected": True, "reconnects": 2}},
        "wearables": [
            {
                "device": "C8:4F:2A:10:77:01",
                "patient_ref": "p-7",
                "state": "connected",
                "connected": True,
                "last_data_age_s": 1.0,
                "battery": 81,
                "rssi": -67,
                "reconnects": 3,
            }
        ],
        "sources": [],
        "pipeline": {"readings": 10, "quarantined": 0, "events": 0},
    }
    write_status(tmp_path / "status.json", document)

    fresh = gather(cfg, now=1000.0 + STALE_AFTER_S - 1)
    assert fresh["agent"]["running"] is True
    stale = gather(cfg, now=1000.0 + STALE_AFTER_S + 1)
    assert stale["agent"]["running"] is False
    screen = render(stale)
    assert "NOT RUNNING: status not refreshed for 16 s" in screen
    assert "battery 81%, signal -67 dBm, 3 reconnects" in screen
    assert "mqtt      alerts   connected at last status, 2 reconnects" in screen


def test_log_formats_put_one_event_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "gateway.store", logging.ERROR, __file__, 1, "lost %d rows", (3,), None
        )
        record.exc_info = sys.exc_info()
    text = OneLineFormatter().format(record)
    assert "\n" not in text
    assert text.startswith("ERROR gateway.store: lost 3 rows | Traceback")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert (doc["level"], doc["subsystem"], doc["msg"]) == (
        "error",
        "gateway.store",
        "lost 3 rows",
    )
    assert "ValueError: boom" in doc["exc"]
    with pytest.raises(ValueError):
        formatter("xml")


def test_cli_log_setup_writes_json_lines() -> None:
    code = (
        "import logging; from gateway.cli import _setup_logging; "
        "_setup_logging('info', 'json'); "
        "logging.getLogger('gateway.agent').info('gateway %s running', 'gw-1')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    (line,) = run.stderr.splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["subsystem"], doc["msg"]) == (
        "info",
        "gateway.agent",
        "gateway gw-1 running",
    )


def test_the_uplink_line_shows_the_last_federated_round(tmp_path: Path) -> None:
    from gateway.federation.ledger import FederationLog

    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n')
    cfg = load_config(config)
    assert "uplink    not configured" in render(gather(cfg))
    with FederationLog(cfg.path(cfg.federation.log_file)) as ledger:
        ledger.record(
            run_id="run-1",
            server_round=2,
            outcome="sent",
            bytes_sent=84,
            update_sha256="ab" * 32,
            examples=1000,
            epsilon_after=1.5,
            model_version=1,
        )
        ledger.set_installed(2)
    status = gather(cfg, now=time.time() + 120)
    assert status["uplink"]["last_round"] == 2
    assert status["uplink"]["model_version"] == 2
    assert "uplink    last federated round 2 2 min ago (sent); global model v2" in (
        render(status)
    )
