"""The MQTT link: paho-mqtt 2.x behind a small asyncio interface.

paho runs its network loop in its own thread; everything it reports is handed to
the agent's event loop with `call_soon_threadsafe`, so handlers run on the loop.
Incoming messages are handed over in bursts: one wake-up of the loop carries every
message that arrived meanwhile, not one wake-up per message.
Publishing at QoS 1 returns an awaitable that completes on the broker's PUBACK.
With `manual_ack`, an incoming QoS-1 message is acknowledged to the broker only when
`ack()` is called: after the reading it carries is committed to the store.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.errors import BrokerError, ConfigUnreadableError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """An incoming message, as handed to a subscription's handler."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool
    duplicate: bool
    connection: int = 0
    """Which connection of the link it arrived on; acks on a later one are moot."""


@dataclass(slots=True)
class MqttSettings:
    """How to reach the broker (see `[mqtt]` in the configuration)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "iomt-gateway"
    protocol: int = 5
    keepalive: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    clean_start: bool = False
    username: str | None = None
    password: str | None = None
    credentials_file: str | None = None
    """A file holding ``username:password`` on its first line (see
    `read_credentials`); takes precedence over `username` and `password`."""
    receive_maximum: int | None = None
    """MQTT 5 Receive Maximum: unacknowledged messages the broker may send us."""
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    will_topic: str | None = None
    will_payload: bytes = b"offline"
    extra: dict[str, object] = field(default_factory=dict)


Handler = Callable[[MqttMessage], None]


class MqttLink:
    """One MQTT client connection, reconnecting by itself, driven from asyncio.

    Args:
        settings: Broker address, identity and session options.
        manual_ack: Acknowledge QoS-1 messages only through `ack()`.
    """

    def __init__(self, settings: MqttSettings, *, manual_ack: bool = False) -> None:
        self.settings = settings
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.granted: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self._sub_mids: dict[int, list[str]] = {}
        self._inbox: list[MqttMessage] = []
        self._inbox_lock = threading.Lock()
        self._routes: dict[str, Handler | None] = {}
        self._connection = 0
        self._ever_connected = False
        self._closing = False
        self._client = self._make_client(manual_ack)

    # -- lifecycle -------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and start paho's network thread; reconnects are automatic.

        Raises:
            BrokerError: The broker did not accept a connection within `timeout`.
        """
        self._loop = asyncio.get_running_loop()
        s = self.settings
        props = None
        if s.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s
            if s.receive_maximum:
                props.ReceiveMaximum = s.receive_maximum
        try:
            self._client.connect_async(
                s.host,
                s.port,
                s.keepalive,
                clean_start=self._clean_start(),
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise BrokerError(s.host, s.port, str(exc)) from exc
        self._client.loop_start()
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError as exc:
            await self.close()
            reason = tls_problem(self) or f"no connection in {timeout} s"
            raise BrokerError(s.host, s.port, reason) from exc

    async def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._closing = True
        will = self.settings.will_topic
        if will and self.connected.is_set():
            info = self._client.publish(will, self.settings.will_payload, 1, True)
            await asyncio.to_thread(info.wait_for_publish, 2.0)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("MQTT link closed"))
        self._pending.clear()

    # -- API -------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        self._subs[topic_filter] = (qos, handler)
        self._routes = {}
        if self.connected.is_set():
            self._send_subscribe([topic_filter])

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; for QoS >= 1, return once the broker has acknowledged it.

        Raises:
            ConnectionError: The link was closed before the broker acknowledged.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        # Not under our lock: paho calls on_publish holding its own message lock,
        # and on_publish takes ours; publishing under ours would invert the order.
        # A PUBACK that beats the bookkeeping below is kept in `_early`.
        # TODO(mqtt): `_early` also collects PUBACKs of the status messages
        # published from on_connect; once message ids wrap (65,535 publishes) a
        # reused id could complete a publish before its own PUBACK.
        info = self._client.publish(topic, payload, qos, retain)
        with self._lock:
            if qos == 0 or info.mid in self._early:
                self._early.discard(info.mid)
                fut.set_result(None)
            else:
                self._pending[info.mid] = fut
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._pending.pop(info.mid, None)
            raise ConnectionError(mqtt.error_string(info.rc))
        await fut

    def ack(self, message: MqttMessage) -> None:
        """Acknowledge a QoS-1 message to the broker (manual-ack mode).

        Safe from any thread. A message from an earlier connection is not acked:
        the broker resends it with the same packet id, and that copy gets its own
        ack; acking the old one could acknowledge another message reusing the id.
        """
        if message.qos > 0 and message.connection == self._connection:
            self._client.ack(message.mid, message.qos)

    # -- paho callbacks (network thread) ---------------------------------------

    def _make_client(self, manual_ack: bool) -> mqtt.Client:
        s = self.settings
        protocol = mqtt.MQTTv5 if s.protocol == 5 else mqtt.MQTTv311
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else s.clean_start,
            manual_ack=manual_ack,
        )
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        # paho doubles the delay after each failed attempt, up to the maximum.
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        username, password = s.username, s.password
        if s.credentials_file:
            username, password = read_credentials(Path(s.credentials_file))
        if username:
            client.username_pw_set(username, password)
        self._tls: _TlsContext | None = None
        if s.tls_ca_file:
            self._tls = tls_context(s)
            client.tls_set_context(self._tls)
        if s.will_topic:
            client.will_set(s.will_topic, s.will_payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _clean_start(self) -> bool | int:
        if self.settings.protocol != 5:
            return mqtt.MQTT_CLEAN_START_FIRST_ONLY
        return self.settings.clean_start

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection: %s", reason_code)
            return
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._connection += 1
        log.info(
            "MQTT connected to %s:%d as %s (session present: %s)",
            self.settings.host,
            self.settings.port,
            self.settings.client_id,
            flags.session_present,
        )
        if self._subs:
            self._send_subscribe(list(self._subs))
        if self.settings.will_topic:
            client.publish(self.settings.will_topic, b"online", 1, True)
        self._call(self.connected.set)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set() and not self._closing:
            log.info("MQTT disconnected (%s); reconnecting", reason_code)
        self._call(self.connected.clear)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        message = MqttMessage(
            msg.topic,
            msg.payload,
            msg.qos,
            msg.mid,
            bool(msg.retain),
            bool(msg.dup),
            self._connection,
        )
        with self._inbox_lock:
            self._inbox.append(message)
            if len(self._inbox) > 1:
                return  # a wake-up is already on its way and will take this one
        self._call(self._deliver)

    def _deliver(self) -> None:
        """Hand every message waiting in the inbox to its handler (on the loop)."""
        with self._inbox_lock:
            burst, self._inbox = self._inbox, []
        for message in burst:
            handler = self._route(message.topic)
            if handler is None:
                continue
            try:
                handler(message)
            except Exception:
                # Type and place only: the message text may carry the payload.
                log.exception("MQTT message handler failed; message left unacked")

    def _route(self, topic: str) -> Handler | None:
        try:
            return self._routes[topic]
        except KeyError:
            pass
        if len(self._routes) > 4096:
            self._routes = {}
        handler = next(
            (
                h
                for f, (_qos, h) in self._subs.items()
                if mqtt.topic_matches_sub(f, topic)
            ),
            None,
        )
        self._routes[topic] = handler
        return handler

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            fut = self._pending.pop(mid, None)
            if fut is None:
                self._early.add(mid)
                return
        self._call(_resolve, fut)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            filters = self._sub_mids.pop(mid, [])
        for topic_filter, code in zip(filters, reason_codes, strict=False):
            wanted = self._subs.get(topic_filter, (1, None))[0]
            granted = code.value if code.value < 0x80 else -1
            self.granted[topic_filter] = granted
            if granted < wanted:
                log.warning(
                    "broker granted QoS %d for %s, asked %d: messages may be lost",
                    granted,
                    topic_filter,
                    wanted,
                )

    def _send_subscribe(self, filters: list[str]) -> None:
        pairs = [(f, self._subs[f][0]) for f in filters]
        # Hold the lock so that the SUBACK, handled on paho's thread, finds its mid.
        with self._lock:
            _rc, mid = self._client.subscribe(pairs)
            if mid is not None:
                self._sub_mids[mid] = filters

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def read_credentials(path: Path) -> tuple[str, str]:
    """Username and password from a file holding ``username:password``.

    The first line is split at its first colon, so a password may contain colons
    (a username may not). Keep the file readable by the service user only.

    Raises:
        ConfigUnreadableError: The file cannot be read or has no colon.
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigUnreadableError(
            f"{path}: cannot read MQTT credentials ({exc.strerror})"
        ) from exc
    first = text.splitlines()[0] if text.strip() else ""
    username, colon, password = first.partition(":")
    if not colon or not username:
        raise ConfigUnreadableError(
            f"{path}: expected one line 'username:password' for the MQTT broker"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("MQTT credentials file %s is readable by others; chmod 600", path)
    return username, password


# -- TLS ---------------------------------------------------------------------------


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """A client TLS context: TLS 1.2 or later, the configured CA only, host checked.

    The system's CA store is not loaded, so the broker's certificate must chain to
    `tls_ca_file` (the CA is pinned): one issued by any other CA, public ones
    included, is refused. The certificate must also name `host` (a DNS or IP
    subject alternative name). A client certificate is shown when `tls_cert_file`
    is set (mutual TLS).

    Raises:
        ConfigUnreadableError: A CA, certificate or key file cannot be read or used.
    """
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=settings.tls_ca_file)
        if settings.tls_cert_file:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigUnreadableError(
            f"[mqtt] TLS files {settings.tls_ca_file}, {settings.tls_cert_file}, "
            f"{settings.tls_key_file}: cannot use them ({reason}); check the paths, "
            "that they are PEM, and that the key matches the certificate"
        ) from exc
    return context


def tls_problem(link: MqttLink) -> str | None:
    """What went wrong in the link's last TLS handshake, or None if nothing did.

    paho retries a failed connection by itself and keeps the reason to itself;
    this is the reason, in words an operator can act on.
    """
    return link._tls.problem if link._tls is not None else None


class _TlsContext(ssl.SSLContext):
    """An SSL context that remembers why the last handshake with it failed."""

    problem: str | None = None

    def note(self, exc: ssl.SSLError | None) -> None:
        problem = None if exc is None else _tls_reason(exc)
        if problem is not None and problem != self.problem:
            log.warning("MQTT TLS: %s", problem)
        self.problem = problem


class _TlsSocket(ssl.SSLSocket):
    """Reports TLS failures to its context (paho only retries on them)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            _note(self.context, exc)
            # paho drops the socket without closing it when the handshake fails,
            # leaving one open file per retry until the garbage collector runs.
            self.close()
            raise
        _note(self.context, None)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # Under TLS 1.3 a server refuses a missing client certificate after the
        # client has finished its handshake: the alert arrives on the first read.
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if "CERTIFICATE" in (exc.reason or ""):
                _note(self.context, exc)
            raise


_TlsContext.sslsocket_class = _TlsSocket


def _note(context: ssl.SSLContext, exc: ssl.SSLError | None) -> None:
    if isinstance(context, _TlsContext):
        context.note(exc)


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"certificate problem: the broker's certificate is not trusted "
            f"({exc.verify_message}); mqtt.tls_ca_file must be the CA that signed "
            "it, and mqtt.host a name or address the certificate carries"
        )
    reason = (exc.reason or type(exc).__name__).lower().replace("_", " ")
    if "certificate" in reason:
        return (
            f"certificate problem: the broker refused us ({reason}); it may require "
            "a client certificate: set mqtt.tls_cert_file and mqtt.tls_key_file "
            "to one signed by a CA it trusts"
        )
    return f"TLS handshake failed ({reason})"
