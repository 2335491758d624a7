"""The gateway's configuration: one TOML file, validated with pydantic.

Every problem is reported at once, each naming the key, the value found and what
is expected. Paths that are not absolute are taken relative to `gateway.data_dir`.
"""

from __future__ import annotations

import ipaddress
import tomllib
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.alarms import Priority
from gateway.errors import ConfigError, ConfigUnreadableError
from gateway.readings import Kind
from gateway.rules import PatientRules, RoomRules

Seconds = Annotated[float, Field(ge=0)]
PriorityName = Literal["low", "medium", "high"]
ROOM_KINDS = (
    Kind.ROOM_TEMPERATURE,
    Kind.HUMIDITY,
    Kind.CO2,
    Kind.LIGHT,
    Kind.MOTION,
    Kind.OCCUPANCY,
)


CLEARTEXT_SCHEMES = frozenset(
    # apprise's schemes that have an encrypting twin (json/jsons, ntfy/ntfys, ...),
    # checked against apprise's own list by the tests; growl and rsyslog have none.
    [
        "amqp",
        "apprise",
        "bark",
        "deltachat",
        "emby",
        "enigma2",
        "evolution",
        "flowtriq",
        "fluxer",
        "form",
        "goalert",
        "gorush",
        "gotify",
        "growl",
        "hassio",
        "http",
        "humhub",
        "irc",
        "jellyfin",
        "json",
        "kodi",
        "lametric",
        "mailto",
        "mastodon",
        "matrix",
        "misskey",
        "mmost",
        "mqtt",
        "ncloud",
        "nctalk",
        "notica",
        "notifico",
        "ntfy",
        "onebot",
        "opsimate",
        "parsep",
        "pinglet",
        "pjet",
        "psafer",
        "pushdeer",
        "rocket",
        "rsyslog",
        "session",
        "signal",
        "smpp",
        "smseagle",
        "synology",
        "toot",
        "trigv",
        "xbmc",
        "xml",
    ]
)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine: localhost, 127.0.0.0/8 or ::1.

    Names are not resolved (validation does no network I/O): ``localhost`` and
    names under ``.localhost`` (RFC 6761) count, any other name does not.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("broker.ward3")
    (True, True, False)
    """
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cleartext_target(target: str) -> bool:
    """Whether an alert target would travel unencrypted to another machine.

    >>> cleartext_target("json://10.0.0.7/hook"), cleartext_target("ntfys://ert")
    (True, False)
    >>> cleartext_target("json://127.0.0.1:8080/"), cleartext_target("mqtt")
    (False, False)
    """
    scheme, sep, _rest = target.partition("://")
    if not sep or scheme.lower() not in CLEARTEXT_SCHEMES:
        return False
    try:
        host = urlsplit(target).hostname
    except ValueError:
        return True
    return host is None or not is_loopback(host)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GatewaySection(_Section):
    """`[gateway]`: identity and where state lives."""

    id: str = Field("iomt-gateway", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    data_dir: Path = Path("/var/lib/iomt-gateway")
    timezone: str = "UTC"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("an IANA time zone such as Europe/Berlin or UTC") from exc
        return name


class StoreSection(_Section):
    """`[store]`: the readings database."""

    file: Path = Path("readings.db")
    retention_days: float | None = Field(30.0, gt=0)
    batch_size: int = Field(500, ge=1, le=100_000)
    flush_interval_s: float = Field(0.2, gt=0, le=10)


class TopicSection(_Section):
    """`[[mqtt.topics]]`: one room-sensor topic filter and how to read it.

    `format` is one of "number", "json", "senml", "zigbee2mqtt", "tasmota"; the
    single-value formats need `kind`, the others read `fields` (payload field ->
    kind) or their own defaults (see `sensors.formats`).
    """

    filter: str = Field(min_length=1)
    kind: Kind | None = None
    format: Literal["number", "json", "senml", "zigbee2mqtt", "tasmota"] = "json"
    value_path: str = "value"
    time_path: str | None = "ts"
    room_level: int | None = Field(1, ge=0)
    room: str | None = None
    device: str | None = None
    min_value: float | None = None
    max_value: float | None = None
    unit: str | None = None
    fields: dict[str, Kind] | None = None

    @field_validator("kind")
    @classmethod
    def _room_kind(cls, kind: Kind | None) -> Kind | None:
        if kind is not None and kind not in ROOM_KINDS:
            raise ValueError(
                f"a room-sensor kind, one of {[k.value for k in ROOM_KINDS]}"
            )
        return kind

    @model_validator(mode="after")
    def _single_value_kind(self) -> TopicSection:
        if self.format in ("number", "json") and self.kind is None:
            raise ValueError(f"a {self.format!r} topic needs kind")
        return self


class MqttSection(_Section):
    """`[mqtt]`: the broker, and the room-sensor topics taken in from it.

    Credentials never sit in this file: `credentials_file` names a file (mode
    600) holding ``username:password`` on its first line.
    """

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field("iomt-gateway", min_length=1, max_length=64)
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    receive_maximum: int | None = Field(None, ge=1, le=65535)
    tls_ca_file: FilePath | None = None
    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    credentials_file: FilePath | None = None
    status_topic: str | None = "iomt/{gateway_id}/status"
    topics: list[TopicSection] = []
    allow_plaintext: bool = Field(False, validate_default=True)
    """MQTT without TLS to a broker that is not on loopback (refused by default)."""

    @field_validator("allow_plaintext")
    @classmethod
    def _tls_off_host(cls, allow: bool, info: ValidationInfo) -> bool:
        host, given = info.data.get("host"), info.data.keys()
        if allow or host is None or "tls_ca_file" not in given or is_loopback(host):
            return allow
        if info.data["tls_ca_file"] is None:
            raise ValueError(
                f"mqtt.tls_ca_file set, or allow_plaintext = true: mqtt.host {host!r} "
                "is not on loopback, and MQTT without TLS crosses the network in clear"
            )
        return allow


class RulesSection(_Section):
    """`[rules]` and `[patients.rules]`: the alarm gate for wearables' streams."""

    persistence_s: Seconds | None = None
    clear_after_s: Seconds | None = None
    min_score: int | None = Field(None, ge=1, le=3)
    technical_persistence_s: Seconds | None = None
    stale_after_s: float | None = Field(None, gt=0)
    technical_priority: PriorityName | None = None
    stale_priority: PriorityName | None = None
    hysteresis: dict[Kind, Annotated[float, Field(ge=0)]] | None = None
    rhythm_threshold: float | None = Field(None, gt=0, lt=1)
    rhythm_persistence_s: Seconds | None = None
    rhythm_priority: Literal["low", "medium"] | None = None

    def apply(self, base: PatientRules) -> PatientRules:
        """`base` with every key given here changed."""
        given = self.model_dump(exclude_none=True)
        for key in ("technical_priority", "stale_priority", "rhythm_priority"):
            if key in given:
                given[key] = Priority[given[key].upper()]
        if "hysteresis" in given:
            given["hysteresis"] = {**base.hysteresis, **given["hysteresis"]}
        return PatientRules(**{**_fields(base), **given})


class RoomsSection(_Section):
    """`[rooms]`: room temperature band and the no-motion rule."""

    temperature_low: float = 18.0
    temperature_high: float = 26.0
    temperature_hysteresis: Seconds = 0.5
    persistence_s: Seconds = 600.0
    temperature_priority: PriorityName = "low"
    no_motion_after_s: float = Field(1800.0, gt=0)
    no_motion_priority: PriorityName = "medium"
    stale_after_s: float = Field(600.0, gt=0)
    stale_priority: PriorityName = "low"

    @field_validator("temperature_high")
    @classmethod
    def _band(cls, high: float, info: ValidationInfo) -> float:
        low = info.data.get("temperature_low")
        if low is not None and high <= low:
            raise ValueError(f"above temperature_low ({low:g})")
        return high

    def to_rules(self) -> RoomRules:
        """The engine's room settings."""
        d = self.model_dump()
        for key in ("temperature_priority", "no_motion_priority", "stale_priority"):
            d[key] = Priority[d[key].upper()]
        return RoomRules(**d)


class AlertsSection(_Section):
    """`[alerts]`: the outbox, where alerts go, and when they escalate."""

    outbox_file: Path = Path("outbox.db")
    topic_prefix: str = Field("ert", pattern=r"^[^#+]+$")
    targets: list[str] = ["mqtt"]
    escalation_targets: list[str] = []
    escalate_after_s: float = Field(120.0, gt=0)
    retry_initial_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    allow_insecure_targets: bool = Field(False, validate_default=True)
    """Apprise URLs that send in clear to a host not on loopback (refused)."""

    @field_validator("targets", "escalation_targets")
    @classmethod
    def _targets(cls, targets: list[str]) -> list[str]:
        for t in targets:
            if t != "mqtt" and "://" not in t:
                raise ValueError('"mqtt" or an apprise URL such as "ntfys://topic"')
        return targets

    @field_validator("allow_insecure_targets")
    @classmethod
    def _encrypted_targets(cls, allow: bool, info: ValidationInfo) -> bool:
        for key in ("targets", "escalation_targets"):
            for i, target in enumerate(info.data.get(key, [])):
                if not allow and cleartext_target(target):
                    scheme = target.partition("://")[0].lower()
                    raise ValueError(
                        f"an encrypting scheme for alerts.{key}.{i} (such as "
                        f"ntfys://, jsons://, https), or allow_insecure_targets = "
                        f"true: a {scheme}:// URL sends alerts in clear"
                    )
        return allow


class LearningSection(_Section):
    """`[learning]`: on-device learning's model store and privacy budget."""

    models_dir: Path = Path("models")
    privacy_file: Path = Path("privacy.db")
    epsilon_max: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    arch: Literal["linear", "mlp"] = "linear"
    scoring: bool = True
    """Score RR windows with the installed model (else the shipped one) as they
    complete; sustained high scores raise an irregular-rhythm alarm."""
    score_every_beats: int = Field(4, ge=1, le=64)
    round_epsilon: float = Field(1.0, gt=0)
    """Epsilon one training round may add to the account (noise is calibrated so
    that the cumulative epsilon after the round is the spent one plus this)."""
    # The settings of the leave-records-out table in the README (bench/loro.py). A
    # large expected batch makes DP-SGD's per-step cost (per-sample gradients,
    # clipping, noise) small beside the epoch's, and its noise small beside the sum.
    epochs: int = Field(20, ge=1, le=200)
    batch_size: int = Field(1024, ge=8, le=65_536)
    lr: float = Field(4.0, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    min_windows: int = Field(500, ge=1)
    """A round needs at least this many labelled windows of consenting patients."""
    train_every_h: float = Field(0.0, ge=0)
    """Hours between scheduled rounds in the running agent; 0: on demand only."""


class FederationSection(_Section):
    """`[federation]`: what this gateway's Flower ClientApp sends upstream.

    The aggregator chooses the model, epochs, batch size and learning rate of a
    round; the gateway alone chooses what it spends and how its update is bounded.
    """

    log_file: Path = Path("federation.db")
    work_dir: Path = Path("federation")
    noise_multiplier: float = Field(1.1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    update_clip: float = Field(1.0, gt=0)
    update_noise: float = Field(0.0, ge=0)
    quantise_8bit: bool = False
    keep_sent_updates: bool = False


class SecuritySection(_Section):
    """`[security]`: the roster vault, the secret keys and the audit trail.

    Keys are read from systemd credentials (``$CREDENTIALS_DIRECTORY``) first,
    then from `key_dir` (see `gateway.keys`).
    """

    key_dir: Path = Path("keys")
    roster_file: Path = Path("roster.vault")
    audit_file: Path = Path("audit.db")
    audit_checkpoint_every: int = Field(100, ge=1, le=1_000_000)


class MetricsSection(_Section):
    """`[metrics]`: the Prometheus endpoint; port 0 (the default) turns it off.

    It listens on loopback unless `host` says otherwise: a local Prometheus or
    node exporter scrapes it, and it carries counts only, never readings or refs.
    """

    port: int = Field(0, ge=0, le=65535)
    host: str = "127.0.0.1"


class PatientSection(_Section):
    """`[[patients]]`: one roster entry; the ref is pseudonymous."""

    ref: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    label: str | None = Field(None, max_length=64)
    room: str | None = None
    rules: RulesSection = RulesSection()


BLE_ADDRESS = r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$|^[0-9A-Fa-f-]{36}$"
Profile = Literal[
    "heart_rate",
    "battery",
    "pulse_oximeter",
    "thermometer",
    "blood_pressure",
    # TODO(ble): glucose meters send 0x2A18 records only when asked through the
    # Record Access Control Point (0x2A52); the link does not write it yet.
]


class DeviceSection(_Section):
    """`[[devices]]`: a wearable, found by address or by name, and who wears it."""

    address: str | None = Field(None, pattern=BLE_ADDRESS)
    name_pattern: str | None = Field(None, min_length=1)
    patient: str
    profiles: list[Profile] = ["heart_rate", "battery"]
    model: str | None = None
    connect_timeout_s: float = Field(15.0, ge=10)

    @model_validator(mode="after")
    def _findable(self) -> DeviceSection:
        if (self.address is None) == (self.name_pattern is None):
            raise ValueError("exactly one of address and name_pattern")
        return self

    @property
    def id(self) -> str:
        """How the roster names this device: its address, else its name pattern."""
        return self.address or self.name_pattern or ""


class ReplaySection(_Section):
    """`[[replay]]`: a recording played through the live code path."""

    source: Literal["mitdb", "mimic", "uci"]
    file: str = Field(min_length=1)
    device: str = Field(min_length=1)
    patient: str | None = None
    room: str | None = None

    @model_validator(mode="after")
    def _subject(self) -> ReplaySection:
        if self.source == "uci" and not self.room:
            raise ValueError("a uci replay needs room")
        if self.source != "uci" and not self.patient:
            raise ValueError(f"a {self.source} replay needs patient")
        return self


class Config(_Section):
    """The whole configuration file."""

    gateway: GatewaySection = GatewaySection()
    store: StoreSection = StoreSection()
    mqtt: MqttSection = MqttSection()
    rules: RulesSection = RulesSection()
    rooms: RoomsSection = RoomsSection()
    alerts: AlertsSection = AlertsSection()
    learning: LearningSection = LearningSection()
    federation: FederationSection = FederationSection()
    metrics: MetricsSection = MetricsSection()
    security: SecuritySection = SecuritySection()
    patients: list[PatientSection] = []
    devices: list[DeviceSection] = []
    replay: list[ReplaySection] = []

    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """The file this configuration was read from."""
        return self._source

    def cross_references(self) -> list[str]:
        """Problems between sections: unknown or repeated refs, repeated devices."""
        problems = []
        refs = [p.ref for p in self.patients]
        for i, ref in enumerate(refs):
            if ref in refs[:i]:
                problems.append(
                    f"patients.{i}.ref: got {ref!r}; expected: a ref not used before"
                )
        for section, items in (("devices", self.devices), ("replay", self.replay)):
            for i, item in enumerate(items):
                if item.patient is not None and item.patient not in refs:
                    problems.append(
                        f"{section}.{i}.patient: got {item.patient!r}; "
                        "expected: a ref listed in [[patients]]"
                    )
        ids = [d.id.upper() for d in self.devices]
        for i, device_id in enumerate(ids):
            if device_id in ids[:i]:
                problems.append(
                    f"devices.{i}: got {self.devices[i].id!r} again; expected: each "
                    "wearable once (one patient per device)"
                )
        return problems

    def path(self, p: Path) -> Path:
        """`p` resolved against the data directory."""
        return p if p.is_absolute() else self.gateway.data_dir / p

    def patient_rules(self) -> tuple[PatientRules, dict[str, PatientRules]]:
        """Default rules and each patient's, overrides applied."""
        defaults = self.rules.apply(PatientRules())
        return defaults, {p.ref: p.rules.apply(defaults) for p in self.patients}

    def labels(self) -> dict[str, str]:
        """Display label per patient ref, from the roster."""
        return {p.ref: p.label for p in self.patients if p.label}


def load_config(path: str | Path, **overrides: Any) -> Config:
    """Read and validate a configuration file.

    Args:
        path: The TOML file.
        **overrides: Top-level sections to update before validation (used by the
            demo and tests, e.g. ``mqtt={"port": 1884}``).

    Raises:
        ConfigUnreadableError: The file cannot be read or is not TOML.
        ConfigError: It is TOML but not a valid configuration; lists every problem.
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigUnreadableError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigUnreadableError(f"{path}: cannot read ({reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigUnreadableError(f"{path}: not valid TOML ({exc})") from exc
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(path), [_describe(e) for e in exc.errors()]) from exc
    problems = config.cross_references()
    if problems:
        raise ConfigError(str(path), problems)
    config._source = str(path)
    return config


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    expected = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (a typo?); remove it or check the README"
    if error["type"] == "string_pattern_mismatch":
        expected = _PATTERN_TEXT.get(str(error["loc"][-1]), expected)
    if error["type"] == "missing":
        return f"{key}: missing; this key is required"
    return f"{key}: got {_short(error.get('input'))}; expected: {expected}"


_NAME_TEXT = "letters, digits, '.', '_' or '-' (1 to 64 characters)"
_PATTERN_TEXT = {
    "id": _NAME_TEXT,
    "ref": _NAME_TEXT,
    "address": "a BLE address such as C8:4F:2A:10:77:01",
    "topic_prefix": "a topic without the wildcards + and #",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields(rules: PatientRules) -> dict[str, Any]:
    return {name: getattr(rules, name) for name in rules.__dataclass_fields__}
