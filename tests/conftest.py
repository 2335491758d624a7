"""Fixtures shared by the tests that run real parts: mosquitto, an HTTP receiver."""

from __future__ import annotations

from collections.abc import Iterator

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
