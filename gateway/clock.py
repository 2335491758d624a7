"""Clocks: the wall clock for a live gateway, a settable one for replay and tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where the agent's rules and timers read the time (seconds since the epoch)."""

    def now(self) -> float:
        """The current time."""
        ...


class SystemClock:
    """The gateway's wall clock."""

    def now(self) -> float:
        """The current wall-clock time."""
        return time.time()


class ManualClock:
    """A clock that moves only when told to: replay drives it, and so do tests."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        """The time last set."""
        return self._now

    def set(self, when: float) -> None:
        """Move to `when`; the clock never goes backwards."""
        self._now = max(self._now, when)

    def advance(self, seconds: float) -> None:
        """Move forward by `seconds`."""
        self._now += seconds
