"""Keys, pseudonyms and the encrypted roster vault, against real files."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import pytest

import gateway.audit
import gateway.keys
import gateway.pseudonym
from gateway import vault
from gateway.config import Config, load_config
from gateway.keys import (
    PSEUDONYM_KEY,
    ROSTER_KEY,
    KeyFileError,
    KeySource,
    init_keys,
    key_id,
    new_key_file,
)
from gateway.pseudonym import REF_PATTERN, pseudonym
from gateway.vault import Patient, Vault, VaultError


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "ward3-gw1"\ndata_dir = "{tmp_path / "data"}"\n'
        '[[patients]]\nref = "p-1"\nlabel = "Bed 1"\n'
        '[[patients]]\nref = "p-2"\nlabel = "Bed 2"\n'
    )
    config = load_config(path)
    init_keys(config.path(config.security.key_dir))
    return config


def roster_key(cfg: Config) -> bytes:
    return KeySource.for_config(cfg).read(ROSTER_KEY)


def test_keys_are_created_private_and_never_replaced(cfg: Config) -> None:
    key_dir = cfg.path(cfg.security.key_dir)
    before = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    assert init_keys(key_dir) == []
    assert {p.name: p.read_bytes() for p in key_dir.iterdir()} == before
    assert oct(key_dir.stat().st_mode & 0o777) == "0o700"
    for name in ("roster.key", "pseudonym.key", "signing.key"):
        assert (key_dir / name).stat().st_mode & 0o777 == 0o600
        assert len(before[name]) == 32
    assert before["signing.pub"].startswith(b"-----BEGIN PUBLIC KEY-----")


def test_a_key_file_others_can_read_is_refused(cfg: Config) -> None:
    path = cfg.path(cfg.security.key_dir) / ROSTER_KEY
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match=r"chmod 600 .*roster\.key"):
        KeySource.for_config(cfg).read(ROSTER_KEY)


def test_a_missing_key_names_the_command_that_makes_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="iomt-gateway keys init"):
        KeySource(tmp_path / "none").read(ROSTER_KEY)


def test_systemd_credentials_come_first(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / PSEUDONYM_KEY).write_bytes(b"c" * 32)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    source = KeySource.for_config(cfg)
    assert source.read(PSEUDONYM_KEY) == b"c" * 32
    assert source.read(ROSTER_KEY) == roster_key(cfg)  # not there: the key folder
    with pytest.raises(KeyFileError, match="systemd credentials"):
        (creds / ROSTER_KEY).write_bytes(b"r" * 32)
        vault.rotate(cfg)


def test_pseudonyms_are_deterministic_normalised_and_keyed() -> None:
    key = b"k" * 32
    ref = pseudonym(key, "MRN-00123")
    assert REF_PATTERN.fullmatch(ref)
    assert pseudonym(key, " mrn-00123\t") == ref
    assert pseudonym(key, "MRN-0123") != ref  # leading zeros matter
    assert pseudonym(b"j" * 32, "MRN-00123") != ref
    with pytest.raises(ValueError, match="empty"):
        pseudonym(key, "  ")


def test_the_vault_is_encrypted_bound_and_rewritten_with_a_new_nonce(
    cfg: Config,
) -> None:
    v = Vault.for_config(cfg)
    ada = Patient("p-1", "Ada Lovelace", "4", "Bed 4", True, False)
    v.save({"p-1": ada})
    first = v.path.read_bytes()
    assert first.startswith(b"IOMTVLT1" + key_id(roster_key(cfg)))
    assert b"Ada" not in first and b"Bed 4" not in first
    assert v.load() == {"p-1": ada}
    assert v.path.stat().st_mode & 0o777 == 0o600

    v.save({"p-1": ada})
    assert v.path.read_bytes()[16:28] != first[16:28]  # fresh nonce
    with pytest.raises(VaultError, match="another gateway"):
        Vault(v.path, roster_key(cfg), "another-gw").load()
    damaged = bytearray(first)
    damaged[40] ^= 1
    v.path.write_bytes(bytes(damaged))
    with pytest.raises(VaultError, match="does not decrypt"):
        v.load()


def test_consent_decides_training_and_monitoring(cfg: Config) -> None:
    assert vault.training_refs(cfg) is None  # no vault: every patient, as before
    assert vault.monitoring_refs(cfg) is None
    ada = vault.add_patient(cfg, "MRN-1", "Ada Lovelace", label="Window bed")
    bob = vault.add_patient(cfg, "MRN-2", "Bob Example", training=False)
    assert vault.training_refs(cfg) == {ada.ref}

    vault.set_consent(cfg, ada.ref, training=False)  # opt-out: next read sees it
    assert vault.training_refs(cfg) == set()
    vault.set_consent(cfg, bob.ref, monitoring=False)
    assert vault.monitoring_refs(cfg) == {"p-1", "p-2", ada.ref}
    assert vault.labels(cfg) == {"p-1": "Bed 1", "p-2": "Bed 2", ada.ref: "Window bed"}
    with pytest.raises(vault.UnknownPatientError):
        vault.set_consent(cfg, "p-000000000000", training=True)


def test_the_vault_label_wins_over_the_configuration(cfg: Config) -> None:
    v = Vault.for_config(cfg)
    v.save({"p-1": Patient("p-1", "Ada Lovelace", label="Bed 1 window")})
    assert vault.labels(cfg) == {"p-1": "Bed 1 window", "p-2": "Bed 2"}


def test_rotation_re_encrypts_under_a_new_key(cfg: Config) -> None:
    ada = vault.add_patient(cfg, "MRN-1", "Ada Lovelace")
    old = roster_key(cfg)
    assert vault.rotate(cfg) == 1
    new = roster_key(cfg)
    assert new != old
    path = cfg.path(cfg.security.roster_file)
    assert path.read_bytes()[8:16] == key_id(new)
    assert Vault.for_config(cfg).load() == {ada.ref: ada}
    assert not list(path.parent.glob("keys/*.new"))
    with pytest.raises(VaultError, match="encrypted with key"):
        Vault(path, old, cfg.gateway.id).load()


def test_a_rotation_cut_short_after_the_vault_moved_is_finished(
    cfg: Config,
) -> None:
    ada = vault.add_patient(cfg, "MRN-1", "Ada Lovelace")
    key_dir = cfg.path(cfg.security.key_dir)
    # The crash came after the new vault was renamed in, before the key was.
    pending = new_key_file(key_dir / "roster.key.new")
    path = cfg.path(cfg.security.roster_file)
    Vault(path, pending, cfg.gateway.id).save({ada.ref: ada})

    assert vault.training_refs(cfg) == {ada.ref}  # still readable
    vault.rotate(cfg)
    assert Vault.for_config(cfg).load() == {ada.ref: ada}
    assert sorted(os.listdir(key_dir)) == [
        "pseudonym.key",
        "roster.key",
        "signing.key",
        "signing.pub",
    ]


def test_the_documented_examples_hold() -> None:
    for module in (gateway.keys, gateway.pseudonym, gateway.audit):
        assert doctest.testmod(module).failed == 0, module.__name__
