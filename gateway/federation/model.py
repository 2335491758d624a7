"""Global model weights as named numpy arrays: order, score, initialise, export.

The names are those of the torch twin's state_dict ("0.weight", "0.bias",
"2.weight", ...), so a global model loads into `gateway.learning.dpsgd` as its
initial weights. Pure numpy plus the TFLite template writer: neither the
ServerApp nor the ClientApp needs torch for this, but `models.tflite_template`
imports the torch twins for their layer shapes: it is imported only where a
.tflite file is written, so a ClientApp that only trains never loads torch itself.
"""

from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]


def ordered(weights: Weights) -> list[np.ndarray]:
    """[W0, b0, W1, b1, ...] as `models.twins.weights` orders them."""

    def key(name: str) -> tuple[int, int]:
        layer, kind = name.split(".")
        return int(layer), 0 if kind == "weight" else 1

    return [np.asarray(weights[n], dtype=np.float32) for n in sorted(weights, key=key)]


def initial(arch: str, n_features: int, seed: int) -> Weights:
    """Starting weights: uniform in +-1/sqrt(fan_in), as torch's Linear default.

    Seeded, so every run of the aggregator with the same seed starts alike.

    Raises:
        ValueError: If `arch` is unknown or n_features is not positive.
    """
    from models import twins

    rng = np.random.default_rng(seed)
    weights: Weights = {}
    for i, (out, inp) in enumerate(twins.layer_shapes(arch, n_features)):
        bound = 1.0 / np.sqrt(inp)
        index = 2 * i  # a ReLU sits between two Linear layers in the twin
        weights[f"{index}.weight"] = rng.uniform(-bound, bound, (out, inp)).astype(
            np.float32
        )
        weights[f"{index}.bias"] = rng.uniform(-bound, bound, out).astype(np.float32)
    return weights


def scores(weights: Weights, x: np.ndarray) -> np.ndarray:
    """sigmoid(logit) of the twin with these weights, computed in numpy."""
    arrays = ordered(weights)
    h = np.atleast_2d(np.asarray(x, dtype=np.float64))
    layers = list(zip(arrays[::2], arrays[1::2], strict=True))
    for i, (w, b) in enumerate(layers):
        h = h @ w.T.astype(np.float64) + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return (1.0 / (1.0 + np.exp(-h.reshape(-1)))).astype(np.float32)


def to_tflite(arch: str, weights: Weights) -> bytes:
    """The .tflite model of `arch` carrying these weights.

    Raises:
        ValueError: If the weights do not fit the architecture or are not finite.
    """
    from models import tflite_template

    return tflite_template.with_weights(arch, ordered(weights))
