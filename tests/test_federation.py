"""Federated learning over real Flower processes on loopback, and its parts.

The slow tests start a SuperLink and SuperNodes (`gateway.federation.loopback`),
each gateway with its own data directory and a store holding a different MIT-BIH
record, and check the results against figures recomputed here, independently of
the aggregation code: the mean of the updates the gateways kept, weighted by
their examples, and each gateway's epsilon composed from its rounds.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.audit import AuditLog
from gateway.cli import main
from gateway.config import load_config
from gateway.federation import model, update
from gateway.federation.ledger import FederationLog
from gateway.federation.loopback import LoopbackFleet, record_gateway, write_node_keys
from gateway.learning import privacy
from gateway.learning.privacy import PrivacyAccount
from gateway.litert import Scorer

RECORDS = {"gw1": "105", "gw2": "108", "gw3": "116"}
EPOCHS, BATCH = 2, 64
SIGMA = 1.1


def run_config(out: Path, **extra: object) -> dict[str, object]:
    return {
        "num-server-rounds": 3,
        "min-nodes": 3,
        "min-replies": 3,
        "round-timeout": 120.0,
        "node-wait": 60.0,
        "epochs": EPOCHS,
        "batch-size": BATCH,
        "lr": 0.5,
        "seed": 7,
        "output-dir": str(out),
        **extra,
    }


def manifest(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["versions"]


def ledger_rows(config: Path) -> list:
    cfg = load_config(config)
    with FederationLog(cfg.path(cfg.federation.log_file)) as ledger:
        return ledger.rounds()


def examples_in(config: Path, server_round: int) -> int:
    return next(
        r.examples for r in ledger_rows(config) if r.server_round == server_round
    )


def account_of(config: Path) -> PrivacyAccount:
    cfg = load_config(config)
    return PrivacyAccount(
        cfg.path(cfg.learning.privacy_file),
        epsilon_max=cfg.learning.epsilon_max,
        delta=cfg.learning.delta,
    )


def kept_update(config: Path, run_id: str, server_round: int) -> dict:
    """The update a gateway sent, dequantised here, not with the app's code."""
    path = config.parent / "federation" / "sent" / f"{run_id}-{server_round}.npz"
    with np.load(path) as kept:
        arrays = {k.replace("|", "/"): kept[k] for k in kept.files}
    out = {}
    for name, values in arrays.items():
        if name.endswith("/scale"):
            continue
        scale = arrays.get(name + "/scale")
        out[name] = values.astype(np.float64) * (1.0 if scale is None else scale)
    return out


def wait_for_run(proc, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except Exception:
        proc.kill()
        raise


def expected_epsilon(examples: list[int], delta: float) -> float:
    """Compose the rounds from (sigma, q, steps) recomputed from the round sizes."""
    mechanisms = []
    for n in examples:
        per_epoch = math.ceil(n / BATCH)
        mechanisms.append((SIGMA, 1.0 / per_epoch, EPOCHS * per_epoch))
    return privacy.epsilon(mechanisms, delta)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_gateways_three_rounds_over_tls_with_registered_nodes(
    tmp_path: Path,
) -> None:
    configs = {
        name: record_gateway(tmp_path, name, record, quantise_8bit=(name == "gw3"))
        for name, record in RECORDS.items()
    }
    rogue = record_gateway(tmp_path, "rogue", "121")
    out = tmp_path / "models"
    with LoopbackFleet(tmp_path / "fleet", secure=True) as fleet:
        for name, config in configs.items():
            private, public = write_node_keys(fleet.root, name)
            fleet.register(public)
            fleet.add_node(name, config, private)
        rogue_key, _ = write_node_keys(fleet.root, "rogue")
        fleet.add_node("rogue", rogue, rogue_key)
        run = fleet.run(run_config(out))
        wait_for_run(run, 480)
        superlink_log = fleet.log_text("superlink")

    versions = [v for v in manifest(out) if not v.get("skipped")]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert all(len(v["nodes"]) == 3 for v in versions)
    run_id = versions[0]["run_id"]

    # Each global model is the previous one plus the example-weighted mean of
    # the updates the three gateways sent (as kept by them, dequantised here).
    previous = {
        k: v.astype(np.float64) for k, v in model.initial("linear", 20, 7).items()
    }
    for v in versions:
        sent = {name: kept_update(c, run_id, v["round"]) for name, c in configs.items()}
        weights = {
            name: next(
                r.examples for r in ledger_rows(c) if r.server_round == v["round"]
            )
            for name, c in configs.items()
        }
        total = sum(weights.values())
        with np.load(out / v["npz"]) as saved:
            for key in previous:
                mean = sum(weights[n] * sent[n][key] for n in configs) / total
                assert np.allclose(saved[key], previous[key] + mean, atol=1e-5)
                previous[key] = saved[key].astype(np.float64)

    for config in configs.values():
        rows = ledger_rows(config)
        assert [(r.server_round, r.outcome) for r in rows] == [
            (1, "sent"), (2, "sent"), (3, "sent")
        ]  # fmt: skip
        account = account_of(config)
        try:
            assert [r.status for r in account.history()] == ["spent"] * 3
            want = expected_epsilon([r.examples for r in rows], account.delta)
            assert account.spent() == pytest.approx(want, rel=1e-9)
            assert rows[-1].epsilon_after == pytest.approx(want, rel=1e-9)
        finally:
            account.close()
        # Every update that left is in the gateway's audit trail by its hash,
        # with the training round behind it, and the trail verifies.
        with AuditLog.for_config(load_config(config)) as trail:
            entries = trail.entries()
            assert trail.verify().ok
        sent_entries = [e for e in entries if e.kind == "update.sent"]
        assert [json.loads(e.details)["sha256"] for e in sent_entries] == [
            r.update_sha256 for r in rows
        ]
        assert len([e for e in entries if e.kind == "training.round"]) == 3
        # The final global model is installed on every gateway, byte for byte.
        installed = config.parent / "models" / "current.tflite"
        assert installed.read_bytes() == (out / versions[-1]["tflite"]).read_bytes()
        assert Scorer(installed).n_features == 20

    # The 8-bit gateway sent a quarter of the bytes of the others.
    bytes_sent = {n: ledger_rows(c)[0].bytes_sent for n, c in configs.items()}
    assert bytes_sent["gw1"] == bytes_sent["gw2"] == 21 * 4
    assert bytes_sent["gw3"] == 21 * 1 + 2 * 4

    # The node whose key was never registered took no part: the SuperLink
    # refused to activate it.
    assert ledger_rows(rogue) == []
    assert "No SuperNode found with the given public key" in superlink_log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_killed_mid_round_leaves_the_round_to_the_others(
    tmp_path: Path,
) -> None:
    configs = {
        name: record_gateway(tmp_path, name, record) for name, record in RECORDS.items()
    }
    out = tmp_path / "models"
    settings = run_config(
        out, **{"min-replies": 2, "round-timeout": 150.0, "node-wait": 5.0}
    )
    settings["epochs"] = 6  # a longer round, to kill the node inside it
    with LoopbackFleet(tmp_path / "fleet") as fleet:
        for name, config in configs.items():
            fleet.add_node(name, config)
        run = fleet.run(settings)
        privacy_db = configs["gw3"].parent / "privacy.db"
        _wait_reserved(privacy_db, round_id=2, timeout=200)
        fleet.kill_node("gw3")
        wait_for_run(run, 480)

    versions = [v for v in manifest(out) if not v.get("skipped")]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [len(v["nodes"]) for v in versions] == [3, 2, 2]

    # The killed gateway sent round 1 only. Its account holds round 1 as spent and
    # round 2 as reserved with all its planned steps: the process died before it
    # could record how many ran, so the account counts an upper bound of what ran
    # in round 2, and nothing of round 3, which it never started.
    rows = ledger_rows(configs["gw3"])
    assert [(r.server_round, r.outcome) for r in rows] == [(1, "sent")]
    account = account_of(configs["gw3"])
    try:
        history = account.history()
        assert [r.status for r in history] == ["spent", "reserved"]
        per_epoch = math.ceil(rows[0].examples / BATCH)
        assert history[1].steps == 6 * per_epoch
        want = privacy.epsilon([r.mechanism for r in history], account.delta)
        assert account.spent() == pytest.approx(want)
    finally:
        account.close()
    for name in ("gw1", "gw2"):
        assert [r.server_round for r in ledger_rows(configs[name])] == [1, 2, 3]


def _wait_reserved(path: Path, round_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with sqlite3.connect(path) as db:
                    row = db.execute(
                        "SELECT status FROM rounds WHERE id = ?", (round_id,)
                    ).fetchone()
            except sqlite3.OperationalError:  # the account is being created
                row = None
            if row is not None and row[0] == "reserved":
                return
        time.sleep(0.02)
    raise TimeoutError(f"round {round_id} never started training")


# Fast tests of the parts: no processes.

finite = st.floats(-100, 100, allow_nan=False, width=32)


@given(hnp.arrays(np.float32, st.integers(1, 30), elements=finite))
def test_clip_bounds_the_norm_and_keeps_small_updates(values: np.ndarray) -> None:
    clipped, norm = update.clip({"w": values}, 1.0)
    assert update.l2_norm(clipped) <= 1.0 + 1e-5
    if norm <= 1.0:
        assert np.array_equal(clipped["w"], values)


@given(hnp.arrays(np.float32, st.integers(1, 30), elements=finite))
def test_quantised_values_are_within_half_a_step(values: np.ndarray) -> None:
    encoded = update.quantise({"w": values})
    assert encoded["w"].dtype == np.int8
    step = float(encoded["w/scale"])
    assert np.all(np.abs(update.decode(encoded)["w"] - values) <= step / 2 + 1e-6)


def test_noise_is_fresh_and_of_the_asked_scale() -> None:
    zero = {"w": np.zeros(20_000, np.float32)}
    a = update.prepare(zero, bound=1.0, noise=0.5, quantise_8bit=False)
    b = update.prepare(zero, bound=1.0, noise=0.5, quantise_8bit=False)
    assert not np.array_equal(a["w"], b["w"])
    assert float(np.std(a["w"])) == pytest.approx(0.5, rel=0.05)


def test_apply_is_the_example_weighted_mean() -> None:
    base = {"w": np.array([1.0, 1.0], np.float32)}
    deltas = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 4.0])}]
    out = update.apply(base, deltas, [3.0, 1.0])
    assert out["w"].tolist() == [1.75, 2.0]
    with pytest.raises(ValueError):
        update.apply(base, [], [])


def test_the_digest_covers_dtype_and_values() -> None:
    a = {"w": np.array([1, 2], np.int8)}
    assert update.digest(a) == update.digest({"w": np.array([1, 2], np.int8)})
    assert update.digest(a) != update.digest({"w": np.array([1, 2], np.int16)})
    assert update.digest(a) != update.digest({"w": np.array([1, 3], np.int8)})


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_a_global_model_scores_in_tflite_as_in_numpy(arch: str, tmp_path: Path) -> None:
    weights = model.initial(arch, 20, seed=3)
    path = tmp_path / "m.tflite"
    path.write_bytes(model.to_tflite(arch, weights))
    x = np.random.default_rng(0).normal(size=(5, 20)).astype(np.float32)
    assert np.allclose(Scorer(path).score(x), model.scores(weights, x), atol=1e-6)


def test_federation_status_shows_rounds_version_and_epsilon(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n')
    account = PrivacyAccount(tmp_path / "privacy.db", epsilon_max=8.0, delta=1e-5)
    account.finish(account.reserve(1.1, 0.02, 100), 100)
    spent = account.spent()
    account.close()
    with FederationLog(tmp_path / "federation.db") as ledger:
        ledger.record(
            run_id="42",
            server_round=1,
            outcome="sent",
            bytes_sent=84,
            update_sha256="ab" * 32,
            examples=500,
            epsilon_after=spent,
            model_version=0,
        )
        ledger.set_installed(1)

    assert main(["federation", "status", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_version"] == 1
    assert shown["epsilon_spent"] == pytest.approx(spent)
    assert [(r["server_round"], r["bytes_sent"]) for r in shown["rounds"]] == [(1, 84)]
    assert main(["federation", "status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "model version 1" in text and f"epsilon spent {spent:.3f}" in text
