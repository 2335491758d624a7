"""The model architectures' layer shapes, shared by the torch twins and TFLite.

Free of torch on purpose: the agent writes trained weights into a TFLite template
and must not import torch to know the shapes (torch stays in the training child).
"""

from __future__ import annotations

import itertools

ARCHS = ("linear", "mlp")
"""Architectures with a torch twin and a TFLite template."""

MLP_HIDDEN = (16, 8)
"""Hidden layer widths of the MLP."""


def layer_shapes(arch: str, n_features: int) -> list[tuple[int, int]]:
    """(out, in) of each fully connected layer of `arch`, input to output.

    Raises:
        ValueError: If `arch` is unknown or n_features is not positive.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if arch == "linear":
        return [(1, n_features)]
    if arch == "mlp":
        widths = [n_features, *MLP_HIDDEN, 1]
        return [(out, inp) for inp, out in itertools.pairwise(widths)]
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
