"""The decode error every sensor adapter raises for malformed input."""

from __future__ import annotations


class DecodeError(ValueError):
    """A payload does not follow its format; it goes to quarantine with `reason`.

    Attributes:
        source: What was being decoded (a characteristic UUID, a topic's format).
        reason: Short, payload-free explanation, safe to log and store.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")
