"""`iomt-gateway train`: a DP-SGD round from the store's windows to the model swap."""

import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.learning import dataset, privacy
from gateway.learning.privacy import PrivacyAccount
from gateway.litert import CURRENT, PREVIOUS, Scorer
from models import INITIAL_PATH, features

MITDB = Path(__file__).resolve().parents[1] / "sensors" / "data" / "mitdb"
START = 1_700_000_000.0

pytestmark = pytest.mark.slow


def _gateway(tmp_path: Path, records: dict[str, str], **learning) -> Path:
    settings = {
        "epochs": 1,
        "batch_size": 512,
        "min_windows": 100,
        "round_epsilon": 1.0,
    } | learning
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    patients = "\n".join(f'[[patients]]\nref = "{ref}"\n' for ref in records)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "state"}"\n\n'
        f"[learning]\n{lines}\n\n{patients}"
    )
    cfg = load_config(config)
    cfg.gateway.data_dir.mkdir()
    for ref, record in records.items():
        dataset.import_annotated_record(
            cfg.path(cfg.store.file),
            ref,
            f"strap-{ref}",
            MITDB / f"{record}_all.csv",
            MITDB / f"{record}_pvc.csv",
            START,
        )
    return config


def _train(config: Path, capsys) -> tuple[int, dict]:
    code = main(["train", "--config", str(config), "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {"stderr": err})


def test_rounds_spend_what_the_account_composes_and_swap_the_model(tmp_path, capsys):
    config = _gateway(tmp_path, {"p-a": "105", "p-b": "116"})
    cfg = load_config(config)
    code, first = _train(config, capsys)
    assert code == 0
    n_windows = sum(len(features.record_dataset(MITDB, r)[1]) for r in ("105", "116"))
    assert first["windows"] == n_windows
    assert first["patients"] == 2
    assert first["epsilon_before"] == 0.0
    # Noise is calibrated so that the round ends at (just under) round_epsilon.
    assert 0.95 <= first["epsilon_after"] <= 1.0
    models = cfg.path(cfg.learning.models_dir)
    assert Path(first["model"]) == models / CURRENT
    assert (models / CURRENT).read_bytes() != INITIAL_PATH.read_bytes()
    assert (models / PREVIOUS).read_bytes() == INITIAL_PATH.read_bytes()
    assert main(["audit", "show", "--config", str(config), "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rounds = [e for e in entries if e["kind"] == "training.round"]
    assert rounds[-1]["details"]["epsilon_total"] == first["epsilon_after"]

    code, second = _train(config, capsys)
    assert code == 0
    assert second["epsilon_before"] == pytest.approx(first["epsilon_after"])
    assert 1.95 <= second["epsilon_after"] <= 2.0
    assert (models / PREVIOUS).exists()
    # The account's epsilon is the composition of both rounds' mechanisms.
    account = PrivacyAccount(
        cfg.path(cfg.learning.privacy_file), epsilon_max=8.0, delta=1e-5
    )
    rounds = account.history()
    recomputed = privacy.epsilon(
        [(r.noise_multiplier, r.sample_rate, r.steps) for r in rounds], 1e-5
    )
    account.close()
    assert [r.status for r in rounds] == ["spent", "spent"]
    assert recomputed == pytest.approx(second["epsilon_after"], abs=1e-9)
    # The swapped-in model still ranks ectopic windows above regular ones.
    x, y = features.record_dataset(MITDB, "116")
    scores = Scorer(models / CURRENT).score(x)
    assert scores[y == 1].mean() > scores[y == 0].mean() + 0.3


def test_too_few_windows_spends_nothing(tmp_path, capsys):
    config = _gateway(tmp_path, {"p-a": "100"}, min_windows=10_000)
    code, out = _train(config, capsys)
    assert code == 62
    assert "needs 10000" in out["stderr"]
    cfg = load_config(config)
    assert not cfg.path(cfg.learning.privacy_file).exists() or (
        PrivacyAccount(
            cfg.path(cfg.learning.privacy_file), epsilon_max=8, delta=1e-5
        ).spent()
        == 0.0
    )


def test_a_round_over_the_cap_never_starts(tmp_path, capsys):
    config = _gateway(tmp_path, {"p-a": "100"}, epsilon_max=2.5, round_epsilon=1.0)
    assert _train(config, capsys)[0] == 0
    code, second = _train(config, capsys)
    assert code == 0 and second["epsilon_after"] <= 2.0
    code, third = _train(config, capsys)
    assert code == 61
    assert "left" in third["stderr"]
    cfg = load_config(config)
    account = PrivacyAccount(
        cfg.path(cfg.learning.privacy_file), epsilon_max=2.5, delta=1e-5
    )
    assert len(account.history()) == 2
    account.close()


def test_only_patients_consenting_in_the_vault_train(tmp_path, capsys):
    from gateway import vault
    from gateway.keys import init_keys

    config = _gateway(tmp_path, {})
    cfg = load_config(config)
    init_keys(cfg.path(cfg.security.key_dir))
    ada = vault.add_patient(cfg, "MRN-1", "Ada Lovelace").ref
    bob = vault.add_patient(cfg, "MRN-2", "Bob Example").ref
    for ref, record in ((ada, "105"), (bob, "116")):
        dataset.import_annotated_record(
            cfg.path(cfg.store.file),
            ref,
            f"strap-{record}",
            MITDB / f"{record}_all.csv",
            MITDB / f"{record}_pvc.csv",
            START,
        )
    vault.set_consent(cfg, ada, training=False)
    code, out = _train(config, capsys)
    assert code == 0
    assert out["patients"] == 1
    assert out["windows"] == len(features.record_dataset(MITDB, "116")[1])
    assert "Ada" not in json.dumps(out) and ada not in json.dumps(out)


def test_agent_and_training_parent_never_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, gateway.agent, gateway.learning.train, gateway.cli, "
        "gateway.federation.local; "
        "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
