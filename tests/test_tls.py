"""Encrypted, authenticated links: MQTT over TLS with a pinned CA, and no cleartext.

A CA made here signs mosquitto's certificate (and a client's); the gateway's link
trusts that CA only. A certificate from another CA, or one for another host name,
is refused; so is a client without a certificate when the broker asks for one.
The configuration refuses MQTT without TLS to a broker off loopback, and apprise
URLs that send in clear, unless explicitly allowed.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.broker import BrokerTls, LocalBroker
from gateway.config import CLEARTEXT_SCHEMES, cleartext_target, is_loopback, load_config
from gateway.errors import BrokerError, ConfigError, ConfigUnreadableError
from gateway.paho import MqttLink, MqttSettings, tls_context, tls_problem
from tests.waiting import until

# -- a throwaway PKI ------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


class Authority:
    """A CA that issues server and client certificates into a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        self.cert = (
            _builder(subject, subject, self.key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self.key, hashes.SHA256())
        )
        self.file = folder / f"{name}.crt"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.file.chmod(0o644)

    def issue(self, stem: str, *, dns: list[str], ips: list[str] = ()) -> Issued:  # type: ignore[assignment]
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = _builder(_name(stem), self.cert.subject, key).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), True
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        # mosquitto may read its files as another user: throwaway keys, readable.
        issued.key.chmod(0o644)
        issued.cert.chmod(0o644)
        return issued


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other_ca: Authority
    server: Issued
    wrong_name: Issued
    foreign_server: Issued
    client: Issued


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    # Outside pytest's private tmp folder: mosquitto started as root may read its
    # files as another user.
    with tempfile.TemporaryDirectory(prefix="iomt-tls-") as folder:
        where = Path(folder)
        where.chmod(0o755)
        ca, other = Authority(where, "ward-ca"), Authority(where, "other-ca")
        yield Pki(
            ca=ca,
            other_ca=other,
            server=ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"]),
            wrong_name=ca.issue("elsewhere", dns=["broker.elsewhere.example"]),
            foreign_server=other.issue(
                "impostor", dns=["localhost"], ips=["127.0.0.1"]
            ),
            client=ca.issue("gateway-7", dns=[]),
        )


def tls_broker(server: Issued, ca: Authority, *, mtls: bool = False) -> LocalBroker:
    return LocalBroker(tls=BrokerTls(ca.file, server.cert, server.key, mtls))


def settings(
    broker: LocalBroker, ca: Authority, client: Issued | None = None, **kw: object
) -> MqttSettings:
    return MqttSettings(
        port=broker.port,
        client_id=f"tls-{uuid.uuid4().hex[:8]}",
        clean_start=True,
        tls_ca_file=str(ca.file),
        tls_cert_file=str(client.cert) if client else None,
        tls_key_file=str(client.key) if client else None,
        **kw,  # type: ignore[arg-type]
    )


async def round_trip(s: MqttSettings) -> list[bytes]:
    """Subscribe and publish over one TLS link; what came back."""
    received: list[bytes] = []
    link = MqttLink(s)
    link.subscribe("tls/echo", lambda m: received.append(m.payload), qos=1)
    await link.connect(timeout=5)
    try:
        await until(lambda: "tls/echo" in link.granted, what="SUBACK")
        await link.publish("tls/echo", b"over TLS", qos=1)
        await until(lambda: received == [b"over TLS"], what="message back")
    finally:
        await link.close()
    return received


async def refused(s: MqttSettings) -> tuple[str, str | None]:
    """Connect, expecting a refusal; the error's type and the link's TLS problem."""
    link = MqttLink(s)
    try:
        await link.connect(timeout=3)
    except BrokerError as exc:
        problem = tls_problem(link)
        # The error the operator sees names the certificate problem itself.
        assert problem is None or problem in str(exc)
        return "BrokerError", problem
    await link.close()
    return "connected", None


# -- MQTT over TLS against a real mosquitto -------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_with_the_pinned_ca_carries_messages(pki: Pki, host: str) -> None:
    with tls_broker(pki.server, pki.ca) as broker:
        s = settings(broker, pki.ca, host=host)
        assert asyncio.run(round_trip(s)) == [b"over TLS"]


@pytest.mark.broker
def test_a_server_certificate_from_another_ca_is_refused(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.paho")
    with tls_broker(pki.foreign_server, pki.other_ca) as broker:
        kind, problem = asyncio.run(refused(settings(broker, pki.ca)))
    assert kind == "BrokerError"
    assert problem is not None
    assert problem.startswith("certificate problem: the broker's certificate is not")
    assert "self-signed certificate in certificate chain" in problem
    # The operator sees it once in the journal, not once per retry.
    warnings = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert warnings == [f"MQTT TLS: {problem}"]


@pytest.mark.broker
def test_a_certificate_for_another_host_name_is_refused(pki: Pki) -> None:
    with tls_broker(pki.wrong_name, pki.ca) as broker:
        kind, problem = asyncio.run(refused(settings(broker, pki.ca)))
    assert kind == "BrokerError"
    assert problem is not None and "IP address mismatch" in problem


@pytest.mark.broker
def test_mutual_tls_refuses_a_client_without_certificate(pki: Pki) -> None:
    with tls_broker(pki.server, pki.ca, mtls=True) as broker:
        kind, problem = asyncio.run(refused(settings(broker, pki.ca)))
    assert kind == "BrokerError"
    assert problem is not None and problem.startswith("certificate problem")
    assert "client certificate" in problem


@pytest.mark.broker
def test_mutual_tls_with_a_client_certificate_carries_messages(pki: Pki) -> None:
    with tls_broker(pki.server, pki.ca, mtls=True) as broker:
        s = settings(broker, pki.ca, pki.client)
        assert asyncio.run(round_trip(s)) == [b"over TLS"]


# -- the TLS context itself -----------------------------------------------------------


def test_the_context_pins_the_ca_and_needs_tls_1_2(pki: Pki) -> None:
    context = tls_context(MqttSettings(tls_ca_file=str(pki.ca.file)))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    # Only the configured CA: the system's store is not loaded.
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "ward-ca"),),)
    ]


def test_unusable_tls_files_are_a_configuration_problem(
    pki: Pki, tmp_path: Path
) -> None:
    with pytest.raises(ConfigUnreadableError, match="cannot use them"):
        tls_context(MqttSettings(tls_ca_file=str(tmp_path / "absent.crt")))
    # A client certificate with a key that is not its own.
    mismatched = MqttSettings(
        tls_ca_file=str(pki.ca.file),
        tls_cert_file=str(pki.client.cert),
        tls_key_file=str(pki.server.key),
    )
    with pytest.raises(ConfigUnreadableError, match="key matches the certificate"):
        tls_context(mismatched)


def test_a_plain_link_has_no_tls_problem() -> None:
    assert tls_problem(MqttLink(MqttSettings())) is None


# -- no cleartext off loopback (configuration) ----------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n{text}')
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


@pytest.mark.parametrize("host", ["10.20.0.5", "broker.ward3.example", "::2"])
def test_plaintext_mqtt_to_a_broker_off_loopback_is_refused(
    tmp_path: Path, host: str
) -> None:
    found = problems(write(tmp_path, f'[mqtt]\nhost = "{host}"\n'))
    assert found == [
        "mqtt.allow_plaintext: got False; expected: mqtt.tls_ca_file set, or "
        f"allow_plaintext = true: mqtt.host {host!r} is not on loopback, and MQTT "
        "without TLS crosses the network in clear"
    ]


@pytest.mark.parametrize(
    "mqtt",
    [
        'host = "127.0.0.1"',
        'host = "127.3.0.9"',
        'host = "localhost"',
        'host = "::1"',
        'host = "10.20.0.5"\nallow_plaintext = true',
        'host = "10.20.0.5"\ntls_ca_file = "{ca}"',
    ],
)
def test_loopback_tls_or_an_explicit_allowance_is_accepted(
    tmp_path: Path, pki: Pki, mqtt: str
) -> None:
    text = "[mqtt]\n" + mqtt.format(ca=pki.ca.file) + "\n"
    assert load_config(write(tmp_path, text)).mqtt.port == 1883


@pytest.mark.parametrize(
    ("target", "scheme"),
    [
        ("json://10.1.1.1/hook?token=s3cret", "json"),
        ("ntfy://ert-ward3", "ntfy"),
        ("gotify://push.example.org/AbCdEf123", "gotify"),
        ("mailto://user:pw@mail.example.org", "mailto"),
        ("XML://hooks.example.org/", "xml"),
    ],
)
def test_apprise_targets_that_send_in_clear_are_refused(
    tmp_path: Path, target: str, scheme: str
) -> None:
    text = f'[alerts]\ntargets = ["mqtt"]\nescalation_targets = ["{target}"]\n'
    found = problems(write(tmp_path, text))
    assert found == [
        "alerts.allow_insecure_targets: got False; expected: an encrypting scheme "
        "for alerts.escalation_targets.0 (such as ntfys://, jsons://, https), or "
        f"allow_insecure_targets = true: a {scheme}:// URL sends alerts in clear"
    ]
    assert "s3cret" not in found[0] and "AbCdEf123" not in found[0]


def test_encrypting_loopback_or_allowed_targets_are_accepted(tmp_path: Path) -> None:
    targets = [
        "mqtt",
        "ntfys://ntfy.example.org/ert",
        "jsons://hooks.example.org/",
        "pover://user@token",
        "json://127.0.0.1:8080/",
        "json://localhost/",
    ]
    text = f"[alerts]\ntargets = {targets!r}\n".replace("'", '"')
    assert load_config(write(tmp_path, text)).alerts.targets == targets
    allowed = (
        '[alerts]\ntargets = ["json://10.1.1.1/"]\nallow_insecure_targets = true\n'
    )
    assert load_config(write(tmp_path, allowed)).alerts.allow_insecure_targets


def test_every_apprise_scheme_with_an_encrypting_twin_counts_as_cleartext() -> None:
    with warnings.catch_warnings():
        # apprise's e-mail plugin imports the deprecated stdlib `imghdr`.
        warnings.simplefilter("ignore", DeprecationWarning)
        import apprise

        schemas = apprise.Apprise().details()["schemas"]
    twins = {
        scheme
        for s in schemas
        if s["secure_protocols"]
        for scheme in s["protocols"] or ()
    }
    assert len(twins) > 40
    assert twins <= CLEARTEXT_SCHEMES
    secure = {scheme for s in schemas for scheme in s["secure_protocols"] or ()}
    assert not secure & CLEARTEXT_SCHEMES


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("mqtt.localhost", True),
        ("10.0.0.1", False),
        ("localhost.example.org", False),
        ("0.0.0.0", False),
    ],
)
def test_loopback_is_told_without_resolving_names(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    url_host = f"[{host}]" if host.count(":") > 1 and "[" not in host else host
    assert cleartext_target(f"json://{url_host}/") is not loopback
