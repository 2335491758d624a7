"""Prometheus metrics for the operator: counts and times, nothing personal.

`Metrics` owns its own `CollectorRegistry` (not prometheus_client's global one), so
two agents in one test process do not share counters. The pipeline and the alert
manager call it as an observer; values that live elsewhere (reconnect counts, store
size, privacy budget) are read when Prometheus scrapes, through a `Gauges` callable.

Labels are limited to source, kind, reason, priority and target: never a patient
ref, a label, a device address or a value. Quarantine reasons and alert targets are
reduced to a few fixed shapes by `reason_label` and `target_label` first.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.errors import ConfigError
from gateway.notify import Alert
from gateway.readings import Reading

log = logging.getLogger(__name__)

PREFIX = "iomt"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Delivery latency buckets, seconds: a push service answers in well under 1 s."""
_PENDING_LATENCIES = 10_000
"""Alerts whose raise time is remembered for the latency histogram (bounded)."""

Gauges = Callable[[], Mapping[str, float]]
"""Returns current values by metric name (see `GAUGES`), read at scrape time."""

GAUGES: dict[str, tuple[str, str]] = {
    "ble_reconnects": ("counter", "Wearable reconnections since start"),
    "mqtt_reconnects": ("counter", "MQTT reconnections since start, all links"),
    "mqtt_connected": ("gauge", "1 when every MQTT link is connected"),
    "wearables_connected": ("gauge", "Wearables connected now"),
    "wearables_configured": ("gauge", "Wearables in the roster"),
    "store_bytes": ("gauge", "Bytes of the gateway's databases and models on disk"),
    "training_rounds": ("counter", "Training rounds in the privacy account"),
    "privacy_epsilon_spent": ("gauge", "Epsilon spent, whole history"),
    "privacy_epsilon_max": ("gauge", "Epsilon cap of this gateway"),
}


class Metrics:
    """The gateway's metrics, on a registry of their own.

    Args:
        registry: Where to register; a fresh one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._readings = Counter(
            f"{PREFIX}_readings", "Readings in", ["source", "kind"], registry=r
        )
        self._quarantined = Counter(
            f"{PREFIX}_quarantined",
            "Inputs quarantined",
            ["source", "reason"],
            registry=r,
        )
        self._alerts = {
            what: Counter(
                f"{PREFIX}_alerts_{what}", f"Alerts {what}", labels, registry=r
            )
            for what, labels in _ALERT_COUNTERS.items()
        }
        self._latency = Histogram(
            f"{PREFIX}_alert_delivery_seconds",
            "From raise (or escalation) to delivery at a target",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._since: OrderedDict[tuple[str, bool], float] = OrderedDict()
        self._lock = threading.Lock()
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    # -- observers ------------------------------------------------------------

    def reading_in(self, reading: Reading, source: str) -> None:
        """Pipeline hook: one reading taken in."""
        self._readings.labels(source, str(reading.kind)).inc()

    def quarantined_in(self, source: str, reason: str) -> None:
        """Pipeline hook: one input quarantined (`source` is "ble:..." etc.)."""
        self._quarantined.labels(source_label(source), reason_label(reason)).inc()

    def alert_event(self, what: str, alert: Alert, target: str | None = None) -> None:
        """Alert manager hook: "raised", "delivered", "acknowledged", "escalated"."""
        priority = alert.priority.label
        if what in ("raised", "escalated"):
            self._remember(alert.id, what == "escalated")
        if what == "delivered":
            self._alerts[what].labels(priority, target_label(target or "")).inc()
            self._observe_latency(alert)
            return
        self._alerts[what].labels(priority).inc()

    def _remember(self, alert_id: str, escalation: bool) -> None:
        with self._lock:
            self._since[(alert_id, escalation)] = time.monotonic()
            while len(self._since) > _PENDING_LATENCIES:
                self._since.popitem(last=False)

    def _observe_latency(self, alert: Alert) -> None:
        # Several targets share one raise: each delivery is one observation.
        # Alerts left over from a previous run have no start here: not observed.
        with self._lock:
            since = self._since.get((alert.id, alert.escalation))
        if since is not None:
            self._latency.labels(alert.priority.label).observe(time.monotonic() - since)

    # -- scrape-time values ---------------------------------------------------

    def watch(self, gauges: Gauges) -> None:
        """Publish the values `gauges()` returns, read at every scrape."""
        self.registry.register(_GaugeCollector(gauges))

    # -- HTTP endpoint --------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on `host`:`port` from a daemon thread; returns the port.

        Raises:
            ConfigError: The port cannot be bound (in use, or not allowed).
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                "[metrics]",
                [
                    f"port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                    "choose a free port, or 0 to turn metrics off"
                ],
            ) from exc
        self._server, self._thread = server, thread
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        if self._server is None:
            return
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


_ALERT_COUNTERS = {
    "raised": ["priority"],
    "delivered": ["priority", "target"],
    "acknowledged": ["priority"],
    "escalated": ["priority"],
}


class _GaugeCollector(Collector):
    """Turns a `Gauges` callable into metric families at scrape time."""

    def __init__(self, gauges: Gauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            values = self._gauges()
        except Exception:
            # A scrape must not take anything down; the counters still answer.
            log.exception("metrics: reading the gateway's gauges failed")
            return
        for name, value in values.items():
            kind, text = GAUGES[name]
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"{PREFIX}_{name}", text, value=value)


def source_label(source: str) -> str:
    """The transport of a quarantine source: "mqtt:rooms/x/y" -> "mqtt".

    >>> source_label("ble:C8:4F:2A:10:77:01")
    'ble'
    >>> source_label("replay")
    'replay'
    """
    return source.split(":", 1)[0] or "unknown"


_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_label(reason: str) -> str:
    """A quarantine reason with numbers masked, so labels stay few and carry no data.

    >>> reason_label("value outside physical range [-40, 85]")
    'value outside physical range [-N, N]'
    """
    return _NUMBER.sub("N", reason)[:64]


def target_label(target: str) -> str:
    """An alert target without its secrets: "mqtt", or the apprise scheme.

    >>> target_label("ntfys://ntfy.example.org/ward3-ert")
    'ntfys'
    >>> target_label("mqtt")
    'mqtt'
    """
    if "://" not in target:
        return target
    return urlsplit(target).scheme or "url"
