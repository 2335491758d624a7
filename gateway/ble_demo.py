"""`iomt-gateway demo --ble`: a virtual chest strap, reached through real bleak code.

A bumble controller pair on an in-process link stands in for the radio: the strap
is a real GATT server, the gateway's `WearableLink` finds it by address, connects
through bleak, subscribes and decodes, exactly as with hardware. The strap first
sends MIT-BIH record 100 as it would, then a scripted sequence (labelled synthetic)
that shows each alarm path: a sustained tachycardia, lost skin contact, the strap
dropping off the radio and coming back, and a strap that stays connected but falls
silent. Runs in real time, about two minutes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.agent import Agent
from gateway.demo import HEADER, Timeline, demo_setting, print_summary
from gateway.errors import ExitCode
from sensors.ble.bleak_central import BleakCentral
from sensors.ble.virtual import VirtualHeartRateStrap, VirtualRadio
from sensors.replay import data_path, mitdb

BLE_DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo-ble.toml"
STRAP = "F1:00:00:00:00:01"
RECORD_S = 30.0


async def run_ble_demo(*, keep: Path | None = None) -> int:
    """Run the BLE demo; returns the process exit code.

    Raises:
        BrokerError: mosquitto is not installed or does not start.
    """
    with demo_setting(BLE_DEMO_CONFIG, keep) as (cfg, port):
        radio = VirtualRadio()
        await radio.start()
        strap = VirtualHeartRateStrap(radio, address=STRAP, name="HRM-Virtual")
        await strap.start()
        start = time.time()
        timeline = Timeline(start, precise=True)
        agent = Agent(
            cfg,
            central=BleakCentral(backend=radio.backends()),
            on_alert=timeline.delivered,
        )
        timeline.clock = agent.clock
        print(f"iomt-gateway demo --ble: virtual strap {STRAP}, mosquitto :{port}")
        print(HEADER.format(time="+mm:ss"))
        await agent.start()
        try:
            await _script(strap, timeline)
            await agent.deliver_pending()
            print_summary(agent, time.time() - start, keep)
        finally:
            await agent.stop()
            await strap.stop()
    return ExitCode.OK


async def _script(strap: VirtualHeartRateStrap, timeline: Timeline) -> None:
    timeline.note(f"the strap sends MIT-BIH record 100 ({RECORD_S:.0f} s)")
    await _record_100(strap)
    timeline.note("synthetic: heart rate 138 bpm for 25 s")
    await _every_second(25, strap.send_heart_rate, 138, (445, 445))
    timeline.note("synthetic: skin contact lost for 15 s")
    await _every_second(15, strap.send_contact_lost, 0)
    timeline.note("the strap drops off the radio for 20 s, then comes back")
    await strap.drop_link(come_back_after_s=20)
    await _wait_connected(strap)
    timeline.note("synthetic: heart rate 72 bpm again for 20 s")
    await _every_second(20, strap.send_heart_rate, 72, (853,))
    timeline.note("the strap stays connected but sends nothing for 15 s")
    await asyncio.sleep(15)


async def _record_100(strap: VirtualHeartRateStrap) -> None:
    events = mitdb.heart_rate_notifications(
        data_path("mitdb/100_all.csv"), start=0.0, device_id=STRAP
    )
    await _wait_connected(strap)
    began = time.monotonic()
    for ev in events:
        if ev.at > RECORD_S:
            return
        await asyncio.sleep(max(0.0, ev.at - (time.monotonic() - began)))
        await strap.send(ev.payload)  # type: ignore[arg-type]


async def _every_second(seconds: int, send: object, *args: object) -> None:
    for _ in range(seconds):
        await send(*args)  # type: ignore[operator]
        await asyncio.sleep(1.0)


async def _wait_connected(strap: VirtualHeartRateStrap, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not strap.connected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let the gateway subscribe
