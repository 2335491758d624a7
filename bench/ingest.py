"""Room-sensor ingest benchmark: prints one JSON object.

The gateway process is pinned to one core (mosquitto and the publisher run on
another). Two subscribers drain the same N QoS-1 messages, queued by the broker
for their persistent sessions by the same publisher:

- bare: a paho client that only counts (paho acknowledges on receipt);
- gateway: MqttLink (manual ack) -> RoomSensorAdapter -> Pipeline (rules) ->
  ReadingStore (synchronous=FULL) -> ack after commit; only committed readings
  count.

Then a paced run at `--rate` readings/s measures publish-to-stored latency (the
sensor's timestamp is the publish time; "stored" is the commit callback).

Both subscribers find the whole backlog already queued in their session, and the
broker's inflight window (5000) exceeds what either leaves unacknowledged, so the
figures are the subscribers' own, not the publisher's or the broker's. `--protocol`
picks MQTT 5 (the agent's default) or 3.1.1 for both: paho decodes a Properties
object for every MQTT 5 PUBLISH, which costs about a third of a bare subscriber's
time.

Usage: .venv/bin/python bench/ingest.py [--messages 50000] [--rate 1000]
       [--protocol 5|4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from gateway.alarms import AlarmEvent
from gateway.broker import LocalBroker
from gateway.clock import SystemClock
from gateway.config import Config
from gateway.paho import MqttLink, MqttSettings
from gateway.pipeline import Pipeline
from gateway.readings import Kind, Reading
from gateway.rules import RuleEngine
from gateway.store import ReadingStore
from sensors.room import RoomSensorAdapter, RoomSensorDecoder, TopicMap

ROOMS = 50
MAPS = [
    TopicMap("ward/+/co2", Kind.CO2, format="number"),
    TopicMap("ward/+/temperature", Kind.ROOM_TEMPERATURE),
]


# -- the publisher (a child process, on the broker's core) ---------------------------


def publish(port: int, count: int, rate: float, timed: bool) -> None:
    """Publish `count` QoS-1 readings, as fast as possible or at `rate` per second."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4()}"
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.monotonic()
    infos = []
    for i in range(count):
        room = i % ROOMS
        if timed:
            topic = f"ward/{room}/temperature"
            payload = b'{"ts": %.6f, "value": 21.5}' % time.time()
        else:
            topic, payload = f"ward/{room}/co2", b"%d" % (400 + i % 1000)
        infos.append(client.publish(topic, payload, qos=1))
        if rate:
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def run_publisher(
    port: int, count: int, cpu: int, rate: float = 0, timed: bool = False
):
    args = [sys.executable, __file__, "--publish", str(port), str(count), str(rate)]
    proc = subprocess.Popen([*args, "timed" if timed else "plain"])
    os.sched_setaffinity(proc.pid, {cpu})
    return proc


# -- the two subscribers ------------------------------------------------------------


def _client(client_id: str, protocol: int) -> mqtt.Client:
    v5 = protocol == 5
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
    )


def _connect_persistent(client: mqtt.Client, port: int, protocol: int) -> None:
    if protocol != 5:
        client.connect("127.0.0.1", port)  # clean_session=False: kept for ever
        return
    props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)


def park_session(port: int, client_id: str, protocol: int) -> None:
    """Create a persistent QoS-1 session, then leave: the broker queues for it."""
    client = _client(client_id, protocol)
    _connect_persistent(client, port, protocol)
    client.loop_start()
    client.subscribe("ward/#", qos=1)[1]
    time.sleep(0.3)
    client.disconnect()
    client.loop_stop()


def bare_rate(port: int, client_id: str, count: int, protocol: int) -> float:
    """Messages/s a paho client that only counts takes from its queued session."""
    done = threading.Event()
    seen = [0, 0.0]

    def on_message(client, userdata, msg) -> None:
        seen[0] += 1
        if seen[0] == count:
            seen[1] = time.perf_counter()
            done.set()

    client = _client(client_id, protocol)
    client.on_message = on_message
    start = time.perf_counter()
    _connect_persistent(client, port, protocol)
    client.loop_start()
    done.wait(300)
    client.disconnect()
    client.loop_stop()
    return count / (seen[1] - start)


class NullAlarms:
    """Alarm events end here: the benchmark measures ingest, not delivery."""

    async def handle(self, event: AlarmEvent) -> None:
        return None


async def gateway_rate(
    port: int, client_id: str, count: int, db: Path, protocol: int
) -> dict:
    """Readings/s the gateway's path commits, acking each after its commit."""
    with ReadingStore(db, batch_size=2000, flush_interval=0.01) as store:
        pipeline = _pipeline(store)
        link, adapter = _adapter(port, client_id, pipeline.ingest, pipeline, protocol)
        start = time.perf_counter()
        await link.connect()
        while store.stats.committed + store.stats.duplicates < count:
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
        await link.close()
        await pipeline.stop()
        return {
            "readings_per_s": round(count / elapsed),
            "committed": store.stats.committed,
            "batches": store.stats.batches,
            "received": adapter.counters.received,
        }


async def latency(
    port: int, count: int, rate: float, db: Path, cpu: int, protocol: int
) -> dict:
    """Publish-to-stored latency at a paced rate (sensor timestamp = publish time)."""
    delays: list[float] = []
    with ReadingStore(db, batch_size=2000, flush_interval=0.01) as store:
        pipeline = _pipeline(store)

        def ingest(reading: Reading, ack) -> None:
            def stored() -> None:
                delays.append(time.time() - reading.measured_at)
                ack()

            pipeline.ingest(reading, stored)

        link, _ = _adapter(port, f"lat-{uuid.uuid4()}", ingest, pipeline, protocol)
        await link.connect()
        await asyncio.sleep(0.5)
        publisher = run_publisher(port, count, cpu, rate=rate, timed=True)
        while len(delays) < count:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(publisher.wait)
        await link.close()
        await pipeline.stop()
    delays.sort()
    return {
        "rate_per_s": rate,
        "p50_ms": round(statistics.median(delays) * 1000, 2),
        "p99_ms": round(delays[int(len(delays) * 0.99) - 1] * 1000, 2),
        "max_ms": round(delays[-1] * 1000, 2),
    }


def _pipeline(store: ReadingStore) -> Pipeline:
    config = Config()
    defaults, patients = config.patient_rules()
    rules = RuleEngine(defaults, patients, config.rooms.to_rules())
    pipeline = Pipeline(store, rules, NullAlarms(), SystemClock())
    pipeline.start()
    return pipeline


def _adapter(
    port, client_id, ingest, pipeline, protocol
) -> tuple[MqttLink, RoomSensorAdapter]:
    settings = MqttSettings(port=port, client_id=client_id, protocol=protocol)
    link = MqttLink(settings, manual_ack=True)
    adapter = RoomSensorAdapter(
        link,
        RoomSensorDecoder(MAPS, clock=SystemClock()),
        ingest=ingest,
        quarantine=pipeline.quarantine,
        filters=["ward/#"],
    )
    adapter.start()
    return link, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--latency-s", type=float, default=5.0)
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=5)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    ours, other = cpus[0], cpus[-1]
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalBroker(max_inflight=5000) as broker,
    ):
        os.sched_setaffinity(broker._proc.pid, {other})
        os.sched_setaffinity(0, {ours})
        bare_id, gw_id = f"bare-{uuid.uuid4()}", f"gw-{uuid.uuid4()}"
        park_session(broker.port, bare_id, args.protocol)
        park_session(broker.port, gw_id, args.protocol)
        run_publisher(broker.port, args.messages, other).wait()
        bare = bare_rate(broker.port, bare_id, args.messages, args.protocol)
        db = Path(tmp) / "a.db"
        gateway = asyncio.run(
            gateway_rate(broker.port, gw_id, args.messages, db, args.protocol)
        )
        paced = asyncio.run(
            latency(
                broker.port,
                int(args.rate * args.latency_s),
                args.rate,
                Path(tmp) / "b.db",
                other,
                args.protocol,
            )
        )
    print(
        json.dumps(
            {
                "messages": args.messages,
                "protocol": "5" if args.protocol == 5 else "3.1.1",
                "cpus": {"gateway": ours, "broker_and_publisher": other},
                "bare_paho_per_s": round(bare),
                "gateway": gateway,
                "ratio": round(gateway["readings_per_s"] / bare, 3),
                "latency": paced,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        port, count, rate, mode = sys.argv[2:6]
        publish(int(port), int(count), float(rate), mode == "timed")
    else:
        main()
