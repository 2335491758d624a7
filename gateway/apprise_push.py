"""Phone notifications through apprise (ntfy, Pushover, Gotify, SMS gateways...).

apprise is synchronous and does its own HTTP, so each send runs in a worker thread.
One `apprise.Apprise` per target URL is built once and kept.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterable

import apprise

from gateway.errors import DeliveryError
from gateway.notify import Alert, redact


class AppriseNotifier:
    """Sends alerts to apprise URLs; the target of each send is the URL.

    Args:
        urls: URLs to prepare now, so that a URL apprise does not understand is
            reported at start-up rather than at the first alert.

    Raises:
        DeliveryError: One of `urls` is not a URL apprise supports.
    """

    def __init__(self, urls: Iterable[str] = ()) -> None:
        self._senders: dict[str, apprise.Apprise] = {}
        self._lock = threading.Lock()
        for url in urls:
            self._sender(url)

    async def send(self, alert: Alert, target: str) -> None:
        """Push the alert's title and body to the apprise URL `target`.

        Raises:
            DeliveryError: apprise rejected the URL, reported a failure or raised.
        """
        await asyncio.to_thread(self._send_blocking, alert, target)

    def _send_blocking(self, alert: Alert, target: str) -> None:
        sender = self._sender(target)
        try:
            # notify() returns a result object that is falsy when a service failed.
            result = sender.notify(title=alert.title(), body=alert.body())
        except Exception as exc:  # apprise plugins raise whatever their client does
            raise DeliveryError(redact(target), type(exc).__name__) from exc
        if not bool(result):
            raise DeliveryError(redact(target), "the service reported a failure")

    def _sender(self, url: str) -> apprise.Apprise:
        with self._lock:
            sender = self._senders.get(url)
            if sender is None:
                sender = _build(url)
                self._senders[url] = sender
            return sender


def _build(url: str) -> apprise.Apprise:
    sender = apprise.Apprise()
    with warnings.catch_warnings():
        # apprise's first add() imports every plugin; its e-mail plugin imports the
        # stdlib `imghdr`, deprecated since Python 3.11 (PEP 594). Harmless here.
        warnings.filterwarnings(
            "ignore", message="'imghdr' is deprecated", category=DeprecationWarning
        )
        accepted = sender.add(url)
    if not accepted:
        raise DeliveryError(redact(url), "not a URL apprise supports")
    return sender
