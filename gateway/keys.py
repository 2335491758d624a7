"""The gateway's secret keys: where they come from and how they are made.

Three keys, each a file of its own:

====================  ===========================================================
name                  use
====================  ===========================================================
``roster.key``        32 random bytes: AES-256-GCM key of the roster vault
``pseudonym.key``     32 random bytes: HMAC-SHA256 key of patient pseudonyms and
                      of the audit trail's patient subjects
``signing.key``       Ed25519 private key (raw 32 bytes): signs audit checkpoints
====================  ===========================================================

A key is read from ``$CREDENTIALS_DIRECTORY/<name>`` first: systemd's
``LoadCredential=roster.key:/etc/iomt-gateway/keys/roster.key`` places it there,
readable by the service alone, for the life of the service. Otherwise it is read
from `[security] key_dir`, and a key file that its group or others may read is
refused: a key anyone on the box can read protects nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import ExitCode, GatewayError

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

ROSTER_KEY = "roster.key"
PSEUDONYM_KEY = "pseudonym.key"
SIGNING_KEY = "signing.key"
KEY_NAMES = (ROSTER_KEY, PSEUDONYM_KEY, SIGNING_KEY)
PENDING_SUFFIX = ".new"
"""A roster key being rotated in: kept beside the current one until the vault
encrypted with it has replaced the old vault (see `gateway.vault.rotate`)."""
KEY_BYTES = 32
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class KeyFileError(GatewayError):
    """A key is missing, unreadable, malformed or readable by others.

    Attributes:
        path: The file concerned.
    """

    exit_code = ExitCode.CONFIG_UNREADABLE

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"key file {path}: {reason}")


@dataclass(frozen=True)
class KeySource:
    """Where keys are read from: systemd credentials first, then a key folder.

    Attributes:
        key_dir: The folder of key files (mode 700, files mode 600).
        credentials_dir: systemd's credentials folder, if the service has one.
    """

    key_dir: Path
    credentials_dir: Path | None = None

    @classmethod
    def for_config(cls, cfg: Config) -> KeySource:
        """The key source of a configuration (reads ``$CREDENTIALS_DIRECTORY``)."""
        creds = os.environ.get(CREDENTIALS_ENV)
        return cls(cfg.path(cfg.security.key_dir), Path(creds) if creds else None)

    def locate(self, name: str) -> Path:
        """The file a key would be read from (it may not exist)."""
        if self.credentials_dir is not None:
            credential = self.credentials_dir / name
            if credential.exists():
                return credential
        return self.key_dir / name

    def from_credentials(self, name: str) -> bool:
        """Whether the key `name` is provided by systemd credentials."""
        return self.locate(name).parent == self.credentials_dir

    def has(self, name: str) -> bool:
        """Whether the key `name` exists (readability is not checked)."""
        return self.locate(name).exists()

    def read(self, name: str) -> bytes:
        """The raw bytes of key `name`.

        Raises:
            KeyFileError: Missing, unreadable, readable by group or others, or
                not 32 bytes long.
        """
        path = self.locate(name)
        if not path.exists():
            raise KeyFileError(
                path, "missing; create the keys with `iomt-gateway keys init`"
            )
        if not self.from_credentials(name):
            _check_private(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(path, f"cannot read ({exc.strerror})") from exc
        if len(data) != KEY_BYTES:
            raise KeyFileError(path, f"{len(data)} bytes; expected {KEY_BYTES}")
        return data

    def signing_key(self) -> Ed25519PrivateKey:
        """The gateway's Ed25519 signing key.

        Raises:
            KeyFileError: As `read`.
        """
        return Ed25519PrivateKey.from_private_bytes(self.read(SIGNING_KEY))


def key_id(key: bytes) -> bytes:
    """An 8-byte name for a symmetric key, safe to store beside what it encrypts.

    >>> key_id(bytes(32)).hex()
    '16b0e5450b94aeb7'
    """
    return hashlib.sha256(b"iomt-gateway key id\0" + key).digest()[:8]


def init_keys(key_dir: Path) -> list[str]:
    """Create whichever keys are missing in `key_dir` (mode 600; folder 700).

    Existing keys are never replaced: a new roster key would lock the vault.

    Returns:
        The names of the keys created.

    Raises:
        KeyFileError: The folder or a file cannot be written.
    """
    try:
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(key_dir, f"cannot create ({exc.strerror})") from exc
    created = [name for name in KEY_NAMES if _create(key_dir / name)]
    if SIGNING_KEY in created:
        write_public_key(key_dir)
    log.info("created %d key(s) in the key folder", len(created))
    return created


def new_key_file(path: Path) -> bytes:
    """Write 32 fresh random bytes to `path` (mode 600, must not exist).

    Raises:
        KeyFileError: It exists or cannot be written.
    """
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise KeyFileError(path, f"cannot create ({exc.strerror})") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def write_public_key(key_dir: Path) -> Path:
    """Write ``signing.pub`` (PEM) beside the signing key, for outside verifiers.

    Raises:
        KeyFileError: As `KeySource.read`.
    """
    private = KeySource(key_dir).signing_key()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = key_dir / "signing.pub"
    path.write_bytes(pem)
    return path


def _create(path: Path) -> bool:
    if path.exists():
        return False
    new_key_file(path)
    return True


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(path, f"cannot read ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            path,
            f"readable by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}` and make the service user its owner",
        )
