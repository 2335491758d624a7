from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from gateway.litert import ModelError, Scorer, install_model, rollback
from models import features, tflite_template, twins

MITDB = Path(__file__).resolve().parents[1] / "sensors" / "data" / "mitdb"


def _windows(record: str) -> np.ndarray:
    return features.record_dataset(MITDB, record, stride=7)[0]


def _write(tmp_path: Path, data: bytes, name: str = "m.tflite") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _trained(arch: str, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(3)
    model = twins.build(arch, features.N_FEATURES)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        twins.loss_fn("logistic")(
            model(torch.as_tensor(x)).reshape(-1), torch.as_tensor(y)
        ).backward()
        opt.step()
    return model


@pytest.mark.parametrize("arch", twins.ARCHS)
@pytest.mark.parametrize("trained", [False, True])
def test_tflite_matches_torch_twin(tmp_path: Path, arch: str, trained: bool) -> None:
    x100, y100 = features.record_dataset(MITDB, "100", stride=3)
    model = (
        _trained(arch, x100, y100)
        if trained
        else twins.build(arch, features.N_FEATURES)
    )
    path = _write(tmp_path, tflite_template.with_weights(arch, twins.weights(model)))
    scorer = Scorer(path)
    records = ["100", "105"]
    for record in records:
        x = _windows(record)
        got = scorer.score(x)
        assert got.shape == (len(x),)
        np.testing.assert_allclose(got, twins.scores(model, x), atol=1e-5)
    # One window at a time resizes back to batch 1 and gives the same scores.
    np.testing.assert_allclose(scorer.score(x[:1]), got[:1], atol=1e-7)


def test_template_scores_half(tmp_path: Path) -> None:
    scorer = Scorer(
        _write(tmp_path, tflite_template.template("mlp", features.N_FEATURES))
    )
    np.testing.assert_array_equal(
        scorer.score(_windows("100")[:5]), np.full(5, 0.5, np.float32)
    )
    assert scorer.score(np.empty((0, features.N_FEATURES))).shape == (0,)
    with pytest.raises(ModelError, match="expects 20 features"):
        scorer.score(np.zeros((1, 3)))


def test_shipped_initial_model_matches_fresh_build(tmp_path: Path) -> None:
    x = _windows("123")
    shipped = Scorer(models.INITIAL_PATH).score(x)
    fresh = Scorer(_write(tmp_path, models.build_initial(MITDB))).score(x)
    np.testing.assert_allclose(shipped, fresh, atol=1e-6)


def test_shipped_initial_model_flags_ectopy() -> None:
    x, y = features.record_dataset(MITDB, "123")
    scores = Scorer(models.INITIAL_PATH).score(x)
    assert scores[y == 1].mean() > 0.5 > scores[y == 0].mean()


def _model(seed: int) -> tuple[bytes, torch.nn.Module]:
    torch.manual_seed(seed)
    model = twins.build("linear", features.N_FEATURES)
    return tflite_template.with_weights("linear", twins.weights(model)), model


def test_install_model_swaps_and_keeps_previous(tmp_path: Path) -> None:
    known = _windows("100")[0]
    first, _ = _model(1)
    second, twin = _model(2)
    install_model(first, tmp_path, known_window=known)
    expected = float(twins.scores(twin, known[None])[0])
    current = install_model(
        second, tmp_path, known_window=known, expected_score=expected
    )
    assert current.read_bytes() == second
    assert (tmp_path / "previous.tflite").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "current.tflite",
        "previous.tflite",
    ]
    assert Scorer(current).score(known[None])[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("bad", [b"not a model", b""])
def test_corrupt_model_refused_and_current_kept(tmp_path: Path, bad: bytes) -> None:
    known = _windows("100")[0]
    good, _ = _model(1)
    install_model(good, tmp_path, known_window=known)
    with pytest.raises(ModelError):
        install_model(bad, tmp_path, known_window=known)
    assert (tmp_path / "current.tflite").read_bytes() == good
    assert os.listdir(tmp_path) == ["current.tflite"]


def test_unexpected_score_refused(tmp_path: Path) -> None:
    known = _windows("100")[0]
    good, _ = _model(1)
    with pytest.raises(ModelError, match="not expected"):
        install_model(good, tmp_path, known_window=known, expected_score=2.0)
    assert os.listdir(tmp_path) == []


def test_rollback_restores_previous(tmp_path: Path) -> None:
    known = _windows("100")[0]
    first, _ = _model(1)
    second, _ = _model(2)
    with pytest.raises(ModelError, match="no previous"):
        rollback(tmp_path)
    install_model(first, tmp_path, known_window=known)
    install_model(second, tmp_path, known_window=known)
    assert rollback(tmp_path).read_bytes() == first
    assert not (tmp_path / "previous.tflite").exists()
