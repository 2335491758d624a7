"""Configuration: shipped files validate; errors name key, value, expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.alarms import Priority
from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ConfigError, ConfigUnreadableError, ExitCode

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["gateway.example.toml", "demo.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(ROOT / "config" / name)
    assert cfg.patients


def test_patient_overrides_apply_on_top_of_defaults() -> None:
    cfg = load_config(ROOT / "config" / "gateway.example.toml")
    defaults, patients = cfg.patient_rules()
    assert defaults.persistence_s == 60
    assert patients["p-3f9c2a"].persistence_s == 30
    assert patients["p-3f9c2a"].stale_priority is Priority.MEDIUM
    assert cfg.labels() == {"p-3f9c2a": "Bed 4"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


def test_every_problem_is_reported_with_key_value_and_expectation(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        '[mqtt]\nport = 70000\nhots = "x"\n[rules]\nmin_score = 4\n'
        '[alerts]\ntargets = ["phone"]\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 4
    assert problems[0].startswith("mqtt.port: got 70000; expected: ")
    assert "65535" in problems[0]
    assert (
        problems[1] == "mqtt.hots: unknown key (a typo?); remove it or check the README"
    )
    assert problems[2].startswith("rules.min_score: got 4; expected:")
    assert problems[3].startswith("alerts.targets: got ['phone']; expected: \"mqtt\"")


def test_device_needs_an_address_or_a_name_pattern(tmp_path: Path) -> None:
    base = '[[patients]]\nref = "p-x"\n[[devices]]\npatient = "p-x"\n'
    with pytest.raises(ConfigError, match="exactly one of address and name_pattern"):
        load_config(write(tmp_path, base))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, base + 'address = "AA:BB"\n'))
    assert info.value.problems == [
        "devices.0.address: got 'AA:BB'; expected: a BLE address such as "
        "C8:4F:2A:10:77:01"
    ]
    cfg = load_config(write(tmp_path, base + 'name_pattern = "Polar H10 *"\n'))
    assert cfg.devices[0].id == "Polar H10 *"
    assert cfg.devices[0].profiles == ["heart_rate", "battery"]


def test_reference_to_an_unknown_patient(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[[devices]]\naddress = "AA:BB:CC:DD:EE:FF"\npatient = "p-x"\n'
    )
    with pytest.raises(ConfigError, match="patient 'p-x' listed in"):
        load_config(path)


def test_unreadable_and_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnreadableError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigUnreadableError, match="not valid TOML"):
        load_config(write(tmp_path, "[gateway\n"))


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-config", str(ROOT / "config" / "demo.toml")]) == 0
    assert "ok (3 patients" in capsys.readouterr().out
    bad = write(tmp_path, "[store]\nbatch_size = 0\n")
    assert main(["check-config", str(bad)]) == ExitCode.CONFIG_INVALID
    assert "store.batch_size: got 0" in capsys.readouterr().err
