"""A mosquitto broker on a free loopback port, for the demo and the tests.

A real gateway talks to the broker its site runs; the demo and the test-suite start
their own, from the Debian package, exactly as a site would run it, and stop it after.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from gateway.errors import BrokerError

_SEARCH_PATH = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"


def mosquitto_binary() -> str:
    """The mosquitto executable.

    Raises:
        BrokerError: mosquitto is not installed (`apt-get install mosquitto`).
    """
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path=_SEARCH_PATH)
    if not found:
        raise BrokerError("127.0.0.1", 0, "mosquitto is not installed")
    return found


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener's files (PEM), and whether clients must show a certificate.

    Attributes:
        ca_file: The CA that signed the server's certificate and clients' ones.
        cert_file: The server certificate.
        key_file: The server's private key.
        require_client_cert: Mutual TLS: refuse clients without a certificate
            signed by `ca_file`.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


class LocalBroker:
    """A mosquitto process on 127.0.0.1 that keeps its port across restarts.

    Args:
        port: Port to listen on; a free one when None.
        persistence: Keep sessions and queued QoS-1 messages on disk across
            restarts, as a production broker does.
        workdir: Where config, persistence and log go; a temporary folder if None.
        tls: Serve TLS on the port instead of plain MQTT.
        password_file: A mosquitto password file (`mosquitto_passwd`); anonymous
            clients are then refused.
        max_inflight: Unacknowledged QoS-1 messages mosquitto sends one client;
            with ack-after-commit this bounds a subscriber's throughput.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = True,
        workdir: Path | None = None,
        tls: BrokerTls | None = None,
        password_file: Path | None = None,
        max_inflight: int = 100,
    ) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.password_file = password_file
        self.max_inflight = max_inflight
        self._persistence = persistence
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="iomt-mosquitto-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts connections.

        Raises:
            BrokerError: It is not installed or did not come up within `timeout`.
        """
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._config())
        log = (self.workdir / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log
        )
        log.close()
        self._wait_listening(timeout)

    def stop(self) -> None:
        """Stop mosquitto gracefully (it saves its persistence file)."""
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the temporary folder."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _config(self) -> str:
        lines = [f"listener {self.port} {self.host}"]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                f"require_certificate {str(self.tls.require_client_cert).lower()}",
            ]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        lines += [
            "max_queued_messages 100000",
            f"max_inflight_messages {self.max_inflight}",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            # Started as root, mosquitto drops to the `mosquitto` user, which cannot
            # write to our private workdir: no log, and no persistence file, so every
            # session (and the messages queued for it) vanished on restart. A site's
            # broker runs as `mosquitto` with /var/lib/mosquitto/ owned by it; here
            # the broker runs as whoever owns the workdir (ignored unless root).
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        if self._persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "autosave_interval 1",
            ]
        return "\n".join(lines) + "\n"

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(self.host, self.port, "mosquitto exited at start")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise BrokerError(self.host, self.port, f"not listening after {timeout} s")
