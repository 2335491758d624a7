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


def test_cross_references_name_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[patients]]\nref = "p-1"\n[[patients]]\nref = "p-1"\n'
        '[[devices]]\naddress = "AA:BB:CC:DD:EE:FF"\npatient = "p-x"\n'
        '[[devices]]\naddress = "aa:bb:cc:dd:ee:ff"\npatient = "p-1"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "patients.1.ref: got 'p-1'; expected: a ref not used before",
        "devices.0.patient: got 'p-x'; expected: a ref listed in [[patients]]",
        "devices.1: got 'aa:bb:cc:dd:ee:ff' again; expected: each wearable once "
        "(one patient per device)",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[gateway]\ntimezone = "Mars/Olympus"\n',
            "gateway.timezone: got 'Mars/Olympus'; expected: an IANA time zone",
        ),
        (
            "[rooms]\nno_motion_after_s = inf\n",
            "rooms.no_motion_after_s: got inf; expected: Input should be a finite",
        ),
        (
            "[rooms]\ntemperature_low = 30\ntemperature_high = 20\n",
            "rooms.temperature_high: got 20; expected: above temperature_low (30)",
        ),
    ],
)
def test_values_that_only_look_valid(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    (found,) = info.value.problems
    assert found.startswith(problem)


def test_unreadable_and_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnreadableError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigUnreadableError, match="not valid TOML"):
        load_config(write(tmp_path, "[gateway\n"))
    with pytest.raises(ConfigUnreadableError, match="cannot read"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[gateway]\nid = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigUnreadableError, match="not UTF-8"):
        load_config(latin1)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-config", str(ROOT / "config" / "demo.toml")]) == 0
    assert "ok (3 patients" in capsys.readouterr().out
    bad = write(tmp_path, "[store]\nbatch_size = 0\n")
    assert main(["check-config", str(bad)]) == ExitCode.CONFIG_INVALID
    assert "store.batch_size: got 0" in capsys.readouterr().err
