"""The gateway's bleak code against virtual wearables (bumble, in-process link).

bleak's own `BleakScanner` / `BleakClient` run with the virtual backend; behind
them bumble runs real controllers, a real GATT server on each wearable and a real
GATT client on the gateway. Readings go through the real pipeline, rules and a
SQLite store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bleak import BleakClient, BleakScanner

from gateway.alarms import Action, AlarmEvent, Category
from gateway.clock import SystemClock
from gateway.pipeline import Pipeline
from gateway.readings import Kind, Quality, Reading
from gateway.rules import PatientRules, RuleEngine
from gateway.store import ReadingStore
from sensors.ble.bleak_central import BleakCentral
from sensors.ble.link import WearableLink, WearableSpec
from sensors.ble.virtual import (
    VirtualHeartRateStrap,
    VirtualPulseOximeter,
    VirtualRadio,
)
from tests.waiting import until

PATIENT = "pt-0b1e"


class AlarmCollector:
    """Stands in for the alert manager: keeps every event."""

    def __init__(self) -> None:
        self.events: list[AlarmEvent] = []

    async def handle(self, event: AlarmEvent) -> None:
        self.events.append(event)

    def raised(self, suffix: str) -> list[AlarmEvent]:
        return [
            e
            for e in self.events
            if e.action is Action.RAISE and e.condition.endswith(suffix)
        ]


class Tee:
    """A `LinkSink` that forwards to the pipeline and remembers link states."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.states: list[bool] = []
        self.quarantined: list[tuple[str, str, bytes]] = []

    def ingest(self, reading: Reading) -> None:
        self.pipeline.ingest(reading)

    def quarantine(self, source: str, reason: str, payload: bytes) -> None:
        self.quarantined.append((source, reason, payload))
        self.pipeline.quarantine(source, reason, payload)

    def link_state(
        self, device_id: str, patient_ref: str | None, connected: bool
    ) -> None:
        self.states.append(connected)
        self.pipeline.link_state(device_id, patient_ref, connected)


class Ward:
    """One virtual strap, the gateway's link to it, and the real pipeline."""

    def __init__(self, tmp_path: Path, rules: PatientRules) -> None:
        self.radio = VirtualRadio()
        self.strap = VirtualHeartRateStrap(self.radio, battery=77)
        self.store = ReadingStore(tmp_path / "gw.db", flush_interval=0.01)
        self.alarms = AlarmCollector()
        clock = SystemClock()
        engine = RuleEngine(defaults=rules)
        self.pipeline = Pipeline(self.store, engine, self.alarms, clock)
        self.sink = Tee(self.pipeline)
        spec = WearableSpec(patient_ref=PATIENT, address=self.strap.address)
        central = BleakCentral(self.radio.backends())
        self.link = WearableLink(
            spec, central, self.sink, clock=clock, backoff_initial_s=0.2
        )

    async def connected(self) -> None:
        await until(lambda: self.link.state == "connected", 5.0, "connected")

    async def stored(self, kind: Kind) -> list[Reading]:
        await self.store.flush()
        return self.store.readings(patient_ref=PATIENT, kind=kind)


@contextlib.asynccontextmanager
async def ward(tmp_path: Path, **rules: float) -> AsyncIterator[Ward]:
    w = Ward(tmp_path, PatientRules(**rules))
    await w.radio.start()
    await w.strap.start()
    w.store.open()
    w.pipeline.start()
    task = asyncio.create_task(w.link.run(), name="ble-link-test")
    try:
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await w.pipeline.stop()
        await w.strap.stop()
        w.store.close()


def test_bleak_scans_connects_and_reads_the_virtual_strap() -> None:
    async def scenario() -> None:
        radio = VirtualRadio()
        await radio.start()
        strap = VirtualHeartRateStrap(radio, battery=55)
        await strap.start()
        client_backend, scanner_backend = radio.backends()

        found = await BleakScanner.discover(
            0.3, return_adv=True, service_uuids=["180d"], backend=scanner_backend
        )
        (device, adv), *_ = found.values()
        assert (device.address, adv.local_name) == (strap.address, "HRM-Virtual")
        assert "0000180d-0000-1000-8000-00805f9b34fb" in adv.service_uuids
        assert isinstance(adv.rssi, int)

        async with BleakClient(device, backend=client_backend) as client:
            assert await client.read_gatt_char("2a19") == bytearray([55])
            assert await client.read_gatt_char("2a38") == bytearray([1])
            assert client.services.get_service("180d") is not None
        await strap.stop()

    asyncio.run(scenario())


def test_notifications_reach_the_store_with_exact_values(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ward(tmp_path) as w:
            await w.connected()
            before = time.time()
            await w.strap.send_heart_rate(64, (1024, 900))
            await until(lambda: w.link.last_data_at is not None, 2.0, "data")

            (hr,) = await w.stored(Kind.HEART_RATE)
            rr = await w.stored(Kind.RR_INTERVAL)
            assert (hr.value, hr.device_id, hr.quality) == (64.0, w.strap.address, 0)
            assert [r.value for r in rr] == [1000.0, 900 * 1000 / 1024]
            assert rr[1].measured_at == hr.measured_at >= before
            assert rr[0].measured_at == hr.measured_at - 900 / 1024

            (battery,) = await w.stored(Kind.BATTERY)
            assert (battery.value, w.link.battery) == (77.0, 77)
            assert w.sink.states == [True]

    asyncio.run(scenario())


def test_drop_and_return_resubscribes_and_data_resumes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ward(tmp_path) as w:
            await w.connected()
            await w.strap.send_heart_rate(70)
            await w.strap.drop_link(come_back_after_s=0.3)
            await until(lambda: w.link.reconnects == 1, 5.0, "reconnected")
            await until(lambda: w.link.state == "connected", 5.0, "connected")

            await w.strap.send_heart_rate(71)
            await until(lambda: w.pipeline.stats.readings >= 4, 2.0, "resumed")
            values = [r.value for r in await w.stored(Kind.HEART_RATE)]
            assert values == [70.0, 71.0]
            assert w.sink.states == [True, False, True]
            assert w.link.reconnects == 1

    asyncio.run(scenario())


def test_quiet_but_connected_raises_the_stale_alarm(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ward(tmp_path, stale_after_s=2.0) as w:
            await w.connected()
            w.strap.stream(72, every_s=0.1)
            await until(lambda: w.pipeline.stats.readings >= 5, 2.0, "streaming")
            await w.strap.go_quiet()
            quiet_at = time.monotonic()

            while not w.alarms.raised("/stale"):
                assert time.monotonic() - quiet_at < 4.0, "no stale alarm in 4 s"
                w.pipeline.tick()
                await w.pipeline.drain()
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - quiet_at

            assert 2.0 <= elapsed <= 3.5
            (stale,) = w.alarms.raised("/stale")
            assert (stale.category, stale.device_id) == (
                Category.TECHNICAL,
                w.strap.address,
            )
            assert w.link.state == "connected"

    asyncio.run(scenario())


def test_contact_lost_and_hr_zero_are_technical_alarms(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with ward(tmp_path, technical_persistence_s=0.0) as w:
            await w.connected()
            await w.strap.send_contact_lost(bpm=35)
            await w.strap.send_no_reading()
            await until(lambda: w.pipeline.stats.readings >= 3, 2.0, "readings")
            await w.pipeline.drain()

            hr = await w.stored(Kind.HEART_RATE)
            assert [(r.value, r.quality) for r in hr] == [
                (35.0, Quality.CONTACT_LOST),
                (0.0, Quality.NO_READING),
            ]
            raised = [e for e in w.alarms.events if e.action is Action.RAISE]
            assert {e.category for e in raised} == {Category.TECHNICAL}
            assert {e.condition.rsplit("/", 1)[1] for e in raised} == {
                "contact_lost",
                "no_reading",
            }

    asyncio.run(scenario())


def test_tachycardia_and_uint16_heart_rate_come_through_intact(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with ward(tmp_path) as w:
            await w.connected()
            await w.strap.send_tachycardia()
            await w.strap.send_uint16_heart_rate(72)
            await w.strap.send_uint16_heart_rate(300)
            await until(lambda: w.pipeline.stats.readings >= 4, 2.0, "readings")
            values = [r.value for r in await w.stored(Kind.HEART_RATE)]
            assert values == [180.0, 72.0, 300.0]

    asyncio.run(scenario())


def test_oximeter_continuous_measurements_arrive(tmp_path: Path) -> None:
    async def scenario(store: ReadingStore) -> None:
        radio = VirtualRadio()
        await radio.start()
        oximeter = VirtualPulseOximeter(radio)
        await oximeter.start()
        spec = WearableSpec(
            patient_ref=PATIENT, service_uuids=("1822",), profiles=("pulse_oximeter",)
        )
        pipeline = Pipeline(store, RuleEngine(), AlarmCollector(), SystemClock())
        central = BleakCentral(radio.backends())
        link = WearableLink(spec, central, Tee(pipeline), clock=SystemClock())
        task = asyncio.create_task(link.run(), name="ble-link-oximeter")
        await until(lambda: link.state == "connected", 5.0, "connected")
        await oximeter.send_measurement(97, 64)
        await until(lambda: pipeline.stats.readings >= 2, 2.0, "readings")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await oximeter.stop()
        await store.flush()

    with ReadingStore(tmp_path / "gw.db", flush_interval=0.01) as store:
        asyncio.run(scenario(store))
        spo2 = store.readings(patient_ref=PATIENT, kind=Kind.SPO2)
        pulse = store.readings(patient_ref=PATIENT, kind=Kind.PULSE_RATE)
    assert [(r.value, r.device_id) for r in spo2] == [(97.0, "F2:00:00:00:00:01")]
    assert [r.value for r in pulse] == [64.0]
