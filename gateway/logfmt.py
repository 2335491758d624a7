"""Log lines for journald and for log shippers: one line per event.

The text format keeps what the gateway always printed (``LEVEL subsystem: message``)
and folds a traceback onto the same line, so journald stores one entry per event
and ``journalctl -p`` still finds it by level. The JSON format gives a shipper
fields it need not parse: time, level, subsystem, message, and the exception.

Neither adds anything to the message: what may appear in it (pseudonymous ids,
counts, sizes; never readings, payloads, names or labels) is decided where it is
logged.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class OneLineFormatter(logging.Formatter):
    """``LEVEL subsystem: message``, with any traceback folded onto the line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The record on one line; newlines become `` | ``."""
        return " | ".join(super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, subsystem, msg, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a compact JSON object on one line."""
        document = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "subsystem": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def formatter(name: str) -> logging.Formatter:
    """The formatter for `--log-format` `name` ("text" or "json").

    Raises:
        ValueError: `name` is not one of `FORMATS`.
    """
    if name == "text":
        return OneLineFormatter()
    if name == "json":
        return JsonFormatter()
    raise ValueError(f"log format must be one of {FORMATS}, not {name!r}")
