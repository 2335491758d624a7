"""Replay of real recordings through the same code path a live gateway uses.

Each source module (`mitdb`, `mimic`, `uci`) turns a recording into `ReplayEvent`s
in time order: raw 0x2A37 notifications as a chest strap sends them, readings as a
bedside monitor exports them, MQTT messages as room sensors publish them. `replay`
drives a `ManualClock` through those events, paced or as fast as possible, and hands
each one to the caller, which feeds it to the same decoders and pipeline as live
input.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.clock import ManualClock
from gateway.readings import Reading
from sensors.ble.hrm import decode_heart_rate_measurement, hrm_readings

log = logging.getLogger(__name__)

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"

EventKind = Literal["ble", "reading", "mqtt", "end"]


@dataclass(frozen=True, slots=True)
class ReplayEvent:
    """One thing that happened in a recording, rebased onto the replay's clock.

    Attributes:
        at: When it happens, seconds since the epoch (replay start + offset).
        device_id: The device that sent it.
        kind: "ble" (payload: 0x2A37 bytes), "reading" (payload: a `Reading`) or
            "mqtt" (payload: `(topic, payload bytes)`), or "end" (the recording
            is over: the device was removed on purpose; payload empty).
        payload: What the device sent, as described for `kind`.
    """

    at: float
    device_id: str
    kind: EventKind
    payload: bytes | Reading | tuple[str, bytes]


def data_path(name: str) -> Path:
    """The path of a recording shipped with the package, e.g. "mitdb/100_all.csv".

    Raises:
        FileNotFoundError: No shipped recording has that name (see
            `sensors/data/README.md` for the list).
    """
    path = _DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no shipped recording {name!r} in {_DATA_DIR}")
    return path


def readings_from_hrm(
    data: bytes, *, device_id: str, patient_ref: str | None, at: float
) -> list[Reading]:
    """Decode one 0x2A37 notification into readings (`sensors.ble.hrm.hrm_readings`).

    Raises:
        DecodeError: The payload is malformed.
    """
    m = decode_heart_rate_measurement(data)
    return hrm_readings(m, device_id=device_id, patient_ref=patient_ref, at=at)


def merge(*sources: Iterable[ReplayEvent]) -> Iterator[ReplayEvent]:
    """Merge time-ordered event streams into one, still in time order."""
    return heapq.merge(*sources, key=lambda ev: ev.at)


async def replay(
    events: Iterable[ReplayEvent],
    *,
    speed: float | None,
    clock: ManualClock,
    emit: Callable[[ReplayEvent], Awaitable[None]],
    tick: Callable[[float], Awaitable[None]] | None = None,
    tick_every: float = 5.0,
) -> int:
    """Play events in time order, moving `clock` to each event before emitting it.

    Args:
        events: One time-ordered stream (use `merge` to combine sources).
        speed: Times real time (60 plays a minute per second); None: no pacing.
        clock: Set to each event's time, and to each tick's time.
        emit: Called with each event, after the clock is set.
        tick: Called with the virtual time of every multiple of `tick_every`
            the clock crosses, before the event that crosses it; the agent checks
            stale streams and escalations on ticks.
        tick_every: Virtual seconds between ticks.

    Returns:
        The number of events emitted.

    Raises:
        ValueError: An event is earlier than the one before it, or `speed` or
            `tick_every` is not positive.
    """
    if (speed is not None and speed <= 0) or tick_every <= 0:
        raise ValueError("speed and tick_every must be positive")
    pacer = _Pacer(speed)
    ticker = _Ticker(tick, tick_every, clock)
    last_at = -math.inf
    count = 0
    for ev in events:
        if ev.at < last_at:
            raise ValueError(f"replay events out of order at event {count}")
        last_at = ev.at
        await ticker.until(ev.at, pacer)
        await pacer.wait_for(ev.at)
        clock.set(ev.at)
        await emit(ev)
        count += 1
    log.info("replay finished: %d events", count)
    return count


class _Pacer:
    """Sleeps so that wall time tracks virtual time divided by `speed`."""

    def __init__(self, speed: float | None) -> None:
        self._speed = speed
        self._first_at: float | None = None
        self._wall0 = 0.0

    async def wait_for(self, at: float) -> None:
        loop = asyncio.get_running_loop()
        if self._first_at is None:
            self._first_at, self._wall0 = at, loop.time()
        if self._speed is None:
            # Unpaced replay still yields, so the rest of the loop keeps running.
            await asyncio.sleep(0)
            return
        due = self._wall0 + (at - self._first_at) / self._speed
        await asyncio.sleep(max(0.0, due - loop.time()))


class _Ticker:
    """Calls `tick` at every multiple of `every` virtual seconds that is crossed."""

    def __init__(
        self,
        tick: Callable[[float], Awaitable[None]] | None,
        every: float,
        clock: ManualClock,
    ) -> None:
        self._tick = tick
        self._every = every
        self._clock = clock
        self._n: int | None = None  # index of the next tick: n * every

    async def until(self, at: float, pacer: _Pacer) -> None:
        if self._tick is None:
            return
        if self._n is None:
            self._n = math.floor(at / self._every) + 1
        while (due := self._n * self._every) <= at:
            await pacer.wait_for(due)
            self._clock.set(due)
            await self._tick(due)
            self._n += 1
