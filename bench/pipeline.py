"""Pipeline benchmark: readings/s through decode, store and rules; alert latency.

Prints one JSON object. Throughput is measured on one core (the process and the
store's writer thread pinned together), with MIT-BIH record 100 replayed as 0x2A37
notifications, and reported against a baseline measured in the same run: the same
notifications through the decoder alone. The full path is the agent's: decode, store,
rules, and every fourth beat's RR window scored through TFLite (the scores stored and
evaluated as readings too). Latency is from a reading's arrival in the
pipeline to its alert committed in the outbox (synchronous=FULL), while background
readings flow at about 1,000 per second.

Usage: python bench/pipeline.py [--repeat N] [--alerts N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.alarms import AlarmEvent
from gateway.alerts import AlertManager
from gateway.clock import SystemClock
from gateway.litert import Scorer
from gateway.notify import MemoryNotifier
from gateway.outbox import Outbox
from gateway.pipeline import Pipeline
from gateway.readings import Kind, Reading
from gateway.rules import PatientRules, RuleEngine
from gateway.scoring import RhythmScorer
from gateway.store import ReadingStore
from models import INITIAL_PATH
from sensors.replay import data_path, mitdb, readings_from_hrm

SCORED: list[int] = []
"""RR windows scored by the model in each full-path run."""

STRAPS = 20


def notifications(repeat: int) -> list[tuple[str, float, bytes]]:
    """Record 100 as strap notifications, once per strap, `repeat` hours apart."""
    events = list(
        mitdb.heart_rate_notifications(
            data_path("mitdb/100_all.csv"), start=0.0, device_id="s"
        )
    )
    out = []
    for rep in range(repeat):
        for strap in range(STRAPS):
            shift = rep * 3600.0
            out += [(f"strap-{strap}", ev.at + shift, ev.payload) for ev in events]
    return out  # type: ignore[return-value]


def decode_only(items: list[tuple[str, float, bytes]]) -> tuple[int, float]:
    began = time.perf_counter()
    n = 0
    for device, at, data in items:
        n += len(readings_from_hrm(data, device_id=device, patient_ref=device, at=at))
    return n, time.perf_counter() - began


async def full_path(
    items: list[tuple[str, float, bytes]], folder: Path
) -> tuple[int, float]:
    store = ReadingStore(folder / "throughput.db")
    store.open()
    outbox = Outbox(folder / "throughput-outbox.db")
    alerts = AlertManager(outbox, {"mem": MemoryNotifier()}, ["mem"], [], SystemClock())
    # As in the agent: each strap's RR windows are scored through TFLite as they
    # complete, and the scores are stored and evaluated too.
    scorer = RhythmScorer(Scorer(INITIAL_PATH))
    pipeline = Pipeline(store, RuleEngine(), alerts, SystemClock(), scorer)
    pipeline.start()
    began = time.perf_counter()
    n = 0
    for device, at, data in items:
        for r in readings_from_hrm(data, device_id=device, patient_ref=device, at=at):
            pipeline.ingest(r)
            n += 1
    await store.flush()
    await pipeline.drain()
    elapsed = time.perf_counter() - began
    assert store.count() == n + scorer.scored, (store.count(), n, scorer.scored)
    SCORED.append(scorer.scored)
    await pipeline.stop()
    store.close()
    outbox.close()
    return n, elapsed


async def latency(folder: Path, n_alerts: int) -> list[float]:
    store = ReadingStore(folder / "latency.db")
    store.open()
    outbox = Outbox(folder / "latency-outbox.db")
    notifier = MemoryNotifier()
    alerts = AlertManager(outbox, {"mem": notifier}, ["mem"], [], SystemClock())
    await alerts.start()
    rules = PatientRules(persistence_s=0, clear_after_s=0, stale_after_s=1e9)
    pipeline = Pipeline(store, RuleEngine(rules), alerts, SystemClock())
    pipeline.start()

    arrivals: dict[str, float] = {}
    measured: list[float] = []
    handle = alerts.handle

    async def timed(event: AlarmEvent) -> object:
        result = await handle(event)
        if result is not None:
            measured.append(time.perf_counter() - arrivals.pop(event.condition))
        return result

    alerts.handle = timed  # type: ignore[method-assign]
    t = 0.0
    for i in range(n_alerts):
        # 50 ms of background at 1,000 readings/s, then one crossing and its return.
        for j in range(50):
            t += 0.001
            pipeline.ingest(
                Reading(f"bg-{j % 10}", Kind.HEART_RATE, 72, t, f"bg-{j % 10}")
            )
            if j % 10 == 0:
                await asyncio.sleep(0.01)
        patient = f"p-{i % 25}"
        arrivals[f"{patient}/heart_rate"] = time.perf_counter()
        pipeline.ingest(Reading(f"d-{patient}", Kind.HEART_RATE, 140, t, patient))
        await pipeline.drain()
        pipeline.ingest(Reading(f"d-{patient}", Kind.HEART_RATE, 70, t + 1e-4, patient))
    await pipeline.drain()
    await store.flush()
    await pipeline.stop()
    await alerts.stop()
    store.close()
    outbox.close()
    return measured


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--alerts", type=int, default=200)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    items = notifications(args.repeat)
    with tempfile.TemporaryDirectory(prefix="iomt-bench-") as tmp:
        folder = Path(tmp)
        base_n, base_s = decode_only(items)
        full_n, full_s = asyncio.run(full_path(items, folder))
        lat = asyncio.run(latency(folder, args.alerts))
    result = {
        "benchmark": "pipeline",
        "cores": 1,
        "notifications": len(items),
        "readings": full_n,
        "baseline_decode_only_readings_per_s": round(base_n / base_s),
        "decode_store_rules_score_readings_per_s": round(full_n / full_s),
        "rr_windows_scored": SCORED[-1],
        "ratio_to_decode_only": round((full_n / full_s) / (base_n / base_s), 3),
        "alert_latency_samples": len(lat),
        "alert_latency_p50_ms": round(pct(lat, 50) * 1e3, 2),
        "alert_latency_p99_ms": round(pct(lat, 99) * 1e3, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
