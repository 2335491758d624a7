"""systemd notifications: READY, the watchdog from the event loop, STATUS, STOPPING.

A datagram socket bound here stands in for systemd's notification socket. The
agent runs in-process against a real mosquitto; when its event loop is blocked,
the watchdog pings stop, which is what makes systemd restart a stuck gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.agent import Agent
from gateway.broker import LocalBroker
from gateway.config import load_config
from gateway.readings import Kind, Reading
from gateway.sdnotify import ServiceNotifier, watchdog_timeout
from tests.waiting import until, wait_until


@dataclass
class FakeSystemd:
    """Receives notification datagrams on a socket and timestamps them."""

    sock: socket.socket
    address: str
    messages: list[tuple[float, set[str]]] = field(default_factory=list)

    def received(self, key: str) -> list[float]:
        """When each message carrying `key` (``READY=1``, ``WATCHDOG=1``) arrived."""
        return [at for at, fields in self.messages if key in fields]

    def statuses(self) -> list[str]:
        return [
            f.removeprefix("STATUS=")
            for _at, fields in self.messages
            for f in fields
            if f.startswith("STATUS=")
        ]

    def _listen(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return  # closed: the test is over
            self.messages.append((time.monotonic(), set(data.decode().split("\n"))))


def listening(sock: socket.socket, bound_to: str | bytes, address: str) -> FakeSystemd:
    sock.bind(bound_to)
    systemd = FakeSystemd(sock, address)
    threading.Thread(target=systemd._listen, daemon=True).start()
    return systemd


@pytest.fixture
def systemd_path(tmp_path: Path) -> Iterator[FakeSystemd]:
    """Listening on a socket file, as systemd's /run/systemd/notify."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        yield listening(sock, str(path), str(path))
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def systemd_abstract() -> Iterator[FakeSystemd]:
    """Listening on an abstract socket name (written ``@name`` in the variable)."""
    name = f"iomt-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        yield listening(sock, b"\0" + name.encode(), f"@{name}")
        sock.shutdown(socket.SHUT_RDWR)


# -- the notifier on its own -----------------------------------------------------------


def test_fields_go_in_one_datagram_to_a_socket_file(systemd_path: FakeSystemd) -> None:
    notifier = ServiceNotifier(systemd_path.address)
    assert notifier.send("READY=1", "STATUS=3 readings")
    notifier.stopping()
    wait_until(lambda: len(systemd_path.messages) == 2)
    assert [fields for _at, fields in systemd_path.messages] == [
        {"READY=1", "STATUS=3 readings"},
        {"STOPPING=1", "STATUS=stopping"},
    ]
    assert notifier.sent == 2


def test_an_abstract_socket_name_is_reached(systemd_abstract: FakeSystemd) -> None:
    assert ServiceNotifier(systemd_abstract.address).send("READY=1")
    wait_until(lambda: systemd_abstract.received("READY=1") != [])


def test_outside_systemd_nothing_is_sent_and_run_returns() -> None:
    notifier = ServiceNotifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.send("READY=1")
    asyncio.run(asyncio.wait_for(notifier.run(lambda: "idle"), timeout=1))
    assert notifier.sent == 0


def test_a_missing_socket_is_logged_once_and_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = ServiceNotifier(str(tmp_path / "gone"))
    assert not notifier.send("WATCHDOG=1")
    assert not notifier.send("WATCHDOG=1")
    sent = [r for r in caplog.records if r.name == "gateway.sdnotify"]
    assert [r.levelno for r in sent] == [logging.WARNING]
    assert "No such file or directory" in sent[0].getMessage()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_timeout_is_read_from_the_environment(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_timeout(env) == expected


def test_run_sends_ready_then_watchdog_pings_with_status(
    systemd_path: FakeSystemd,
) -> None:
    notifier = ServiceNotifier(systemd_path.address, watchdog_s=0.2)
    count = iter(range(100))

    async def scenario() -> None:
        task = asyncio.create_task(notifier.run(lambda: f"{next(count)} readings"))
        await asyncio.sleep(0.55)
        task.cancel()

    asyncio.run(scenario())
    wait_until(lambda: len(systemd_path.messages) >= 5)
    first = systemd_path.messages[0][1]
    assert first == {"READY=1", "STATUS=0 readings"}
    pings = systemd_path.received("WATCHDOG=1")
    # Every 0.1 s (half the timeout) for 0.55 s: five, give or take a slow machine.
    assert 3 <= len(pings) <= 6
    assert systemd_path.statuses()[:3] == ["0 readings", "1 readings", "2 readings"]


# -- the agent under a notifying service manager ---------------------------------------


CONFIG = """
[gateway]
id = "notify-gw"
data_dir = "{data_dir}"

[mqtt]
port = {port}
client_id = "notify-gw-{tag}"

[alerts]
targets = ["mqtt"]
"""

WATCHDOG_S = 0.4
BLOCK_S = 3.0


@pytest.mark.broker
@pytest.mark.slow
def test_the_agent_pings_from_its_loop_and_a_blocked_loop_goes_silent(
    tmp_path: Path,
    broker: LocalBroker,
    systemd_abstract: FakeSystemd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd_abstract.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    path = tmp_path / "gateway.toml"
    path.write_text(
        CONFIG.format(
            data_dir=tmp_path / "state", port=broker.port, tag=uuid.uuid4().hex[:6]
        )
    )
    blocked: list[float] = []

    def block() -> None:
        blocked.append(time.monotonic())
        time.sleep(BLOCK_S)  # what a blocking call on the loop would do
        blocked.append(time.monotonic())

    async def scenario() -> None:
        agent = Agent(load_config(path))
        await agent.start()
        try:
            await until(lambda: systemd_abstract.received("READY=1") != [])
            agent.pipeline.ingest(
                Reading(
                    "strap-1", Kind.HEART_RATE, 72.0, time.time(), patient_ref="p-1"
                )
            )
            await asyncio.sleep(1.0)
            asyncio.get_running_loop().call_soon(block)
            await asyncio.sleep(0)  # the block runs here
            await asyncio.sleep(1.0)
        finally:
            await agent.stop()

    asyncio.run(scenario())
    wait_until(lambda: systemd_abstract.received("STOPPING=1") != [])
    ready = systemd_abstract.received("READY=1")
    pings = systemd_abstract.received("WATCHDOG=1")
    start, end = blocked
    before = [t for t in pings if t < start]
    during = [t for t in pings if start + 0.1 < t < end]
    after = [t for t in pings if t >= end]

    assert len(ready) == 1 and ready[0] < pings[0]
    # Pings every WATCHDOG_S / 2 = 0.2 s: about five in the second before the
    # block and in the second after it (loose bounds: a shared, slow machine).
    assert len(before) >= 3
    assert during == []
    assert len(after) >= 3
    # The silence outlasts the watchdog timeout: systemd would have restarted us.
    assert after[0] - before[-1] > BLOCK_S > WATCHDOG_S
    assert "1 readings, 0 quarantined" in systemd_abstract.statuses()[-2]
    assert systemd_abstract.messages[-1][1] == {"STOPPING=1", "STATUS=stopping"}
