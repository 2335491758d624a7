from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models import features, tflite_template, twins

MITDB = Path(__file__).resolve().parents[1] / "sensors" / "data" / "mitdb"

rr_windows = arrays(
    np.float64,
    (3, features.WINDOW_BEATS),
    elements=st.floats(1.0, 5000.0, allow_nan=False, allow_infinity=False),
)


@given(rr_windows)
def test_features_finite_for_positive_rr(rr: np.ndarray) -> None:
    x = features.features(rr)
    assert x.shape == (3, features.N_FEATURES)
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))


@given(rr_windows, st.floats(0.25, 4.0))
def test_scale_invariant_features(rr: np.ndarray, factor: float) -> None:
    a = features.features(rr)
    b = features.features(rr * factor)
    log_median = features.WINDOW_BEATS
    keep = np.arange(features.N_FEATURES) != log_median
    np.testing.assert_allclose(a[:, keep], b[:, keep], atol=1e-5)
    np.testing.assert_allclose(
        b[:, log_median] - a[:, log_median], np.log(factor), atol=1e-5
    )


def test_features_of_regular_rhythm() -> None:
    x = features.features(np.full(features.WINDOW_BEATS, 800.0))[0]
    assert np.all(x[: features.WINDOW_BEATS] == 0)
    np.testing.assert_allclose(
        x[features.WINDOW_BEATS :], [np.log(0.8), 0, 0, 0], atol=1e-7
    )


def test_features_reject_bad_rr() -> None:
    with pytest.raises(ValueError):
        features.features(np.zeros(features.WINDOW_BEATS))
    with pytest.raises(ValueError):
        features.features(np.ones(features.WINDOW_BEATS - 1))


def test_windows_and_labels_from_beats() -> None:
    beats = np.arange(20) * 360  # 1 s apart: 19 RR intervals of 1000 ms
    w = features.windows_from_beats(beats, stride=2)
    assert w.shape == (2, features.WINDOW_BEATS)
    assert np.all(w == 1000.0)
    # Beat 17 ends RR 16: inside windows starting at RR 1..16, not at RR 0.
    labels = features.labels_from_pvc(beats, [beats[17]], stride=1)
    assert labels.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert features.labels_from_pvc(beats, [beats[0]]).tolist() == [0.0] * 4


def test_record_dataset_of_record_100() -> None:
    x, y = features.record_dataset(MITDB, "100", stride=4)
    assert x.shape == (len(y), features.N_FEATURES)
    assert 0 < y.sum() <= features.WINDOW_BEATS  # one V beat in record 100


def test_twins_shapes_and_weights_roundtrip() -> None:
    mlp = twins.build("mlp", 20)
    assert [a.shape for a in twins.weights(mlp)] == [
        (16, 20),
        (16,),
        (8, 16),
        (8,),
        (1, 8),
        (1,),
    ]
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in mlp.modules())
    other = twins.build("mlp", 20)
    twins.load_weights(other, twins.weights(mlp))
    x = np.random.default_rng(1).normal(size=(4, 20)).astype(np.float32)
    np.testing.assert_array_equal(twins.logits(other, x), twins.logits(mlp, x))
    with pytest.raises(ValueError):
        twins.load_weights(other, twins.weights(twins.build("linear", 20)))
    with pytest.raises(ValueError):
        twins.build("cnn", 20)


def test_losses() -> None:
    logits = torch.tensor([2.0, -2.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0])
    assert twins.loss_fn("hinge")(logits, labels).item() == pytest.approx(1.5 / 3)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert twins.loss_fn("logistic")(logits, labels).item() == pytest.approx(
        expected.item()
    )


@pytest.mark.parametrize("arch", twins.ARCHS)
def test_template_is_small_tflite(arch: str) -> None:
    model = tflite_template.template(arch, features.N_FEATURES)
    assert model[4:8] == b"TFL3"
    assert len(model) < 8000


def test_with_weights_rejects_wrong_shapes() -> None:
    base = tflite_template.template("mlp", 20)
    good = twins.weights(twins.build("mlp", 20))
    with pytest.raises(ValueError, match="shape"):
        tflite_template.with_weights(base, [good[0].T, *good[1:]])
    with pytest.raises(ValueError, match="expected 6 arrays"):
        tflite_template.with_weights(base, good[:2])
    with pytest.raises(ValueError, match="non-finite"):
        tflite_template.with_weights(base, [np.full_like(good[0], np.nan), *good[1:]])
    assert tflite_template.with_weights(base, good) != base
