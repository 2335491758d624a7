"""Fixtures shared by the tests that run real parts: mosquitto, an HTTP receiver."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.broker import LocalBroker
from tests.http_receiver import HttpReceiver


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A mosquitto of this test's own, persistence on, on a free loopback port."""
    with LocalBroker() as b:
        yield b


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    """An HTTP receiver standing in for a push service (apprise json:// URLs)."""
    with HttpReceiver() as rx:
        yield rx


AgentStarter = Callable[[Path], subprocess.Popen]


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentStarter]:
    """Start `iomt-gateway run --config PATH` as a process; its log is agent.log.

    Whatever is still running at the end of the test is killed.
    """
    procs: list[subprocess.Popen] = []

    def start(config: Path) -> subprocess.Popen:
        with (tmp_path / "agent.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
