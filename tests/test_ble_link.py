"""The wearable link manager against the in-memory `FakeCentral`.

State machine, backoff, re-subscription and wedge-proofing. Timeouts here are
real-sized (connect >= 10 s): the tests run on an event loop whose clock skips
ahead whenever it would sleep, so a 10 s timeout costs no wall time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import selectors
from collections.abc import Coroutine
from typing import Any

import pytest
from bleak.exc import BleakDBusError, BleakError

from gateway.clock import ManualClock
from gateway.readings import Kind, Quality, Reading
from sensors.ble.bleak_central import (
    HANG,
    Advertisement,
    BleError,
    BleErrorReason,
    FakeCentral,
    FakeDevice,
    matches,
    short_uuid,
    translate,
)
from sensors.ble.hrm import encode_heart_rate_measurement
from sensors.ble.link import WearableLink, WearableSpec
from tests.waiting import until

ADDRESS = "C0:FF:EE:00:00:01"
PATIENT = "pt-7f3a"


class RecordingSink:
    """A list-backed `LinkSink`."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.quarantined: list[tuple[str, str, bytes]] = []
        self.states: list[tuple[str, str | None, bool]] = []

    def ingest(self, reading: Reading) -> None:
        self.readings.append(reading)

    def quarantine(self, source: str, reason: str, payload: bytes) -> None:
        self.quarantined.append((source, reason, payload))

    def link_state(
        self, device_id: str, patient_ref: str | None, connected: bool
    ) -> None:
        self.states.append((device_id, patient_ref, connected))


class _SkipAheadLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps over idle waits (timers fire at once)."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.skipped = 0.0
        select = self._selector.select  # type: ignore[attr-defined]

        def skip_ahead(timeout: float | None = None) -> list[Any]:
            ready = select(0)
            if not ready and timeout:
                self.skipped += timeout
            return ready if ready or timeout is not None else select(None)

        self._selector.select = skip_ahead  # type: ignore[attr-defined]

    def time(self) -> float:
        return super().time() + self.skipped


def run_fast(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on a skip-ahead loop."""
    with asyncio.Runner(loop_factory=_SkipAheadLoop) as runner:
        return runner.run(coro)


def make_link(
    central: FakeCentral, sink: RecordingSink, **spec_args: Any
) -> WearableLink:
    spec = WearableSpec(patient_ref=PATIENT, address=ADDRESS, **spec_args)
    return WearableLink(
        spec, central, sink, clock=ManualClock(1_700_000_000.0), rng=random.Random(7)
    )


async def _running(link: WearableLink) -> asyncio.Task[None]:
    return asyncio.create_task(link.run(), name="test-link")


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_notifications_become_readings_stamped_by_the_clock() -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    link = make_link(central, sink)

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        payload = encode_heart_rate_measurement(72, (1024, 512))
        assert central.notify(ADDRESS, "2a37", payload)
        await _stop(task)

    run_fast(scenario())
    hr, rr1, rr2 = (r for r in sink.readings if r.kind is not Kind.BATTERY)
    assert (hr.kind, hr.value, hr.patient_ref, hr.device_id) == (
        Kind.HEART_RATE,
        72.0,
        PATIENT,
        ADDRESS,
    )
    assert (rr1.value, rr2.value) == (1000.0, 500.0)
    assert rr2.measured_at == hr.measured_at == 1_700_000_000.0
    assert rr1.measured_at == hr.measured_at - 0.5
    assert link.last_data_at == 1_700_000_000.0
    assert sink.states == [(ADDRESS, PATIENT, True)]


def test_battery_read_on_connect_and_on_schedule() -> None:
    device = FakeDevice(ADDRESS, values={"2a19": bytes([64])})
    central, sink = FakeCentral(device), RecordingSink()
    link = make_link(central, sink, battery_every_s=30.0)

    async def scenario() -> float:
        task = await _running(link)
        await until(lambda: link.battery == 64, what="battery read")
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(95.0)
        await _stop(task)
        return asyncio.get_running_loop().time() - start

    elapsed = run_fast(scenario())
    assert elapsed >= 95.0
    conn = central.connections[0]
    assert conn.reads == ["2a19"] * 4  # on connect, then at 30, 60 and 90 s
    battery = [r for r in sink.readings if r.kind is Kind.BATTERY]
    assert [b.value for b in battery] == [64.0] * 4


def test_drop_and_return_resubscribes_on_a_new_connection() -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    link = make_link(central, sink)

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        central.connections[0].drop()
        await until(lambda: link.reconnects == 1, what="reconnected")
        assert list(central.connections[-1].subscriptions) == ["2a37"]
        assert central.notify(ADDRESS, "2a37", encode_heart_rate_measurement(80))
        await _stop(task)

    run_fast(scenario())
    first, second = central.connections
    assert first is not second
    assert [s[2] for s in sink.states] == [True, False, True]
    assert [r.value for r in sink.readings if r.kind is Kind.HEART_RATE] == [80.0]


def test_a_hanging_connect_is_abandoned_after_its_timeout_and_retried() -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    central.inject("connect", HANG)
    link = make_link(central, sink, connect_timeout_s=10.0)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        elapsed = loop.time() - start
        await _stop(task)
        return elapsed

    elapsed = run_fast(scenario())
    assert central.calls["connect"] == 2
    assert 10.0 <= elapsed <= 10.0 + 1.0 + link.backoff_initial_s + 0.5
    assert link.reconnects == 0


def test_a_hanging_scan_is_abandoned_too() -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    central.inject("find", HANG)
    link = make_link(central, sink)

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        await _stop(task)

    run_fast(scenario())
    assert central.calls["find"] == 2


def test_backoff_grows_with_full_jitter_within_bounds() -> None:
    link = make_link(FakeCentral(), RecordingSink())
    link.backoff_initial_s, link.backoff_max_s = 1.0, 8.0
    delays = [link.next_backoff() for _ in range(40)]

    bounds = [min(8.0, 2.0**n) for n in range(40)]
    assert all(0.0 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert len(set(delays)) == 40  # jittered, never in lock-step
    assert max(delays[:3]) <= 4.0
    assert max(delays[10:]) > 4.0  # it did grow past the early bounds


def test_missing_dbus_logs_one_clear_error_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    no_bus = FileNotFoundError(2, "No such file or directory")
    central.inject("find", no_bus, no_bus, no_bus, no_bus)
    link = make_link(central, sink)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        await _stop(task)
        return loop.time() - start

    with caplog.at_level(logging.DEBUG, logger="sensors.ble.link"):
        elapsed = run_fast(scenario())

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "is bluetoothd running?" in errors[0].getMessage()
    assert "/run/dbus/system_bus_socket" in errors[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)
    assert elapsed >= 4 * link.backoff_max_s  # retried at the max backoff
    assert all(PATIENT not in r.getMessage() for r in caplog.records)


def test_in_progress_is_retried_quietly(caplog: pytest.LogCaptureFixture) -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    central.inject(
        "connect",
        BleakDBusError("org.bluez.Error.InProgress", ["Operation already in progress"]),
        BleakError("Operation already in progress"),
    )
    link = make_link(central, sink)

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        await _stop(task)

    with caplog.at_level(logging.DEBUG, logger="sensors.ble.link"):
        run_fast(scenario())
    assert central.calls["connect"] == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"wearable {ADDRESS} connected"
    ]


def test_malformed_notification_is_quarantined_not_ingested() -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    link = make_link(central, sink, profiles=("heart_rate",))

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        central.notify(ADDRESS, "2a37", b"\x01\x48")  # uint16 HR flagged, 1 byte
        await _stop(task)

    run_fast(scenario())
    assert sink.readings == []
    (source, reason, payload), *_ = sink.quarantined
    assert (source, payload) == (f"ble:{ADDRESS}", b"\x01\x48")
    assert "too short" in reason


def test_contact_lost_and_hr_zero_carry_technical_flags() -> None:
    central, sink = FakeCentral(FakeDevice(ADDRESS)), RecordingSink()
    link = make_link(central, sink, profiles=("heart_rate",))

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        central.notify(ADDRESS, "2a37", encode_heart_rate_measurement(0))
        central.notify(
            ADDRESS, "2a37", encode_heart_rate_measurement(60, contact=False)
        )
        await _stop(task)

    run_fast(scenario())
    zero, no_contact = sink.readings
    assert zero.quality == Quality.NO_READING
    assert no_contact.quality == Quality.CONTACT_LOST


def test_missing_characteristic_is_one_warning_then_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = FakeDevice(ADDRESS, notifiable=())
    central, sink = FakeCentral(device), RecordingSink()
    link = make_link(central, sink)

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: central.calls["connect"] >= 3, what="retries")
        await _stop(task)

    with caplog.at_level(logging.DEBUG, logger="sensors.ble.link"):
        run_fast(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert sink.states == []


def test_found_by_name_pattern_and_service() -> None:
    strap = FakeDevice("C0:FF:EE:00:00:02", name="Polar H10 1A2B3C")
    other = FakeDevice("C0:FF:EE:00:00:03", name="Thermo", service_uuids=("1809",))
    central, sink = FakeCentral(other, strap), RecordingSink()
    spec = WearableSpec(patient_ref=PATIENT, name_pattern=r"^Polar H10")
    link = WearableLink(spec, central, sink, clock=ManualClock())

    async def scenario() -> None:
        task = await _running(link)
        await until(lambda: link.state == "connected", what="connected")
        await _stop(task)

    run_fast(scenario())
    assert sink.states == [(strap.address, PATIENT, True)]
    assert link.rssi == -60


def test_matching_rules() -> None:
    adv = Advertisement("AA:BB:CC:DD:EE:FF", "HRM", -50, ("180d", "180f"))
    spec = WearableSpec(patient_ref=PATIENT, address="aa:bb:cc:dd:ee:ff")
    assert matches(spec, adv)
    assert not matches(WearableSpec(patient_ref=PATIENT, service_uuids=("1822",)), adv)
    assert matches(WearableSpec(patient_ref=PATIENT, name_pattern="^HR"), adv)
    assert short_uuid("0000180D-0000-1000-8000-00805F9B34FB") == "180d"


def test_errors_are_translated_with_their_cause() -> None:
    cases = {
        FileNotFoundError(2, "No such file"): BleErrorReason.BLUEZ_UNAVAILABLE,
        TimeoutError(): BleErrorReason.TIMEOUT,
        BleakError("Operation already in progress"): BleErrorReason.IN_PROGRESS,
        BleakError("something else"): BleErrorReason.FAILED,
    }
    for raw, reason in cases.items():
        err = translate(raw, ADDRESS)
        assert (err.reason, err.address) == (reason, ADDRESS)
        assert isinstance(err, BleError)


def test_spec_refuses_short_connect_timeouts_and_unknown_profiles() -> None:
    with pytest.raises(ValueError, match="connect_timeout_s"):
        WearableSpec(patient_ref=PATIENT, connect_timeout_s=5.0)
    with pytest.raises(ValueError, match="unknown profiles"):
        WearableSpec(patient_ref=PATIENT, profiles=("ecg",))
