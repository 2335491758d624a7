"""The agent: wires configuration to store, rules, alerts and sources, and runs them.

One asyncio loop carries ingest, rules and alert delivery. Every background task is
owned (a reference kept, a readable name) and every resource is released through an
exit stack, so a cancelled or failed start leaves nothing open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gateway.alerts import AlertManager
from gateway.apprise_push import AppriseNotifier
from gateway.audit import audit_alerts
from gateway.clock import Clock, ManualClock, SystemClock
from gateway.config import Config, ReplaySection
from gateway.errors import ConfigError, DeliveryError, GatewayError, StoreError
from gateway.learning import dataset
from gateway.litert import CURRENT, ModelError, Scorer
from gateway.metrics import Metrics
from gateway.notify import MQTT_TARGET, Alert, MqttNotifier, Notifier
from gateway.outbox import Outbox
from gateway.paho import MqttLink, MqttSettings
from gateway.pipeline import Pipeline
from gateway.rules import RuleEngine
from gateway.scoring import RhythmScorer
from gateway.sdnotify import ServiceNotifier
from gateway.status import STATUS_FILE, Activity, gauges, write_forever
from gateway.store import ReadingStore
from gateway.vault import labels as vault_labels
from gateway.vault import monitoring_refs as vault_monitoring_refs
from models import INITIAL_PATH
from sensors.ble.bleak_central import BleakCentral, Central
from sensors.ble.link import WearableLink, WearableSpec
from sensors.errors import DecodeError
from sensors.replay import (
    ReplayEvent,
    data_path,
    merge,
    mimic,
    mitdb,
    readings_from_hrm,
    replay,
    uci,
)
from sensors.room import RoomSensorAdapter, RoomSensorDecoder, TopicMap

log = logging.getLogger(__name__)

TICK_S = 1.0
CATCH_UP_S = 10.0
RETENTION_EVERY_S = 3600.0
MODEL_CHECK_S = 30.0
"""How often the agent looks for a newly installed model."""


class Agent:
    """The running gateway.

    Args:
        config: Validated configuration.
        clock: Time source; a `ManualClock` when replaying faster than real time.
        on_alert: Called with each alert and target after delivery (the demo's
            timeline).
        central: The BLE central for the roster's wearables; bleak on the
            platform's Bluetooth stack when None (the BLE demo passes a virtual one).
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        on_alert: Callable[[Alert, str], None] | None = None,
        central: Central | None = None,
    ) -> None:
        self.config = config
        self._central = central
        self.wearables: list[WearableLink] = []
        self.clock = clock or SystemClock()
        self._on_alert = on_alert
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self.store: ReadingStore
        self.outbox: Outbox
        self.alerts: AlertManager
        self.pipeline: Pipeline
        self.scorer: RhythmScorer | None = None
        self.room: RoomSensorAdapter | None = None
        self._alert_link: MqttLink | None = None
        self.systemd = ServiceNotifier.from_environment()
        self.links: dict[str, MqttLink] = {}
        self.activity = Activity(self.clock)
        self.metrics: Metrics | None = None
        self._wearers = {d.id: d.patient for d in config.devices} | {
            r.device: r.patient for r in config.replay if r.patient
        }

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, *, live_ticks: bool = True) -> None:
        """Open the store and outbox, connect, subscribe, start the tasks.

        Raises:
            StoreError: A database cannot be opened.
            BrokerError: The MQTT broker cannot be reached.
        """
        cfg = self.config
        try:
            cfg.gateway.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create data directory {cfg.gateway.data_dir} "
                f"({exc.strerror or type(exc).__name__}); set gateway.data_dir to a "
                "writable local folder (the systemd unit provides StateDirectory)"
            ) from exc
        self.store = self._open_store()
        self.outbox = Outbox(cfg.path(cfg.alerts.outbox_file))
        self._stack.callback(self.outbox.close)

        self._alert_link = await self._connect(
            self._settings("alerts"), manual_ack=False
        )
        self.links["alerts"] = self._alert_link
        self.alerts = self._alert_manager(self._alert_link)
        self._stack.enter_context(audit_alerts(cfg, self.alerts))
        await self.alerts.start()
        self._stack.push_async_callback(self.alerts.stop)
        prefix = cfg.alerts.topic_prefix
        self._alert_link.subscribe(f"{prefix}/ack/+", self.alerts.ack_handler())

        self.scorer = self._rhythm_scorer()
        self.pipeline = Pipeline(
            self.store, self._rule_engine(), self.alerts, self.clock, self.scorer
        )
        self.pipeline.start()
        self._stack.push_async_callback(self.pipeline.stop)
        self._start_operator_view()
        await self._start_room_sensors()
        self._start_wearables()
        if live_ticks:
            self._spawn(self._tick_forever(), "rules-tick")
        self._spawn(self._retention_forever(), "store-retention")
        if self.scorer is not None:
            self._spawn(self._watch_model(), "model-watch")
        if cfg.learning.train_every_h > 0:
            self._spawn(self._train_forever(), "training-schedule")
        # READY and WATCHDOG come from the loop itself: a stuck loop goes silent.
        self._spawn(self.systemd.run(self._status_line), "systemd-notify")
        log.info("gateway %s running", cfg.gateway.id)

    async def stop(self) -> None:
        """Stop the tasks and close everything, in reverse order of opening.

        Alerts not yet delivered stay in the outbox for the next start.
        """
        self.systemd.stopping()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._stack.aclose()
        log.info("gateway %s stopped", self.config.gateway.id)

    async def deliver_pending(self, timeout: float = 30.0) -> bool:
        """Wait until every alert in the outbox is delivered (and reported).

        Returns:
            True if all were delivered within `timeout`.
        """
        await self.pipeline.drain()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # An attempt marks its row delivered, then reports it: wait for both.
            if not self.outbox.pending() and not self.alerts.sending:
                return True
            await asyncio.sleep(0.1)
        log.warning("alerts still undelivered after %.0f s", timeout)
        return False

    # -- replay --------------------------------------------------------------------

    async def replay(self, *, start: float, speed: float | None) -> None:
        """Play the configured recordings through the live code path.

        Wearable recordings enter as the bytes a strap sends or as monitor readings;
        room logs are published to the broker as room sensors would and come back
        through the room-sensor adapter. With `speed=None`, as fast as possible.
        """
        opted_out = self.unmonitored()
        events = merge(
            *(
                self._recording(r, start)
                for r in self.config.replay
                if r.patient not in opted_out
            )
        )
        clock = (
            self.clock if isinstance(self.clock, ManualClock) else ManualClock(start)
        )
        publisher = await self._connect(self._settings("replay"), manual_ack=False)
        player = _Player(self, publisher)
        try:
            await replay(
                events, speed=speed, clock=clock, emit=player.emit, tick=player.tick
            )
            await player.settle()
            await asyncio.to_thread(self._store_annotations, start)
        finally:
            await publisher.close()

    def _store_annotations(self, start: float) -> None:
        """Keep the reference beat labels of replayed MIT-BIH records.

        They label the replayed windows for training and evaluation, as the ERT's
        verdicts on alerts label a live gateway's.
        """
        opted_out = self.unmonitored()
        for r in self.config.replay:
            if r.patient in opted_out:
                continue
            beats = resolve_data(r.file)
            pvc = beats.with_name(beats.name.replace("_all", "_pvc"))
            if r.source != "mitdb" or not r.patient or not pvc.exists():
                continue
            spans = dataset.annotation_labels(
                r.patient,
                mitdb.read_sample_indices(beats),
                mitdb.read_sample_indices(pvc),
                start=start,
            )
            self.store.add_labels(spans)

    def patient_of(self, device_id: str) -> str | None:
        """The patient wearing a device, from the roster and the replay entries."""
        return self._wearers.get(device_id)

    def _recording(self, r: ReplaySection, start: float) -> Iterator[ReplayEvent]:
        path = resolve_data(r.file)
        if r.source == "mitdb":
            events: Iterable[ReplayEvent] = mitdb.heart_rate_notifications(
                path, start=start, device_id=r.device
            )
        elif r.source == "mimic":
            events = mimic.trend_readings(
                path, start=start, device_id=r.device, patient_ref=r.patient
            )
        else:
            events = uci.room_messages(path, start=start, room=r.room or "")
        return _ending(events, r.device)

    # -- wiring --------------------------------------------------------------------

    def _open_store(self) -> ReadingStore:
        cfg = self.config
        store = ReadingStore(
            cfg.path(cfg.store.file),
            batch_size=cfg.store.batch_size,
            flush_interval=cfg.store.flush_interval_s,
            retention_days=cfg.store.retention_days,
            clock=self.clock,
        )
        store.open()
        self._stack.callback(store.close)
        return store

    def _rhythm_scorer(self) -> RhythmScorer | None:
        learning = self.config.learning
        if not learning.scoring:
            return None
        return RhythmScorer.from_models_dir(
            self.config.path(learning.models_dir),
            fallback=INITIAL_PATH,
            stride=learning.score_every_beats,
        )

    def _rule_engine(self) -> RuleEngine:
        defaults, patients = self.config.patient_rules()
        return RuleEngine(defaults, patients, self.config.rooms.to_rules())

    def _alert_manager(self, link: MqttLink) -> AlertManager:
        a = self.config.alerts
        mqtt_notifier = MqttNotifier(link, prefix=a.topic_prefix)
        urls = [t for t in (*a.targets, *a.escalation_targets) if t != MQTT_TARGET]
        try:
            apprise_notifier = AppriseNotifier(urls)
        except DeliveryError as exc:
            raise ConfigError(
                self.config.source or "configuration",
                [f"alerts.targets: {exc.target} is not a URL apprise supports"],
            ) from exc

        def notifier_for(target: str) -> Notifier:
            return mqtt_notifier if target == MQTT_TARGET else apprise_notifier

        labels = vault_labels(self.config)
        return AlertManager(
            self.outbox,
            notifier_for,
            a.targets,
            a.escalation_targets,
            self.clock,
            labels=lambda ref: labels.get(ref or ""),
            escalate_after_s=a.escalate_after_s,
            retry_initial_s=a.retry_initial_s,
            retry_max_s=a.retry_max_s,
            on_alert=self._on_alert,
        )

    def unmonitored(self) -> set[str]:
        """Patients of this configuration who opted out of monitoring (the vault).

        Their wearables are not connected and their recordings not replayed: no
        data of theirs is collected at all.
        TODO(privacy): read at start only; an opt-out given while the agent runs
        takes effect when it is next started.

        Raises:
            KeyFileError: A vault exists but its key is missing or unsafe.
            VaultError: The vault does not decrypt.
        """
        allowed = vault_monitoring_refs(self.config)
        if allowed is None:
            return set()
        return set(self._wearers.values()) - allowed - {None}

    def _start_wearables(self) -> None:
        opted_out = self.unmonitored()
        devices = [d for d in self.config.devices if d.patient not in opted_out]
        if len(devices) < len(self.config.devices):
            log.info(
                "%d wearables not connected: their patients opted out of monitoring",
                len(self.config.devices) - len(devices),
            )
        if not devices:
            return
        central = self._central or BleakCentral()
        for device in devices:
            spec = WearableSpec(
                patient_ref=device.patient,
                address=device.address,
                name_pattern=device.name_pattern,
                profiles=tuple(device.profiles),
                connect_timeout_s=device.connect_timeout_s,
            )
            link = WearableLink(spec, central, self.pipeline, clock=self.clock)
            self.wearables.append(link)
            self._spawn(link.run(), f"wearable-{device.id}")

    async def _start_room_sensors(self) -> None:
        topics = self.config.mqtt.topics
        if not topics:
            return
        maps = [TopicMap(**t.model_dump()) for t in topics]
        decoder = RoomSensorDecoder(
            maps, clock=self.clock, timezone=self.config.gateway.timezone
        )
        # Subscribe before connecting: the link then subscribes from its network
        # thread on CONNACK, and again on every reconnect.
        link = MqttLink(self._settings("ingest"), manual_ack=True)
        self.links["ingest"] = link
        self.room = RoomSensorAdapter(
            link,
            decoder,
            ingest=functools.partial(self.pipeline.ingest, source="mqtt"),
            quarantine=self.pipeline.quarantine,
        )
        self.room.start()
        await link.connect()
        self._stack.push_async_callback(link.close)

    def _start_operator_view(self) -> None:
        """The status file, and the metrics endpoint if `[metrics] port` is set."""
        self.pipeline.observers.append(self.activity)
        port = self.config.metrics.port
        if port:
            self.metrics = Metrics()
            self.metrics.watch(functools.partial(gauges, self))
            self.metrics.serve(port, self.config.metrics.host)
            self._stack.callback(self.metrics.close)
            self.pipeline.observers.append(self.metrics)
            self.alerts.observers.append(self.metrics)
        status = self.config.gateway.data_dir / STATUS_FILE
        self._spawn(write_forever(self, status), "status-file")

    def _settings(self, role: str) -> MqttSettings:
        m = self.config.mqtt
        status = (m.status_topic or "").format(gateway_id=self.config.gateway.id)
        # Each link with a status announces it (retained) and leaves a will: the
        # alerts link on the status topic, the ingest link on <status>/ingest.
        wills = {"alerts": status, "ingest": f"{status}/ingest"}
        return MqttSettings(
            host=m.host,
            port=m.port,
            client_id=m.client_id if role == "ingest" else f"{m.client_id}-{role}",
            protocol=5 if m.protocol == "5" else 4,
            keepalive=m.keepalive_s,
            session_expiry_s=m.session_expiry_s,
            receive_maximum=m.receive_maximum if role == "ingest" else None,
            credentials_file=_str(m.credentials_file),
            tls_ca_file=_str(m.tls_ca_file),
            tls_cert_file=_str(m.tls_cert_file),
            tls_key_file=_str(m.tls_key_file),
            will_topic=wills.get(role) if m.status_topic else None,
        )

    async def _connect(self, settings: MqttSettings, *, manual_ack: bool) -> MqttLink:
        link = MqttLink(settings, manual_ack=manual_ack)
        await link.connect()
        self._stack.push_async_callback(link.close)
        return link

    # -- background tasks ----------------------------------------------------------

    def _spawn(self, coro: object, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    def _status_line(self) -> str:
        s = self.pipeline.stats
        return f"{s.readings} readings, {s.quarantined} quarantined, {s.events} events"

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.pipeline.tick()
            await self.alerts.tick()

    async def _watch_model(self) -> None:
        """Swap in a model that `iomt-gateway train` (or a round) installed."""
        current = self.config.path(self.config.learning.models_dir) / CURRENT
        seen = _identity(current)
        while True:
            await asyncio.sleep(MODEL_CHECK_S)
            now = _identity(current)
            if now == seen or now is None or self.scorer is None:
                continue
            try:
                self.scorer.swap(await asyncio.to_thread(Scorer, current))
            except ModelError as exc:
                log.error("new model not used, the old one stays: %s", exc)
            seen = now

    async def _train_forever(self) -> None:
        """Run a training round every `[learning] train_every_h` hours."""
        from gateway.learning.train import train_round

        while True:
            await asyncio.sleep(self.config.learning.train_every_h * 3600.0)
            try:
                await asyncio.to_thread(train_round, self.config)
            except GatewayError as exc:
                # Budget spent, too little data, a failed child: say so and wait
                # for the next slot; the agent itself carries on.
                log.warning("scheduled training round not done: %s", exc)

    async def _retention_forever(self) -> None:
        while True:
            deleted = await asyncio.to_thread(self.store.apply_retention)
            if deleted:
                log.info("retention removed %d old rows", deleted)
            await asyncio.sleep(RETENTION_EVERY_S)


class _Player:
    """Hands replay events to the agent as live sources would."""

    def __init__(self, agent: Agent, publisher: MqttLink) -> None:
        self.agent = agent
        self.publisher = publisher
        self.published = 0

    async def emit(self, ev: ReplayEvent) -> None:
        pipeline = self.agent.pipeline
        if ev.kind == "ble":
            self._notification(ev)
        elif ev.kind == "reading":
            pipeline.ingest(ev.payload, source="replay")  # type: ignore[arg-type]
        elif ev.kind == "mqtt":
            topic, payload = ev.payload  # type: ignore[misc]
            await self.publisher.publish(topic, payload, qos=1)
            self.published += 1
        elif ev.kind == "end":
            await self._caught_up()
            pipeline.retire(ev.device_id)

    async def tick(self, now: float) -> None:
        await self._caught_up()
        self.agent.pipeline.tick(now)
        await self.agent.alerts.tick()

    async def settle(self) -> None:
        await self._caught_up()
        await self.agent.pipeline.drain()
        await self.agent.store.flush()

    def _notification(self, ev: ReplayEvent) -> None:
        device = ev.device_id
        patient = self.agent.patient_of(device)
        data: bytes = ev.payload  # type: ignore[assignment]
        try:
            readings = readings_from_hrm(
                data, device_id=device, patient_ref=patient, at=ev.at
            )
        except DecodeError as err:
            self.agent.pipeline.quarantine(f"ble:{device}", err.reason, data)
            return
        for r in readings:
            self.agent.pipeline.ingest(r, source="replay")

    async def _caught_up(self) -> None:
        # Room readings travel through the broker; rules that judge silence must
        # not run ahead of messages still in flight.
        room = self.agent.room
        if room is None:
            return
        deadline = time.monotonic() + CATCH_UP_S
        while room.counters.received < self.published:
            if time.monotonic() > deadline:
                log.warning(
                    "replay: %d room messages not back from the broker after %.0f s",
                    self.published - room.counters.received,
                    CATCH_UP_S,
                )
                self.published = room.counters.received
                return
            await asyncio.sleep(0.001)


def _ending(events: Iterable[ReplayEvent], device_id: str) -> Iterator[ReplayEvent]:
    last = None
    for last in events:
        yield last
    if last is not None:
        yield ReplayEvent(at=last.at, device_id=device_id, kind="end", payload=b"")


def resolve_data(file: str) -> Path:
    """A replay file: ``data:NAME`` is a recording shipped with the gateway."""
    if file.startswith("data:"):
        return data_path(file.removeprefix("data:"))
    return Path(file)


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and modification time: changes when a model is renamed into place."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)
