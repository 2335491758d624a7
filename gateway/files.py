"""Files that survive a power cut half-way through being written.

A file is replaced by writing a temporary file beside it, flushing it to the card,
renaming it over the old one and flushing the directory: after a crash the old or
the new file is there, never half of one. Temporary files are created mode 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def write_synced(
    data: bytes, directory: Path, *, prefix: str, suffix: str = ""
) -> Path:
    """A new temporary file in `directory` holding `data`, flushed to the disk.

    Raises:
        OSError: It cannot be written.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries: a rename is durable only once they are."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes, check: Callable[[Path], T] | None = None
) -> T | None:
    """Replace `path` with `data`, atomically and durably.

    Args:
        path: The file to replace (or create).
        data: Its new content.
        check: Called with the written temporary file before it is renamed into
            place (to validate it, or set its mode); what it returns is returned.
            If it raises, `path` is left as it was.

    Raises:
        OSError: The file cannot be written.
    """
    temp = write_synced(data, path.parent, prefix=f".{path.name}.")
    try:
        result = check(temp) if check is not None else None
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return result
