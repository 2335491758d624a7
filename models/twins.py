"""Torch twins of the TFLite models: the same layers, trained on the gateway.

The twins output a logit; the TFLite model adds the sigmoid, so its output is the
score. No BatchNorm and no in-place activations: opacus computes per-sample
gradients and supports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.architectures import ARCHS, MLP_HIDDEN, layer_shapes

# ARCHS, MLP_HIDDEN and layer_shapes live in the torch-free `models.architectures`.
__all__ = [
    "ARCHS",
    "MLP_HIDDEN",
    "build",
    "layer_shapes",
    "load_weights",
    "logits",
    "loss_fn",
    "scores",
    "weights",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build(arch: str, n_features: int) -> nn.Sequential:
    """The torch twin of `arch`: Linear layers with ReLU between them.

    Raises:
        ValueError: If `arch` is unknown or n_features is not positive.
    """
    layers: list[nn.Module] = []
    for out, inp in layer_shapes(arch, n_features):
        if layers:
            layers.append(nn.ReLU(inplace=False))
        layers.append(nn.Linear(inp, out))
    return nn.Sequential(*layers)


def _hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Labels arrive as 0/1 like for the logistic loss; the SVM wants -1/+1.
    signs = labels * 2.0 - 1.0
    return torch.clamp(1.0 - signs * logits, min=0.0).mean()


def loss_fn(kind: str = "logistic") -> LossFn:
    """Loss over (logits, 0/1 labels), both shaped (batch,), mean-reduced.

    "logistic" is binary cross-entropy on the logit (logistic regression for the
    linear model); "hinge" turns the linear model into a linear SVM.

    Raises:
        ValueError: If `kind` is unknown.
    """
    if kind == "logistic":
        return nn.BCEWithLogitsLoss()
    if kind == "hinge":
        return _hinge
    raise ValueError(f"unknown loss {kind!r}; expected 'logistic' or 'hinge'")


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def weights(model: nn.Module) -> list[np.ndarray]:
    """Weight and bias of each Linear layer, in order: [W0, b0, W1, b1, ...].

    Weights are (out, in) float32, the layout TFLite's FULLY_CONNECTED expects.
    """
    arrays = []
    for layer in _linears(model):
        arrays.append(layer.weight.detach().cpu().numpy().astype(np.float32))
        arrays.append(layer.bias.detach().cpu().numpy().astype(np.float32))
    return arrays


def load_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Copy arrays in the order of `weights` into the model's Linear layers.

    Raises:
        ValueError: If the number or a shape of the arrays does not match.
    """
    params = [p for layer in _linears(model) for p in (layer.weight, layer.bias)]
    if len(arrays) != len(params):
        raise ValueError(f"expected {len(params)} arrays, got {len(arrays)}")
    for i, (param, array) in enumerate(zip(params, arrays, strict=True)):
        if tuple(np.shape(array)) != tuple(param.shape):
            raise ValueError(
                f"array {i}: shape {np.shape(array)}, expected {tuple(param.shape)}"
            )
    with torch.no_grad():
        for param, array in zip(params, arrays, strict=True):
            param.copy_(torch.as_tensor(np.asarray(array, dtype=np.float32)))


def logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the twin for features x (n, n_features), as float32 (n,)."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    return out.reshape(-1).numpy()


def scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """sigmoid(logit) of the twin, as float32 (n,): what the TFLite model outputs."""
    with torch.no_grad():
        out = torch.sigmoid(model(torch.as_tensor(np.asarray(x, dtype=np.float32))))
    return out.reshape(-1).numpy()
