"""Room-sensor ingest guarantees against a real mosquitto, persistence on.

Every reading a broker has handed over is stored exactly once: across an agent
killed with SIGKILL, a broker restart, a broker down for a minute, and redeliveries
of messages the gateway stamped itself. Bad input is quarantined with its reason,
and the link runs over TLS (mutual TLS, credentials from a file).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.broker import BrokerTls, LocalBroker
from gateway.clock import SystemClock
from gateway.errors import ConfigUnreadableError
from gateway.paho import MqttLink, MqttSettings, read_credentials
from gateway.readings import Kind, Reading
from gateway.store import Delivery, ReadingStore
from sensors.room import RoomSensorAdapter, RoomSensorDecoder, TopicMap
from tests.conftest import AgentStarter
from tests.waiting import until, wait_until

pytestmark = pytest.mark.broker

MAPS = [
    TopicMap("ward/+/co2", Kind.CO2, format="number"),
    TopicMap("ward/+/temperature", Kind.ROOM_TEMPERATURE),
    TopicMap("zigbee2mqtt/+", format="zigbee2mqtt", room_level=1),
    TopicMap("senml/+", format="senml", room_level=1),
    TopicMap("tele/+/SENSOR", format="tasmota", room_level=1),
]


# -- helpers ----------------------------------------------------------------------


class Publisher:
    """A plain paho publisher, as a sensor gateway would run: QoS 1, own session."""

    def __init__(self, broker: LocalBroker) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sensors-{uuid.uuid4()}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.acked = 0
        self.client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acked += 1

    def send(self, topic: str, payload: bytes) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1))

    def wait_all(self, timeout: float = 120) -> None:
        # Counted in on_publish: a message published while the broker is away is
        # kept and resent by paho, but its info reports the failed first send.
        deadline = time.monotonic() + timeout
        while self.acked < len(self.infos):
            assert time.monotonic() < deadline, "publisher still has unacked messages"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def db_counts(path: Path) -> tuple[int, int]:
    """(rows, distinct values) in the readings table; (0, 0) before it exists."""
    if not path.exists():
        return 0, 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(
            "SELECT count(*), count(DISTINCT value) FROM readings"
        ).fetchone()
    except sqlite3.OperationalError:
        return 0, 0
    finally:
        db.close()


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


AGENT_CONFIG = """
[gateway]
id = "gw-ingest"
data_dir = "{data_dir}"

[store]
flush_interval_s = 0.02

[mqtt]
port = {port}
client_id = "gw-ingest-{tag}"

[[mqtt.topics]]
filter = "ward/+/co2"
kind = "co2"
format = "number"

[[mqtt.topics]]
filter = "ward/+/temperature"
kind = "room_temperature"
"""


@pytest.fixture
def agent(
    tmp_path: Path, broker: LocalBroker, agent_process: AgentStarter
) -> Callable[[], subprocess.Popen]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        AGENT_CONFIG.format(
            data_dir=tmp_path / "state", port=broker.port, tag=uuid.uuid4().hex[:8]
        )
    )

    def start() -> subprocess.Popen:
        proc = agent_process(config)
        wait_until(lambda: retained(broker, STATUS) == b"online", what="agent online")
        return proc

    return start


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


STATUS = "iomt/gw-ingest/status/ingest"


def retained(broker: LocalBroker, topic: str) -> bytes | None:
    async def fetch() -> bytes | None:
        got: list[bytes] = []
        link = MqttLink(
            MqttSettings(port=broker.port, client_id=f"look-{uuid.uuid4()}")
        )
        link.subscribe(topic, lambda m: got.append(m.payload), qos=1)
        await link.connect()
        try:
            await until(lambda: bool(got), timeout=2)
        except TimeoutError:
            return None
        finally:
            await link.close()
        return got[-1]

    return asyncio.run(fetch())


# -- the agent as a process ---------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_stream_then_every_reading_stored_exactly_once(
    tmp_path: Path, broker: LocalBroker, agent
) -> None:
    # No timestamps: the gateway stamps each reading, so only the message identity
    # can tell a redelivery (after commit, before PUBACK) from a new reading.
    db = tmp_path / "state" / "readings.db"
    first = agent()
    publisher = Publisher(broker)
    sender = threading.Thread(
        target=lambda: [publisher.send("ward/3/co2", b"%d" % i) for i in range(5000)]
    )
    sender.start()
    wait_until(lambda: db_counts(db)[0] >= 1000, timeout=60, what="1000 stored")
    first.kill()
    first.wait()
    sender.join()
    publisher.wait_all()
    killed_at = db_counts(db)[0]

    assert integrity(db) == "ok"
    assert retained(broker, STATUS) == b"offline"
    second = agent()
    wait_until(lambda: db_counts(db)[0] >= 5000, timeout=120, what="all stored")
    time.sleep(1.0)  # would a redelivered copy still add a row?
    stop(second)
    publisher.close()

    assert killed_at < 5000
    assert db_counts(db) == (5000, 5000)
    assert integrity(db) == "ok"


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing_and_stores_no_duplicate(
    tmp_path: Path, broker: LocalBroker, agent
) -> None:
    db = tmp_path / "state" / "readings.db"
    proc = agent()
    publisher = Publisher(broker)
    # Recent sensor times: older than 7 days would be quarantined, not stored.
    first_ts = int(time.time()) - 3600
    for i in range(3000):
        if i == 1500:
            broker.restart()
        payload = b'{"ts": %d, "value": %d.5}' % (first_ts + i, i % 60)
        publisher.send("ward/4/temperature", payload)
    publisher.wait_all()
    # The agent's reconnect backoff grows to 30 s while the broker is away; on a
    # loaded machine a few attempts can fail before it is back.
    # The agent's exit status says more than a count that stopped moving (it
    # once died of SIGPIPE writing to the socket of the broker that went away).
    wait_until(
        lambda: db_counts(db)[0] >= 3000 or proc.poll() is not None,
        timeout=120,
        what="all stored",
    )
    assert proc.poll() is None, f"agent exited with {proc.returncode}"
    time.sleep(1.0)
    stop(proc)
    publisher.close()

    rows = sqlite3.connect(db).execute(
        "SELECT count(*), count(DISTINCT measured_at) FROM readings"
    )
    assert rows.fetchone() == (3000, 3000)


@pytest.mark.slow
def test_broker_down_a_minute_agent_reconnects_and_queued_readings_arrive(
    tmp_path: Path, broker: LocalBroker, agent
) -> None:
    db = tmp_path / "state" / "readings.db"
    proc = agent()
    publisher = Publisher(broker)
    for i in range(100):
        publisher.send("ward/5/co2", b"%d" % i)
    publisher.wait_all()
    wait_until(lambda: db_counts(db)[0] == 100, what="first 100 stored")

    broker.stop()
    for i in range(100, 600):  # queued in the publisher while the broker is away
        publisher.send("ward/5/co2", b"%d" % i)
    time.sleep(60)
    assert proc.poll() is None
    broker.start()
    publisher.wait_all()
    wait_until(lambda: db_counts(db)[0] >= 600, timeout=60, what="all 600 stored")
    stop(proc)
    publisher.close()

    assert db_counts(db) == (600, 600)
    assert "reconnect" in (tmp_path / "agent.log").read_text().lower()


# -- the adapter and a real store, in process ----------------------------------------


async def _adapter(
    broker: LocalBroker,
    store: ReadingStore,
    client_id: str,
    *,
    lose_acks: bool = False,
    settings: MqttSettings | None = None,
) -> tuple[MqttLink, RoomSensorAdapter]:
    def ingest(reading: Reading, ack: Callable[[], None]) -> None:
        if lose_acks:  # the process "dies" after the commit, before the PUBACK
            ack = Delivery(lambda: None, ack.key, ack.redelivered)  # type: ignore[attr-defined]
        store.put(reading, ack)

    link = MqttLink(
        settings or MqttSettings(port=broker.port, client_id=client_id),
        manual_ack=True,
    )
    adapter = RoomSensorAdapter(
        link,
        RoomSensorDecoder(MAPS, clock=SystemClock(), timezone="Europe/Berlin"),
        ingest=ingest,
        quarantine=store.quarantine,
        filters=["#"],
    )
    adapter.start()
    await link.connect()
    await until(lambda: link.granted.get("#") == 1, what="SUBACK")
    return link, adapter


def test_redelivery_of_gateway_stamped_message_is_stored_once(
    tmp_path: Path, broker: LocalBroker
) -> None:
    client_id = f"gw-{uuid.uuid4()}"

    async def scenario(store: ReadingStore) -> tuple[int, int]:
        link, first = await _adapter(broker, store, client_id, lose_acks=True)
        publisher = Publisher(broker)
        for i in range(50):
            publisher.send("ward/1/co2", b"%d" % (400 + i))
        publisher.send("zigbee2mqtt/2", b'{"temperature": 21.5, "humidity": 40}')
        publisher.wait_all()
        await until(lambda: first.counters.received == 51)
        await store.flush()
        await link.close()  # committed, never acknowledged

        link, second = await _adapter(broker, store, client_id)
        await until(lambda: second.counters.received == 51, what="redelivery")
        await store.flush()
        await asyncio.sleep(0.3)
        await link.close()
        publisher.close()
        return second.counters.received, store.stats.duplicates

    with ReadingStore(tmp_path / "gw.db", flush_interval=0.01) as store:
        redelivered, duplicates = asyncio.run(scenario(store))
        assert store.count() == 52
        assert store.counts_by_kind() == {
            "co2": 50,
            "room_temperature": 1,
            "humidity": 1,
        }
    assert (redelivered, duplicates) == (51, 52)


def test_same_value_sent_twice_is_two_readings(tmp_path: Path, broker) -> None:
    # The identity carries the packet id: a sensor repeating itself is not a dup.
    async def scenario(store: ReadingStore) -> None:
        link, adapter = await _adapter(broker, store, f"gw-{uuid.uuid4()}")
        publisher = Publisher(broker)
        publisher.send("ward/1/co2", b"500")
        publisher.send("ward/1/co2", b"500")
        publisher.wait_all()
        await until(lambda: adapter.counters.received == 2)
        await store.flush()
        await link.close()
        publisher.close()

    with ReadingStore(tmp_path / "gw.db", flush_interval=0.01) as store:
        asyncio.run(scenario(store))
        assert [r.value for r in store.readings()] == [500.0, 500.0]


BAD_INPUT = [
    ("ward/1/co2", b"lots", "value is not a number"),
    ("ward/1/co2", b"inf", "value is NaN or infinite"),
    ("ward/1/co2", b"-5", "value outside physical range [0, 40000]"),
    ("ward/1/temperature", b"{oops", "not JSON"),
    ("ward/1/temperature", b'{"value": "22"}', "value is not a number"),
    ("ward/1/temperature", b'{"value": NaN}', "value is NaN or infinite"),
    ("ward/1/door", b"1", "unmapped topic"),
    ("ward/1/co2", b"1" * 5000, "payload too large"),
    ("zigbee2mqtt/3", b'{"linkquality": 90}', "no mapped quantity"),
    (
        "zigbee2mqtt/3",
        b'{"temperature": 300}',
        "value outside physical range [-40, 85]",
    ),
    ("senml/4", b'{"n": "temp"}', "not a SenML pack"),
    ("senml/4", b'[{"bt": "x", "v": 1}]', "SenML field is not a number"),
    ("senml/4", b'[{"u": "dB", "v": 1}]', "no mapped quantity"),
    ("tele/5/SENSOR", b'{"Time": "noon", "SI7021": {}}', "time is not ISO 8601"),
    (
        "tele/5/SENSOR",
        b'{"X": {"Temperature": 70}, "TempUnit": "Q"}',
        "unit not convertible to Cel",
    ),
]


BERLIN_NOW = datetime.datetime.now(ZoneInfo("Europe/Berlin")).replace(microsecond=0)


def test_each_bad_input_class_is_quarantined_with_its_reason(
    tmp_path: Path, broker: LocalBroker
) -> None:
    async def scenario(store: ReadingStore) -> bool:
        link, adapter = await _adapter(broker, store, f"gw-{uuid.uuid4()}")
        publisher = Publisher(broker)
        for topic, payload, _ in BAD_INPUT:
            publisher.send(topic, payload)
        publisher.send(
            "tele/5/SENSOR",
            b'{"Time": "' + BERLIN_NOW.strftime("%Y-%m-%dT%H:%M:%S").encode() + b'", '
            b'"BME280": {"Temperature": 70.0, "Humidity": 40.2}, "TempUnit": "F"}',
        )
        publisher.wait_all()
        await until(lambda: adapter.counters.received == len(BAD_INPUT) + 1)
        await store.flush()
        connected = link.connected.is_set() and link.reconnects == 0
        await link.close()
        publisher.close()
        return connected

    with ReadingStore(tmp_path / "gw.db", flush_interval=0.01) as store:
        assert asyncio.run(scenario(store))
        entries = store.quarantined()
        readings = store.readings()
    got = sorted((e.source, e.reason, e.payload) for e in entries)
    assert got == sorted((f"mqtt:{t}", r, p) for t, p, r in BAD_INPUT)
    # Tasmota's zone-less time is read in the configured zone; 70 F is 21.1 Cel.
    at = float(int(BERLIN_NOW.timestamp()))
    assert [
        (r.device_id, r.kind, round(r.value, 2), r.measured_at) for r in readings
    ] == [
        ("tele/5/SENSOR/BME280", Kind.ROOM_TEMPERATURE, 21.11, at),
        ("tele/5/SENSOR/BME280", Kind.HUMIDITY, 40.2, at),
    ]


# -- TLS and credentials -------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if issuer is not None and subject == "127.0.0.1":
        san = x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        builder = builder.add_extension(san, False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_pem(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o644)
    return path.with_suffix(".crt"), key_path


@pytest.fixture
def pki() -> Iterator[dict[str, Path]]:
    # mosquitto started as root reads its files as the `mosquitto` user: they live
    # outside pytest's private tmp folder and are world-readable (throwaway keys).
    with tempfile.TemporaryDirectory(prefix="iomt-pki-") as folder:
        where = Path(folder)
        where.chmod(0o755)
        ca_key = _key()
        ca = _cert("iomt test CA", ca_key)
        ca_file, _ = _write_pem(where / "ca", ca, ca_key)
        server_key, client_key = _key(), _key()
        server = _cert("127.0.0.1", server_key, ca, ca_key)
        client = _cert("gateway-7", client_key, ca, ca_key)
        server_crt, server_k = _write_pem(where / "server", server, server_key)
        client_crt, client_k = _write_pem(where / "client", client, client_key)
        yield {
            "dir": where,
            "ca": ca_file,
            "server": server_crt,
            "server_key": server_k,
            "client": client_crt,
            "client_key": client_k,
        }


def test_mutual_tls_with_credentials_file_carries_readings(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    passwords = pki["dir"] / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "gw7", "s3cret:with:colons"],
        check=True,
        capture_output=True,
    )
    passwords.chmod(0o644)  # mosquitto reads it as another user in some setups
    credentials = tmp_path / "mqtt-credentials"
    credentials.write_text("gw7:s3cret:with:colons\n")
    credentials.chmod(0o600)
    tls = BrokerTls(
        pki["ca"], pki["server"], pki["server_key"], require_client_cert=True
    )

    async def scenario(broker: LocalBroker, store: ReadingStore) -> RoomSensorAdapter:
        settings = MqttSettings(
            port=broker.port,
            client_id=f"gw-{uuid.uuid4()}",
            credentials_file=str(credentials),
            tls_ca_file=str(pki["ca"]),
            tls_cert_file=str(pki["client"]),
            tls_key_file=str(pki["client_key"]),
        )
        link, adapter = await _adapter(broker, store, "", settings=settings)
        sensor = MqttLink(
            MqttSettings(**{**_fields(settings), "client_id": f"s-{uuid.uuid4()}"})
        )
        await sensor.connect()
        await sensor.publish("ward/9/co2", b"615")
        await until(lambda: adapter.counters.received == 1)
        await store.flush()
        await sensor.close()
        await link.close()
        return adapter

    with (
        LocalBroker(tls=tls, password_file=passwords) as broker,
        ReadingStore(tmp_path / "gw.db", flush_interval=0.01) as store,
    ):
        asyncio.run(scenario(broker, store))
        assert [(r.device_id, r.value) for r in store.readings()] == [
            ("ward/9/co2", 615.0)
        ]


def test_tls_without_client_certificate_is_refused(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    tls = BrokerTls(
        pki["ca"], pki["server"], pki["server_key"], require_client_cert=True
    )

    async def attempt(broker: LocalBroker) -> str:
        link = MqttLink(
            MqttSettings(
                port=broker.port, client_id="intruder", tls_ca_file=str(pki["ca"])
            )
        )
        try:
            await link.connect(timeout=2)
        except Exception as exc:
            return type(exc).__name__
        await link.close()
        return "connected"

    with LocalBroker(tls=tls) as broker:
        assert asyncio.run(attempt(broker)) == "BrokerError"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("gw:pw\n", ("gw", "pw")), ("gw:a:b", ("gw", "a:b")), ("gw:", ("gw", ""))],
)
def test_credentials_file_is_split_at_the_first_colon(tmp_path, text, expected) -> None:
    path = tmp_path / "cred"
    path.write_text(text)
    path.chmod(0o600)
    assert read_credentials(path) == expected


@pytest.mark.parametrize("text", ["", "no-colon\n", ":pw\n"])
def test_malformed_or_missing_credentials_file_says_what_to_write(
    tmp_path, text
) -> None:
    path = tmp_path / "cred"
    path.write_text(text)
    with pytest.raises(ConfigUnreadableError, match="username:password"):
        read_credentials(path)
    with pytest.raises(ConfigUnreadableError, match="cannot read"):
        read_credentials(tmp_path / "absent")


def _fields(settings: MqttSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def test_the_agent_ignores_sigpipe(agent) -> None:
    # With SIGPIPE at its default action a write to a socket whose peer went away
    # kills the process without a word; Python ignores it, and so must we.
    proc = agent()
    status = Path(f"/proc/{proc.pid}/status").read_text()
    ignored = int(re.search(r"SigIgn:\s+([0-9a-f]+)", status).group(1), 16)
    stop(proc)
    assert ignored & (1 << (signal.SIGPIPE - 1))
