"""Changing the roster in the configuration file: `iomt-gateway pair`.

The file is the operator's: a new `[[devices]]` entry is appended as text, so their
comments and layout stay as they wrote them, and the result is validated before it
replaces the file (atomically, by rename).

TODO(ble): `pair` does not bond yet. Wearables that require bonding (encrypted
characteristics) need BlueZ's pairing agent, which bleak reaches only through
`BleakClient.pair()` on a live adapter; untestable without one here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.files import write_atomically

log = logging.getLogger(__name__)


def add_device(
    path: Path,
    *,
    address: str,
    patient: str,
    profiles: Sequence[str] = ("heart_rate", "battery"),
    model: str | None = None,
) -> Config:
    """Add a wearable to the roster in the file at `path`.

    Returns:
        The configuration as it now stands.

    Raises:
        ConfigError: The patient is not in the roster, the device is already in it,
            or the entry is invalid (each problem named).
    """
    current = load_config(path)
    problems = []
    if patient not in {p.ref for p in current.patients}:
        problems.append(f"patient: {patient!r} is not in [[patients]]; add it first")
    if address.upper() in {(d.address or "").upper() for d in current.devices}:
        problems.append(f"address: {address} is already in [[devices]]")
    if problems:
        raise ConfigError(str(path), problems)

    entry = _entry(address, patient, profiles, model)
    text = path.read_text(encoding="utf-8")
    new_text = text + ("" if text.endswith("\n") else "\n") + entry
    config = _replace_validated(path, new_text)
    _audit_pairing(config, address, patient)
    return config


def _audit_pairing(config: Config, address: str, patient: str) -> None:
    from gateway.audit import AuditLog, config_digest

    if not config.gateway.data_dir.is_dir():
        # Not installed here yet: the agent's first start records the config hash.
        log.warning("no data directory yet; the pairing is not in the audit trail")
        return
    with AuditLog.for_config(config) as audit:
        details = {"device_id": address, "config_sha256": config_digest(config)}
        audit.record("device.paired", ref=patient, details=details)


def _entry(
    address: str, patient: str, profiles: Sequence[str], model: str | None
) -> str:
    listed = ", ".join(f'"{p}"' for p in profiles)
    lines = [
        "",
        "[[devices]]",
        f'address = "{address}"',
        f'patient = "{patient}"',
        f"profiles = [{listed}]",
    ]
    if model:
        lines.append(f'model = "{model}"')
    return "\n".join(lines) + "\n"


def _replace_validated(path: Path, text: str) -> Config:
    mode = path.stat().st_mode & 0o7777

    def validated(written: Path) -> Config:
        config = load_config(written)
        os.chmod(written, mode)
        return config

    config = write_atomically(path, text.encode("utf-8"), validated)
    assert config is not None
    return config
