"""`iomt-gateway keys`, `patient` and `audit`, run as the operator would."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from gateway import vault
from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ExitCode
from gateway.pseudonym import REF_PATTERN
from gateway.readings import Kind, Quality, Reading
from gateway.store import ReadingStore


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "ward3-gw1"\ndata_dir = "{tmp_path / "data"}"\n'
        '[[patients]]\nref = "p-1"\nlabel = "Bed 1"\n'
    )
    assert main(["keys", "init", "--config", str(path)]) == 0
    return path


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def add_ada(config: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    code, out, _ = run(
        capsys,
        "patient", "add", "--config", str(config), "--id", "MRN 0042",
        "--name", "Ada Lovelace", "--bed", "4", "--label", "Bed 4", *extra,
    )  # fmt: skip
    assert code == 0
    ref = out.strip()
    assert REF_PATTERN.fullmatch(ref)
    return ref


def test_add_consent_and_list(config: Path, capsys: pytest.CaptureFixture) -> None:
    ref = add_ada(config, capsys, "--no-training")
    cfg = load_config(config)
    assert vault.training_refs(cfg) == set()

    code, _, err = run(
        capsys, "patient", "add", "--config", str(config), "--id", "mrn0042",
        "--name", "Ada Again",
    )  # fmt: skip
    assert code == ExitCode.USAGE and "already in the roster" in err

    code, out, _ = run(
        capsys, "patient", "consent", ref, "--training", "yes", "--config", str(config)
    )
    assert (code, out.strip()) == (0, f"{ref}: monitoring yes, training yes")
    assert vault.training_refs(cfg) == {ref}
    code, out, _ = run(capsys, "patient", "list", "--config", str(config))
    assert f"{ref}  Ada Lovelace  bed 4  label Bed 4" in out

    code, _, err = run(capsys, "patient", "consent", "p-1", "--config", str(config))
    assert code == ExitCode.USAGE and "no patient 'p-1'" in err


def test_export_writes_json_and_fhir_observations(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ref = add_ada(config, capsys)
    cfg = load_config(config)
    at = 1_750_000_000.0
    with ReadingStore(cfg.path(cfg.store.file)) as store:
        store.put_many(
            [
                Reading("strap", Kind.HEART_RATE, 72.0, at, ref),
                Reading("strap", Kind.RR_INTERVAL, 830.0, at, ref),
                Reading("oxi", Kind.SPO2, 97.0, at + 1, ref),
                Reading("thermo", Kind.BODY_TEMPERATURE, 37.2, at + 2, ref),
                Reading(
                    "strap", Kind.HEART_RATE, 0.0, at + 3, ref, None, Quality.NO_READING
                ),
                Reading("strap", Kind.HEART_RATE, 60.0, at, "p-1"),
            ]
        )
    out, fhir = tmp_path / "ada.json", tmp_path / "ada.fhir.json"
    code, _, _ = run(
        capsys, "patient", "export", ref, "--config", str(config),
        "--out", str(out), "--fhir", str(fhir),
    )  # fmt: skip
    assert code == 0
    assert out.stat().st_mode & 0o777 == 0o600
    document = json.loads(out.read_text())
    assert document["roster"]["name"] == "Ada Lovelace"
    assert len(document["readings"]) == 5  # the technical one too; not p-1's
    bundle = json.loads(fhir.read_text())
    assert bundle == document["fhir"]
    assert bundle["resourceType"] == "Bundle"
    observations = [e["resource"] for e in bundle["entry"]]
    codes = [[c["code"] for c in o["code"]["coding"]] for o in observations]
    assert codes == [["8867-4"], ["8637-1"], ["2708-6", "59408-5"], ["8310-5"]]
    units = [o["valueQuantity"]["code"] for o in observations]
    assert units == ["/min", "ms", "%", "Cel"]
    assert observations[0]["subject"]["identifier"]["value"] == ref
    assert observations[0]["effectiveDateTime"] == "2025-06-15T15:06:40Z"
    assert "category" not in observations[1]  # RR interval: not a vital sign


def test_forget_then_audit_verify_and_a_tampered_trail(
    config: Path, capsys: pytest.CaptureFixture
) -> None:
    ref = add_ada(config, capsys)
    code, out, _ = run(capsys, "patient", "forget", ref, "--config", str(config))
    assert code == 0 and "roster entry removed" in out
    code, out, _ = run(capsys, "audit", "verify", "--config", str(config))
    assert (code, out.strip()) == (0, "audit trail ok: 3 entries, 3 checkpoints")
    code, out, _ = run(capsys, "audit", "show", "--config", str(config), "--json")
    kinds = [json.loads(line)["kind"] for line in out.splitlines()]
    assert kinds == ["keys.created", "patient.added", "patient.forgotten"]

    cfg = load_config(config)
    with closing(sqlite3.connect(cfg.path(cfg.security.audit_file))) as db, db:
        db.execute("DROP TRIGGER entries_no_delete")
        db.execute("DELETE FROM entries WHERE seq = 1")
    code, _, err = run(capsys, "audit", "verify", "--config", str(config))
    assert code == ExitCode.AUDIT_TAMPERED
    assert "missing at entry 1" in err


def test_pairing_and_key_rotation_are_audited(
    config: Path, capsys: pytest.CaptureFixture
) -> None:
    ref = add_ada(config, capsys)
    pair = ["pair", "C8:4F:2A:10:77:01", "--patient", "p-1", "--config", str(config)]
    assert run(capsys, *pair)[0] == 0
    code, out, _ = run(capsys, "keys", "rotate", "--config", str(config))
    assert (code, out.strip()) == (0, "roster key rotated; 1 entries re-encrypted")
    code, out, _ = run(capsys, "audit", "show", "--config", str(config), "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in entries] == [
        "keys.created",
        "patient.added",
        "device.paired",
        "keys.rotated",
    ]
    assert entries[2]["details"]["device_id"] == "C8:4F:2A:10:77:01"
    assert ref not in out and "p-1" not in out
    assert run(capsys, "audit", "verify", "--config", str(config))[0] == 0
