"""`iomt-gateway pair`: the roster entry is appended, validated, and comments kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ExitCode

BASE = """# ward 3 gateway: the operator's comment stays
[[patients]]
ref = "p-1"
label = "Bed 1"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(BASE)
    return path


def test_pair_appends_a_valid_entry(
    config: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["pair", "C8:4F:2A:10:77:01", "--patient", "p-1", "--config", str(config)]
    assert main([*args, "--profiles", "heart_rate, pulse_oximeter"]) == 0
    assert "added to the roster" in capsys.readouterr().out
    assert config.read_text().startswith(BASE)
    (device,) = load_config(config).devices
    assert (device.address, device.patient) == ("C8:4F:2A:10:77:01", "p-1")
    assert device.profiles == ["heart_rate", "pulse_oximeter"]


def test_pair_refuses_unknown_patient_duplicates_and_bad_input(
    config: Path, capsys: pytest.CaptureFixture
) -> None:
    def pair(address: str, patient: str, *extra: str) -> int:
        return main(
            ["pair", address, "--patient", patient, "--config", str(config), *extra]
        )

    assert pair("C8:4F:2A:10:77:01", "p-9") == ExitCode.CONFIG_INVALID
    assert "'p-9' is not in [[patients]]" in capsys.readouterr().err
    assert pair("C8:4F:2A:10:77:01", "p-1") == 0
    assert pair("c8:4f:2a:10:77:01", "p-1") == ExitCode.CONFIG_INVALID
    assert "already in [[devices]]" in capsys.readouterr().err
    assert pair("not-an-address", "p-1") == ExitCode.CONFIG_INVALID
    assert pair("C8:4F:2A:10:77:02", "p-1", "--profiles", "toaster") == (
        ExitCode.CONFIG_INVALID
    )
    assert len(load_config(config).devices) == 1
    assert list(config.parent.glob(".gateway.toml.*")) == []
