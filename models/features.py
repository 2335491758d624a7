"""RR-interval windows to fixed-length feature vectors, for training and inference.

The one feature definition shared by the DP-SGD training job and the on-gateway
scorer, so the two cannot drift apart. Pure numpy: the agent imports it without
torch.

A window is `WINDOW_BEATS` consecutive RR intervals in milliseconds. Its feature
vector (`N_FEATURES` float32 values, in this order) is:

* `WINDOW_BEATS` normalised RR values: each RR divided by the window's median RR,
  minus 1. A premature beat shows as a negative value followed by a positive one
  (the compensatory pause), wherever it sits in the window.
* log median RR: natural log of the median RR in seconds (about -0.2 at 75 bpm).
  The only feature that carries the heart rate itself.
* RMSSD / median: root mean square of successive differences, relative to the
  median RR.
* max |successive difference| / median: the largest beat-to-beat jump.
* pNN fraction: the fraction of successive differences larger than
  `PNN_FRACTION` of the median RR. pNN50 uses a fixed 50 ms; a relative threshold
  (6.25 % is 50 ms at 800 ms) keeps this feature independent of the heart rate.

All features except log median RR are invariant under scaling every RR by the same
factor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOW_BEATS = 16
"""RR intervals per window."""

N_SUMMARY = 4
"""Summary features after the normalised RR values."""

N_FEATURES = WINDOW_BEATS + N_SUMMARY
"""Length of one feature vector."""

PNN_FRACTION = 0.0625
"""Successive-difference threshold for the pNN feature, as a fraction of the median."""

DEFAULT_FS = 360
"""Sampling rate of the MIT-BIH Arrhythmia Database beat annotations, in Hz."""

FEATURE_NAMES = (
    *(f"rr_norm_{i}" for i in range(WINDOW_BEATS)),
    "log_median_rr_s",
    "rmssd_rel",
    "max_abs_diff_rel",
    "pnn_rel",
)
"""One name per feature, in vector order."""


def rr_from_beats(sample_indices: np.ndarray, fs: float = DEFAULT_FS) -> np.ndarray:
    """RR intervals in ms between consecutive beat sample indices.

    Raises:
        ValueError: If the indices are not strictly increasing.
    """
    beats = np.asarray(sample_indices, dtype=np.float64)
    rr = np.diff(beats) * (1000.0 / fs)
    if np.any(rr <= 0):
        raise ValueError("beat sample indices must be strictly increasing")
    return rr


def windows_from_rr(rr_ms: np.ndarray, stride: int = 1) -> np.ndarray:
    """Cut RR intervals into windows of `WINDOW_BEATS`, one every `stride` RRs.

    Returns:
        Array of shape (n_windows, WINDOW_BEATS); window i holds
        rr_ms[i * stride : i * stride + WINDOW_BEATS]. Zero rows if too short.

    Raises:
        ValueError: If stride is not positive.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    rr = np.asarray(rr_ms, dtype=np.float64)
    if rr.shape[0] < WINDOW_BEATS:
        return np.empty((0, WINDOW_BEATS), dtype=np.float64)
    all_windows = np.lib.stride_tricks.sliding_window_view(rr, WINDOW_BEATS)
    return np.ascontiguousarray(all_windows[::stride])


def windows_from_beats(
    sample_indices: np.ndarray, fs: float = DEFAULT_FS, stride: int = 1
) -> np.ndarray:
    """RR windows (ms) from beat sample indices; see `windows_from_rr`.

    Raises:
        ValueError: If the indices are not increasing or stride is not positive.
    """
    return windows_from_rr(rr_from_beats(sample_indices, fs), stride)


def labels_from_pvc(
    sample_indices: np.ndarray, pvc_indices: np.ndarray, stride: int = 1
) -> np.ndarray:
    """Label each window of `windows_from_beats` (same stride): 1 if it holds a V beat.

    RR interval j ends at beat j + 1, so the window starting at RR i holds beats
    i + 1 .. i + WINDOW_BEATS. A window is positive when any of them is a
    ventricular ectopic beat.

    Returns:
        float32 array of 0/1, one per window.
    """
    beats = np.asarray(sample_indices)
    is_v = np.isin(beats, np.asarray(pvc_indices)).astype(np.int64)
    n_rr = beats.shape[0] - 1
    if n_rr < WINDOW_BEATS:
        return np.empty(0, dtype=np.float32)
    v_in_rr = is_v[1:]
    counts = np.lib.stride_tricks.sliding_window_view(v_in_rr, WINDOW_BEATS).sum(1)
    return (counts[::stride] > 0).astype(np.float32)


def features(windows: np.ndarray) -> np.ndarray:
    """Feature vectors for RR windows (see the module docstring for each feature).

    Args:
        windows: Shape (n_windows, WINDOW_BEATS) or (WINDOW_BEATS,), RR in ms, > 0.

    Returns:
        float32 array of shape (n_windows, N_FEATURES).

    Raises:
        ValueError: If the window length is wrong or an RR is not positive and finite.
    """
    rr = np.atleast_2d(np.asarray(windows, dtype=np.float64))
    if rr.shape[1] != WINDOW_BEATS:
        raise ValueError(f"windows must hold {WINDOW_BEATS} RR intervals")
    if not np.all(np.isfinite(rr) & (rr > 0)):
        raise ValueError("RR intervals must be positive and finite")

    median = np.median(rr, axis=1, keepdims=True)
    rel = rr / median
    diffs = np.diff(rel, axis=1)
    summary = np.column_stack(
        [
            np.log(median[:, 0] / 1000.0),
            np.sqrt(np.mean(diffs**2, axis=1)),
            np.max(np.abs(diffs), axis=1),
            np.mean(np.abs(diffs) > PNN_FRACTION, axis=1),
        ]
    )
    return np.hstack([rel - 1.0, summary]).astype(np.float32)


def load_beats(path: Path | str) -> np.ndarray:
    """Sample indices from a tpcp-style MIT-BIH CSV (`,R` or `,PVC` columns)."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return table[:, 1] if table.size else np.empty(0, dtype=np.int64)


def record_dataset(
    data_dir: Path | str, record: str, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one record from `<record>_all.csv` and `_pvc.csv`.

    Returns:
        (features float32 (n, N_FEATURES), labels float32 (n,)).
    """
    base = Path(data_dir)
    beats = load_beats(base / f"{record}_all.csv")
    pvc = load_beats(base / f"{record}_pvc.csv")
    x = features(windows_from_beats(beats, stride=stride))
    return x, labels_from_pvc(beats, pvc, stride=stride)
