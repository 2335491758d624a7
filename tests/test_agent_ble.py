"""The agent's roster wiring: a configured wearable on a virtual radio, end to end.

bleak's own client and scanner run over the bumble backend; the agent finds the
strap by its configured address, stores what it sends and alerts the ERT's topic.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import load_config
from gateway.paho import MqttLink, MqttSettings
from gateway.readings import Kind
from sensors.ble.bleak_central import BleakCentral
from sensors.ble.virtual import VirtualHeartRateStrap, VirtualRadio
from tests.waiting import until

pytestmark = pytest.mark.broker

CONFIG = """
[gateway]
data_dir = "{data_dir}"
[mqtt]
port = {port}
[rules]
persistence_s = 2
[[patients]]
ref = "p-5"
label = "Bed 5"
[[devices]]
address = "F1:00:00:00:00:05"
patient = "p-5"
profiles = ["heart_rate", "battery"]
connect_timeout_s = 10
"""


def test_rostered_strap_is_found_stored_and_alerts(
    tmp_path: Path, broker: LocalBroker
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(data_dir=tmp_path / "state", port=broker.port))
    cfg = load_config(path)

    async def scenario() -> None:
        radio = VirtualRadio()
        await radio.start()
        strap = VirtualHeartRateStrap(radio, address="F1:00:00:00:00:05", battery=64)
        await strap.start()
        received: list[dict] = []
        phone = MqttLink(MqttSettings(port=broker.port, client_id="phone"))
        phone.subscribe(
            "ert/alerts/#", lambda m: received.append(json.loads(m.payload))
        )
        await phone.connect()
        agent = Agent(cfg, central=BleakCentral(backend=radio.backends()))
        await agent.start()
        try:
            await until(lambda: strap.connected, timeout=20, what="strap connected")
            (link,) = agent.wearables
            await until(lambda: link.state == "connected", what="link subscribed")
            for _ in range(4):
                await strap.send_heart_rate(180, (341,))
                await asyncio.sleep(1.0)
            await until(lambda: received, what="alert on MQTT")
            await agent.store.flush()
        finally:
            await agent.stop()
            await strap.stop()
            await phone.close()

        (alert,) = received
        assert (alert["label"], alert["priority"]) == ("Bed 5", "high")
        assert alert["device_id"] == "F1:00:00:00:00:05"
        stored = agent.store.readings(patient_ref="p-5", kind=Kind.HEART_RATE)
        assert [r.value for r in stored] == [180.0] * 4
        battery = agent.store.readings(patient_ref="p-5", kind=Kind.BATTERY)
        assert battery[0].value == 64

    asyncio.run(scenario())
