"""The roster vault: who the pseudonymous refs are, encrypted at rest.

Names, beds, display labels and consent live in one file, `[security]
roster_file`, encrypted with AES-256-GCM under the roster key (`gateway.keys`):

=======  ========  ===========================================================
offset   length    content
=======  ========  ===========================================================
0        8         magic ``IOMTVLT1`` (format version 1)
8        8         key id of the roster key (`gateway.keys.key_id`)
16       12        nonce, random for every write (never reused under a key)
28       rest      ciphertext and 16-byte tag of the JSON roster
=======  ========  ===========================================================

The associated data is the first 16 bytes and the gateway id, so a vault copied
onto another gateway, or given another key id, does not decrypt. Every write goes
to a temporary file that is fsync'd and then renamed over the old one.

The vault adds to the configuration's `[[patients]]`, it does not replace it:
a ref may be in both, and then the vault's label wins. Consent:

- Monitoring: a ref configured in `[[patients]]` is monitored unless the vault
  says no; a vault entry is monitored if it says yes.
- Training: with no vault at all every configured patient counts as consenting
  (the behaviour before consent existed). Once a vault exists, consent to training
  must be recorded in it: refs that are only in the configuration do not train.

TODO(privacy): `patient add` does not add the ref to `[[patients]]`, so a wearable
can be paired to a vault-only patient only after the operator lists the ref there;
and the pipeline does not yet drop readings of refs outside `monitoring_refs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import ExitCode, GatewayError, StoreCorruptError
from gateway.files import fsync_dir, write_atomically
from gateway.keys import (
    PENDING_SUFFIX,
    PSEUDONYM_KEY,
    ROSTER_KEY,
    KeyFileError,
    KeySource,
    key_id,
    new_key_file,
)
from gateway.pseudonym import pseudonym

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

MAGIC = b"IOMTVLT1"
_KEY_ID_END = 16
_NONCE_END = 28
_FORMAT = 1


class VaultError(StoreCorruptError):
    """The vault does not decrypt: wrong key, another gateway's file, or damaged."""


class UnknownPatientError(GatewayError):
    """No roster entry has this ref."""

    exit_code = ExitCode.USAGE

    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(
            f"no patient {ref!r} in the roster vault; `iomt-gateway patient list` "
            "shows the refs"
        )


class DuplicatePatientError(GatewayError):
    """A new patient's ref is already in the roster."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True, slots=True)
class Patient:
    """One roster entry. Everything but `ref` is personal data.

    Attributes:
        ref: Pseudonymous ref (`gateway.pseudonym`).
        name: The patient's name.
        bed: Bed or place of care, if any.
        label: What responders' phones show for them (e.g. "Bed 4").
        monitoring: Consents to being monitored.
        training: Consents to their data training the on-device model.
    """

    ref: str
    name: str
    bed: str | None = None
    label: str | None = None
    monitoring: bool = True
    training: bool = True


class Vault:
    """The encrypted roster file.

    Args:
        path: The vault file.
        key: The roster key (32 bytes).
        gateway_id: Bound into every encryption as associated data.
        pending_key: A roster key being rotated in, tried when `key` does not
            match the file's key id.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        gateway_id: str,
        pending_key: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        self._key = key
        self._pending = pending_key
        self._aad = gateway_id.encode()

    @classmethod
    def for_config(cls, cfg: Config) -> Vault:
        """The vault of a configuration, with its key (and any key being rotated in).

        Raises:
            KeyFileError: The roster key is missing or unsafe.
        """
        source = KeySource.for_config(cfg)
        pending = ROSTER_KEY + PENDING_SUFFIX
        return cls(
            cfg.path(cfg.security.roster_file),
            source.read(ROSTER_KEY),
            cfg.gateway.id,
            source.read(pending) if source.has(pending) else None,
        )

    def exists(self) -> bool:
        """Whether the vault file exists."""
        return self.path.exists()

    def load(self) -> dict[str, Patient]:
        """Every roster entry by ref; empty when there is no vault yet.

        Raises:
            VaultError: The file does not decrypt with the key(s) at hand.
        """
        if not self.path.exists():
            return {}
        entries = json.loads(self._decrypt(self.path.read_bytes()))
        return {p["ref"]: Patient(**p) for p in entries["patients"]}

    def save(self, patients: dict[str, Patient]) -> None:
        """Encrypt the roster under the current key and put it in place atomically."""
        document = {
            "format": _FORMAT,
            "patients": [asdict(p) for p in patients.values()],
        }
        header = MAGIC + key_id(self._key)
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._key).encrypt(
            nonce, json.dumps(document).encode(), header + self._aad
        )
        write_atomically(self.path, header + nonce + sealed)

    @contextlib.contextmanager
    def editing(self) -> Iterator[dict[str, Patient]]:
        """Load the roster under an exclusive lock, and save it if no error occurs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(self.path.name + ".lock")):
            patients = self.load()
            yield patients
            self.save(patients)

    def _decrypt(self, blob: bytes) -> bytes:
        if len(blob) < _NONCE_END + 16 or not blob.startswith(MAGIC):
            raise VaultError(f"roster vault {self.path}: not a vault file")
        header, nonce = blob[:_KEY_ID_END], blob[_KEY_ID_END:_NONCE_END]
        key = self._key_for(blob[len(MAGIC) : _KEY_ID_END])
        try:
            return AESGCM(key).decrypt(nonce, blob[_NONCE_END:], header + self._aad)
        except InvalidTag as exc:
            raise VaultError(
                f"roster vault {self.path}: does not decrypt (damaged, or written "
                "by another gateway); restore it from backup"
            ) from exc

    def _key_for(self, wanted: bytes) -> bytes:
        if wanted == key_id(self._key):
            return self._key
        if self._pending is not None and wanted == key_id(self._pending):
            return self._pending
        raise VaultError(
            f"roster vault {self.path}: encrypted with key {wanted.hex()}, and the "
            f"roster key is {key_id(self._key).hex()}; restore the matching key"
        )


# -- what the rest of the gateway asks -------------------------------------------


def training_refs(cfg: Config) -> set[str] | None:
    """Refs whose data may train the model; None when there is no vault (all may).

    Read it every round: an opt-out recorded since the last one then applies.

    Raises:
        KeyFileError: A vault exists but the roster key is missing or unsafe.
        VaultError: The vault does not decrypt.
    """
    patients = _vault_patients(cfg)
    if patients is None:
        return None
    return {ref for ref, p in patients.items() if p.training}


def monitoring_refs(cfg: Config) -> set[str] | None:
    """Refs that may be monitored; None when there is no vault (all configured).

    Raises:
        KeyFileError: A vault exists but the roster key is missing or unsafe.
        VaultError: The vault does not decrypt.
    """
    patients = _vault_patients(cfg)
    if patients is None:
        return None
    configured = {p.ref for p in cfg.patients}
    refused = {ref for ref, p in patients.items() if not p.monitoring}
    return (configured | set(patients)) - refused


def labels(cfg: Config) -> dict[str, str]:
    """Display label per ref: the configuration's, overridden by the vault's.

    Raises:
        KeyFileError: A vault exists but the roster key is missing or unsafe.
        VaultError: The vault does not decrypt.
    """
    patients = _vault_patients(cfg) or {}
    return cfg.labels() | {ref: p.label for ref, p in patients.items() if p.label}


def add_patient(
    cfg: Config,
    identifier: str,
    name: str,
    *,
    bed: str | None = None,
    label: str | None = None,
    monitoring: bool = True,
    training: bool = True,
) -> Patient:
    """Add a patient to the vault under the pseudonym of their local identifier.

    Raises:
        DuplicatePatientError: The ref is already in the vault.
        KeyFileError: A key is missing or unsafe.
        ValueError: The identifier or the name is empty.
    """
    if not name.strip():
        raise ValueError("a patient needs a name")
    ref = pseudonym(KeySource.for_config(cfg).read(PSEUDONYM_KEY), identifier)
    with Vault.for_config(cfg).editing() as patients:
        if ref in patients:
            raise DuplicatePatientError(
                f"{ref} is already in the roster vault (same identifier, or a "
                "pseudonym collision): nothing was changed"
            )
        patients[ref] = Patient(ref, name.strip(), bed, label, monitoring, training)
    return patients[ref]


def set_consent(
    cfg: Config,
    ref: str,
    *,
    monitoring: bool | None = None,
    training: bool | None = None,
) -> Patient:
    """Change a patient's consent; None leaves that consent as it is.

    Raises:
        UnknownPatientError: No vault entry has this ref.
    """
    with Vault.for_config(cfg).editing() as patients:
        if ref not in patients:
            raise UnknownPatientError(ref)
        current = patients[ref]
        patients[ref] = replace(
            current,
            monitoring=current.monitoring if monitoring is None else monitoring,
            training=current.training if training is None else training,
        )
    return patients[ref]


def remove_patient(cfg: Config, ref: str) -> bool:
    """Delete a patient's vault entry; return whether there was one.

    Raises:
        KeyFileError: The roster key is missing or unsafe.
    """
    vault = Vault.for_config(cfg)
    if not vault.exists():
        return False
    with vault.editing() as patients:
        return patients.pop(ref, None) is not None


def rotate(cfg: Config) -> int:
    """Re-encrypt the roster under a new roster key; return the entries carried.

    The new key is written beside the old one (``roster.key.new``), the vault is
    re-encrypted with it and renamed in, and only then does the new key replace
    the old. Interrupted anywhere, the vault decrypts with one of the two keys
    present, and the next load finishes the rotation.

    Raises:
        KeyFileError: The roster key comes from systemd credentials (rotate it
            there), or a key file cannot be written.
        VaultError: The vault does not decrypt with the current key.
    """
    source = KeySource.for_config(cfg)
    if source.from_credentials(ROSTER_KEY):
        raise KeyFileError(
            source.locate(ROSTER_KEY),
            "provided by systemd credentials; rotate the credential's source file "
            "and re-encrypt with a key folder instead",
        )
    vault = Vault.for_config(cfg)
    with _locked(vault.path.with_name(vault.path.name + ".lock")):
        patients = _finish_or_discard_rotation(cfg, vault)
        pending = _pending_path(source)
        new_key = new_key_file(pending)
        if vault.exists():
            Vault(vault.path, new_key, cfg.gateway.id).save(patients)
        _replace_key(pending, source.locate(ROSTER_KEY))
    log.info("roster key rotated; %d entries re-encrypted", len(patients))
    return len(patients)


def _finish_or_discard_rotation(cfg: Config, vault: Vault) -> dict[str, Patient]:
    """Settle a rotation a crash interrupted; return the roster."""
    patients = vault.load()
    source = KeySource.for_config(cfg)
    pending = _pending_path(source)
    if not pending.exists():
        return patients
    if vault.exists() and vault.path.read_bytes()[8:16] == key_id(pending.read_bytes()):
        _replace_key(pending, source.locate(ROSTER_KEY))  # the vault already moved
    else:
        pending.unlink()  # never used: the vault is still under the old key
    return patients


def _vault_patients(cfg: Config) -> dict[str, Patient] | None:
    path = cfg.path(cfg.security.roster_file)
    if not path.exists():
        return None
    return Vault.for_config(cfg).load()


def _pending_path(source: KeySource) -> Path:
    return source.key_dir / (ROSTER_KEY + PENDING_SUFFIX)


def _replace_key(pending: Path, current: Path) -> None:
    os.replace(pending, current)
    fsync_dir(current.parent)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    # Two commands editing the roster at once would each lose the other's change.
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
