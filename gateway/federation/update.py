"""A gateway's model update: clip, noise, quantise, and their inverse on the server.

Pure numpy, no Flower: the ClientApp and ServerApp call these, and tests check
them without any process running. An update is a dict of named float32 arrays
(the model delta, local weights minus the global weights a round started from).

Privacy: the delta comes from a DP-SGD round, so it is already (epsilon, delta)-DP
by the gateway's own account. Clipping to an L2 bound, adding Gaussian noise drawn
from a CSPRNG-seeded generator, and quantising to 8 bits are all post-processing
of that private output (Dwork and Roth 2014, Proposition 2.1): they keep the
guarantee and spend nothing. The extra noise is not counted in the account, so the
account over-states what a gateway spent, never under-states it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

Update = dict[str, np.ndarray]
"""Named arrays, as the twin's state_dict names them ("0.weight", "0.bias", ...)."""

SCALE_SUFFIX = "/scale"
"""Key suffix of a quantised tensor's scale in an encoded update."""

INT8_MAX = 127
"""Largest magnitude of a symmetric int8 code."""


def csprng() -> np.random.Generator:
    """A numpy generator seeded with 256 bits from the OS CSPRNG.

    numpy's PCG64 is not a cryptographic generator, but with a fresh 256-bit
    secret seed per update the noise cannot be predicted by whoever sees the
    code; what is seeded from a guessable value (time, pid) could be.
    """
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32))))


def l2_norm(update: Update) -> float:
    """L2 norm of all arrays of an update taken together."""
    return float(
        np.sqrt(
            sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update.values())
        )
    )


def clip(update: Update, bound: float) -> tuple[Update, float]:
    """Scale the update down to L2 norm <= bound; return it and the original norm.

    Examples:
        >>> clipped, norm = clip({"w": np.array([3.0, 4.0], np.float32)}, 1.0)
        >>> norm, [round(float(v), 3) for v in clipped["w"]]
        (5.0, [0.6, 0.8])
    """
    norm = l2_norm(update)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (v * factor).astype(np.float32) for k, v in update.items()}, norm


def add_noise(update: Update, std: float, rng: np.random.Generator) -> Update:
    """The update plus independent Gaussian noise of this std on every value."""
    if std == 0:
        return {k: v.astype(np.float32) for k, v in update.items()}
    return {
        k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32)
        for k, v in update.items()
    }


def quantise(update: Update) -> Update:
    """Symmetric 8-bit codes with one float32 scale per tensor (post-processing).

    Each tensor t becomes round(t / s) as int8 with s = max|t| / 127, stored under
    its own name, and s under name + `SCALE_SUFFIX`. The error per value is at
    most s / 2.

    Examples:
        >>> q = quantise({"w": np.array([0.5, -1.0, 0.25], np.float32)})
        >>> q["w"].tolist(), float(q["w/scale"]) * 127
        ([64, -127, 32], 1.0)
    """
    out: Update = {}
    for name, values in update.items():
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak / INT8_MAX if peak > 0 else 1.0
        codes = np.clip(np.rint(values / scale), -INT8_MAX, INT8_MAX)
        out[name] = codes.astype(np.int8)
        out[name + SCALE_SUFFIX] = np.asarray(scale, dtype=np.float32)
    return out


def decode(encoded: Update) -> Update:
    """Float32 delta from an encoded update, quantised or not.

    Raises:
        ValueError: If an int8 tensor has no scale, or a value is not finite.
    """
    out: Update = {}
    for name, values in encoded.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if values.dtype == np.int8:
            scale = encoded.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"quantised tensor {name!r} has no scale")
            values = values.astype(np.float32) * np.float32(scale)
        out[name] = np.asarray(values, dtype=np.float32)
        if not np.all(np.isfinite(out[name])):
            raise ValueError(f"tensor {name!r} holds a non-finite value")
    return out


def prepare(
    delta: Update,
    *,
    bound: float,
    noise: float,
    quantise_8bit: bool,
    rng: np.random.Generator | None = None,
) -> Update:
    """Clip to `bound`, add N(0, (noise * bound)^2), optionally quantise.

    Returns:
        The encoded update as it goes on the wire.
    """
    clipped, _ = clip(delta, bound)
    noised = add_noise(clipped, noise * bound, rng or csprng())
    return quantise(noised) if quantise_8bit else noised


def digest(encoded: Update) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of an encoded update."""
    h = hashlib.sha256()
    for name in sorted(encoded):
        array = np.ascontiguousarray(encoded[name])
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def payload_bytes(encoded: Update) -> int:
    """Bytes of array data in an encoded update (what quantising shrinks)."""
    return int(sum(np.asarray(a).nbytes for a in encoded.values()))


def apply(global_weights: Update, deltas: list[Update], weights: list[float]) -> Update:
    """Global weights plus the weighted mean of decoded deltas (FedAvg on deltas).

    Raises:
        ValueError: If there are no deltas or the weights do not sum above zero.
    """
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError("FedAvg needs at least one update with a positive weight")
    out = {k: np.asarray(v, dtype=np.float64).copy() for k, v in global_weights.items()}
    for delta, weight in zip(deltas, weights, strict=True):
        for name in out:
            out[name] += (weight / total) * delta[name]
    return {k: v.astype(np.float32) for k, v in out.items()}
