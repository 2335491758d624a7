"""DP-SGD rounds with opacus on tiny SYNTHETIC data, and the training child."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gateway.learning import dpsgd, privacy
from gateway.learning.job import run_training
from gateway.learning.privacy import BudgetExceeded, PrivacyAccount

DELTA = 1e-5


def synthetic(n: int = 120, n_features: int = 4, seed: int = 0):
    """Synthetic features (not patient data): label = sign of the first feature."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.float32)


@pytest.fixture
def account(tmp_path):
    acc = PrivacyAccount(tmp_path / "privacy.db", epsilon_max=20.0, delta=DELTA)
    yield acc
    acc.close()


def flat_norms(model: nn.Module) -> torch.Tensor:
    grads = [p.grad_sample.flatten(1) for p in model.parameters()]
    return torch.cat(grads, dim=1).norm(dim=1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 100.0),
    clip=st.floats(0.01, 5.0),
)
def test_per_sample_clipping_bounds_every_sample(seed, scale, clip):
    X, y = synthetic(32, seed=seed)
    model = torch.nn.Linear(4, 1)
    parts = dpsgd.make_private(
        nn.Sequential(model),
        X * scale,
        y,
        batch_size=8,
        lr=0.1,
        noise_multiplier=1.0,
        max_grad_norm=clip,
    )
    xb, yb = torch.as_tensor(X * scale), torch.as_tensor(y)
    loss = nn.BCEWithLogitsLoss()(parts.model(xb).squeeze(-1), yb)
    loss.backward()
    norms = flat_norms(parts.model)
    parts.optimizer.clip_and_accumulate()

    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert torch.all(norms * factors <= clip * (1 + 1e-5))
    # opacus' summed gradient is exactly the sum of our clipped per-sample ones.
    for p in parts.model.parameters():
        clipped = torch.einsum("i,i...->...", factors, p.grad_sample)
        assert torch.allclose(p.summed_grad, clipped, atol=1e-5)


def test_round_epsilon_equals_opacus_accountant(account):
    X, y = synthetic()
    result = dpsgd.train_round(
        X,
        y,
        arch="mlp",
        epochs=2,
        batch_size=12,
        lr=0.5,
        noise_multiplier=1.2,
        max_grad_norm=1.0,
        account=account,
    )
    metrics = result.metrics
    assert metrics["steps"] == 20
    assert metrics["sample_rate"] == 0.1
    assert account.history()[0].mechanism == (1.2, 0.1, 20)
    assert account.spent() == pytest.approx(metrics["epsilon_round_opacus"], rel=1e-6)
    assert {k: v.shape for k, v in result.weights.items()} == {
        "0.weight": (16, 4),
        "0.bias": (16,),
        "2.weight": (8, 16),
        "2.bias": (8,),
        "4.weight": (1, 8),
        "4.bias": (1,),
    }


def test_opacus_counted_every_step_with_our_sampling_rate(account):
    X, y = synthetic(100)
    engines = []
    real = dpsgd.make_private

    def keep(*args, **kwargs):
        engines.append(real(*args, **kwargs))
        return engines[-1]

    dpsgd.make_private, saved = keep, dpsgd.make_private
    try:
        dpsgd.train_round(
            X, y, epochs=3, batch_size=10, lr=0.1, noise_multiplier=1.0, account=account
        )
    finally:
        dpsgd.make_private = saved
    assert engines[0].engine.accountant.history == [(1.0, 0.1, 30)]


def test_batchnorm_model_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    with pytest.raises(dpsgd.UnsupportedModelError, match="BatchNorm") as refused:
        dpsgd.validate_model(model)
    assert "GroupNorm" in str(refused.value)


def test_inplace_activation_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
    with pytest.raises(dpsgd.UnsupportedModelError, match="in-place ReLU"):
        dpsgd.validate_model(model)


def test_evaluating_between_epochs_does_not_break_training(account):
    X, y = synthetic(200)
    seen = []
    result = dpsgd.train_round(
        X,
        y,
        epochs=4,
        batch_size=20,
        lr=1.0,
        noise_multiplier=0.8,
        account=account,
        progress=lambda *a: seen.append(a),
    )
    assert [epoch for epoch, _, _ in seen] == [1, 2, 3, 4]
    epsilons = [eps for _, _, eps in seen]
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] == pytest.approx(account.spent())
    # Separable synthetic data: the evaluated loss falls below chance (ln 2).
    assert seen[-1][1] < 0.6
    assert result.metrics["epsilon"] == pytest.approx(account.spent())


def test_sampler_is_poisson_batch_sizes_vary():
    X, y = synthetic(200)
    parts = dpsgd.make_private(
        nn.Sequential(nn.Linear(4, 1)),
        X,
        y,
        batch_size=20,
        lr=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    sizes = [len(yb) for _ in range(5) for _, yb in parts.loader]
    assert len(sizes) == 50
    assert len(set(sizes)) > 3
    assert 15 < np.mean(sizes) < 25


def test_round_crossing_the_cap_does_not_start(tmp_path):
    account = PrivacyAccount(tmp_path / "p.db", epsilon_max=1.0, delta=DELTA)
    X, y = synthetic()
    progress = []
    with pytest.raises(BudgetExceeded, match=r"1\.0000 of epsilon 1 left"):
        dpsgd.train_round(
            X,
            y,
            epochs=5,
            batch_size=12,
            lr=0.1,
            noise_multiplier=0.5,
            account=account,
            progress=lambda *a: progress.append(a),
        )
    assert progress == []
    assert account.history() == []


def test_target_epsilon_picks_noise_that_fits(account):
    X, y = synthetic()
    result = dpsgd.train_round(
        X, y, epochs=2, batch_size=12, lr=0.1, target_epsilon=3.0, account=account
    )
    assert 2.9 < account.spent() <= 3.0
    assert result.metrics["noise_multiplier"] > 0


def test_account_survives_restart_between_rounds(tmp_path):
    path = tmp_path / "p.db"
    X, y = synthetic()
    for _ in range(2):
        acc = PrivacyAccount(path, epsilon_max=20.0, delta=DELTA)
        dpsgd.train_round(
            X, y, epochs=1, batch_size=12, lr=0.1, noise_multiplier=1.0, account=acc
        )
        acc.close()
    acc = PrivacyAccount(path, epsilon_max=20.0, delta=DELTA)
    assert acc.spent() == pytest.approx(privacy.epsilon([(1.0, 0.1, 10)] * 2, DELTA))


def test_baseline_spends_nothing(account):
    X, y = synthetic()
    result = dpsgd.train_round(
        X, y, epochs=2, batch_size=12, lr=0.5, noise_multiplier=0
    )
    assert result.metrics["epsilon"] == 0.0
    assert account.history() == []


def job_config(tmp_path, **overrides: object) -> dict[str, object]:
    """A training job on synthetic data written to `tmp_path`."""
    X, y = synthetic()
    np.savez(tmp_path / "data.npz", X=X, y=y)
    return {
        "data": str(tmp_path / "data.npz"),
        "out": str(tmp_path / "w.npz"),
        "account": str(tmp_path / "p.db"),
        "delta": DELTA,
        "batch_size": 12,
        "lr": 0.5,
        "noise_multiplier": 1.0,
        **overrides,
    }


def test_job_trains_in_a_child_without_torch_in_the_parent(tmp_path):
    config = job_config(tmp_path, epsilon_max=20.0, arch="linear", epochs=2)
    # A fresh interpreter: this test module itself imports torch.
    code = (
        "import json, sys\n"
        "from gateway.learning.job import run_training\n"
        "seen = []\n"
        f"result = run_training(json.loads({json.dumps(config)!r}),"
        " on_progress=seen.append)\n"
        "print(json.dumps([result, len(seen), 'torch' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result, n_progress, torch_loaded = json.loads(out.stdout)
    assert torch_loaded is False
    assert n_progress == 2
    with np.load(result["weights"]) as weights:
        assert weights["0.weight"].shape == (1, 4)
    assert result["metrics"]["steps"] == 20


def test_job_reports_budget_exceeded_in_the_parent(tmp_path):
    config = job_config(tmp_path, epsilon_max=0.5, epochs=5, noise_multiplier=0.5)
    with pytest.raises(BudgetExceeded) as refused:
        run_training(config)
    assert refused.value.left == 0.5
