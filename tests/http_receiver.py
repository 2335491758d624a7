"""A small HTTP receiver on 127.0.0.1 that records every POST, for delivery tests.

with HttpReceiver(fail_first=2) as rx:
    url = rx.apprise_url        # json://127.0.0.1:PORT/
    ...
    rx.wait_for(1)              # one POST answered 200
    rx.accepted_json()          # the bodies of those, parsed
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Received:
    """One POST as received, with the status it was answered with."""

    path: str
    body: bytes
    status: int


class HttpReceiver:
    """An HTTP server in a thread; answers 500 to the first `fail_first` POSTs."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_remaining = fail_first
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http-receiver", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def apprise_url(self) -> str:
        return f"json://127.0.0.1:{self.port}/"

    def start(self) -> HttpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fail_next(self, count: int) -> None:
        """Answer 500 to the next `count` POSTs."""
        with self._cond:
            self.fail_remaining = count

    def accepted(self) -> list[bytes]:
        """Bodies of the POSTs answered 200."""
        with self._cond:
            return [r.body for r in self.received if r.status == 200]

    def accepted_json(self) -> list[Any]:
        return [json.loads(body) for body in self.accepted()]

    def wait_for(self, accepted: int, timeout: float = 10.0) -> list[bytes]:
        """Block until at least `accepted` POSTs were answered 200.

        Raises:
            TimeoutError: Fewer arrived within `timeout`.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.accepted()) < accepted:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.accepted())}/{accepted} POSTs")
                self._cond.wait(left)
            return self.accepted()

    def _record(self, path: str, body: bytes) -> int:
        with self._cond:
            status = 500 if self.fail_remaining > 0 else 200
            self.fail_remaining = max(0, self.fail_remaining - 1)
            self.received.append(Received(path, body, status))
            self._cond.notify_all()
            return status

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                status = receiver._record(self.path, self.rfile.read(length))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
