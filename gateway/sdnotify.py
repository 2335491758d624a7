"""systemd's service notifications: readiness, the watchdog, a status line.

Under `Type=notify`, systemd passes the path of a datagram socket in
``$NOTIFY_SOCKET`` and waits for ``READY=1``; with `WatchdogSec=` it also passes
``$WATCHDOG_USEC`` and restarts the service when ``WATCHDOG=1`` does not arrive
within that time (see sd_notify(3) and sd_watchdog_enabled(3)). The keep-alive here
is a task on the agent's own event loop, so a loop that is stuck (a blocking call,
a busy loop) stops the pings and gets the service restarted, even though the
process itself is alive. Outside systemd nothing is set and every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

STATUS_EVERY_S = 30.0
"""How often the status line is refreshed when no watchdog asks for more."""


class ServiceNotifier:
    """Sends sd_notify messages to systemd, if the service was started by it.

    Args:
        address: The notification socket: a path, or an abstract name written
            with a leading ``@``; None when not running under `Type=notify`.
        watchdog_s: The watchdog timeout in seconds, or None if there is none.
    """

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self.sent = 0
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None
    ) -> ServiceNotifier:
        """The notifier systemd's environment variables describe."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_timeout(env))

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (the service runs with `Type=notify`)."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; False if it could not go.

        Failures are logged once, not raised: the agent keeps running, and
        systemd, if it is waiting, will act on the silence.
        """
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait on a full socket queue from the event loop.
                sock.setblocking(False)
                sock.sendto(message, _sockaddr(self.address))
        except OSError as exc:
            if not self._failed:
                log.warning("systemd notification not sent (%s)", exc.strerror or exc)
            self._failed = True
            return False
        self.sent += 1
        return True

    def stopping(self) -> None:
        """Tell systemd that the service is shutting down."""
        self.send("STOPPING=1", "STATUS=stopping")

    async def run(self, status: Callable[[], str]) -> None:
        """Send ``READY=1``, then ``WATCHDOG=1`` at half the timeout, until cancelled.

        Runs as a task on the event loop it keeps alive. Each message carries a
        fresh status line from `status` (counts only: it shows in `systemctl
        status` and is readable by every local user).
        """
        if not self.enabled:
            return
        self.send("READY=1", f"STATUS={status()}")
        log.info(
            "systemd told the gateway is ready (watchdog: %s)",
            f"{self.watchdog_s:g} s" if self.watchdog_s else "off",
        )
        every = self.watchdog_s / 2 if self.watchdog_s else STATUS_EVERY_S
        alive = ("WATCHDOG=1",) if self.watchdog_s else ()
        while True:
            await asyncio.sleep(every)
            self.send(*alive, f"STATUS={status()}")


def watchdog_timeout(environ: Mapping[str, str]) -> float | None:
    """The watchdog timeout systemd asks this process to honour, in seconds.

    None when there is no watchdog, or when ``$WATCHDOG_PID`` names another
    process (the variables were inherited from a parent that systemd watches).

    >>> watchdog_timeout({"WATCHDOG_USEC": "30000000"})
    30.0
    >>> watchdog_timeout({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    """
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def _sockaddr(address: str) -> str | bytes:
    # A leading "@" names a socket in Linux's abstract namespace: NUL, then name.
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address
