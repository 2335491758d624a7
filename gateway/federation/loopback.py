"""A whole Flower fleet on loopback: SuperLink, SuperNodes, `flwr run`.

For the tests, the benchmark and trying a fleet set-up on one machine. Every
process is a real Flower executable from this environment's bin directory (put
first on PATH, as the SuperLink starts `flower-superexec` and the SuperNodes
`flwr-clientapp` by name). Telemetry and update checks are off, and `flwr run`
uses an explicit connection written into the fleet's own FLWR_HOME: Flower's
default connection would start a hidden local simulation server instead.

With `secure=True` the SuperLink serves TLS with a certificate from a throwaway
CA, and only SuperNodes whose public keys were registered may connect.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.broker import free_port

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower App folder (its pyproject.toml names our ServerApp and ClientApp)."""

CONNECTION = "fleet"
"""Name of the explicit SuperLink connection in the fleet's Flower config."""


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: our bin first, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def write_node_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH form: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def write_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet test CA")])
    ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = _certificate(name, ca_name, key.public_key(), ca_key, is_ca=False)
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


def _certificate(subject, issuer, public_key, signing_key, *, is_ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True)
    )
    if not is_ca:
        names = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(signing_key, hashes.SHA256())


class LoopbackFleet:
    """A SuperLink and SuperNodes as child processes; stop() kills them all."""

    def __init__(self, root: Path, *, secure: bool = False) -> None:
        self.root = Path(root)
        self.secure = secure
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tls = write_tls(self.root) if secure else None
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> LoopbackFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write the explicit connection and start the SuperLink."""
        self._write_connection()
        args = ["flower-superlink", "--port", str(self.port)]
        args += ["--disable-runtime-dependency-installation"]
        if self.tls is None:
            args.append("--insecure")
        else:
            ca, cert, key = self.tls
            args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
            args += ["--ssl-keyfile", str(key), "--enable-supernode-auth"]
        self.superlink = self._spawn("superlink", args)
        self._wait_listening(self.port)

    def add_node(
        self, name: str, gateway_config: Path, private_key: Path | None = None
    ) -> subprocess.Popen:
        """Start a SuperNode whose ClientApp serves the gateway of that config."""
        args = supernode_args(
            self.address,
            gateway_config,
            port=free_port(),
            ca=None if self.tls is None else self.tls[0],
            private_key=private_key,
        )
        self.nodes[name] = self._spawn(name, args)
        return self.nodes[name]

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink.

        Raises:
            subprocess.CalledProcessError: If Flower refuses the key.
        """
        self.flwr("supernode", "register", str(public_key), CONNECTION)

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run the `flwr` CLI in the fleet's environment; return its stdout."""
        done = subprocess.run(
            ["flwr", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout

    def run(self, run_config: dict[str, object]) -> subprocess.Popen:
        """Start `flwr run --stream` of our app; the process ends with the run."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        args = ["flwr", "run", str(APP_DIR), CONNECTION, "--stream"]
        if overrides:
            args += ["--run-config", overrides]
        return self._spawn("run", args)

    def kill_node(self, name: str) -> None:
        """SIGKILL a SuperNode and every process it started (its ClientApp, job)."""
        kill_tree(self.nodes[name].pid)

    def stop(self) -> None:
        """Kill every process of the fleet (nodes first) and close the logs."""
        # Newest first: runs and nodes before the SuperLink they talk to.
        for proc in reversed(self._procs):
            if proc.poll() is None:
                kill_tree(proc.pid)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def log_text(self, name: str) -> str:
        """What a fleet process wrote so far (stdout and stderr)."""
        return (self.root / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        handle = (self.root / f"{name}.log").open("w")
        self._logs.append(handle)
        proc = subprocess.Popen(
            args,
            env=self.env,
            cwd=self.root,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def _write_connection(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            f"[superlink.{CONNECTION}]",
        ]
        lines.append(f'address = "{self.address}"')
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls[0]}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def _wait_listening(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5),
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not listen on port {port}")


def supernode_args(
    superlink: str,
    gateway_config: Path,
    *,
    port: int,
    ca: Path | None,
    private_key: Path | None,
) -> list[str]:
    """The flower-supernode command line for one gateway."""
    args = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    args += ["--node-config", f'gateway-config="{gateway_config}"']
    args += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(private_key)]
    return args


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (they may have left its group)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def record_gateway(root: Path, name: str, record: str, **federation: object) -> Path:
    """A gateway whose store holds one shipped MIT-BIH record; returns its config.

    The record's RR intervals and reference labels are one patient's (`p-RECORD`);
    `federation` overrides the `[federation]` keys (sigma 1.1, sent updates kept).
    """
    from gateway.learning import dataset
    from sensors.replay import data_path

    data = root / name
    data.mkdir(parents=True)
    mitdb = data_path("mitdb/100_all.csv").parent
    dataset.import_annotated_record(
        data / "readings.db",
        f"p-{record}",
        f"strap-{record}",
        mitdb / f"{record}_all.csv",
        mitdb / f"{record}_pvc.csv",
        start=1_700_000_000.0,
    )
    settings = {"noise_multiplier": 1.1, "keep_sent_updates": True, **federation}
    lines = [
        "[gateway]",
        f'data_dir = "{data}"',
        "[learning]",
        "epsilon_max = 50.0",
        "[federation]",
        *(f"{k} = {_toml(v)}" for k, v in settings.items()),
        "[[patients]]",
        f'ref = "p-{record}"',
    ]
    config = data / "gateway.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
