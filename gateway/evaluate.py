"""`iomt-gateway model evaluate DIR`: how well the installed model ranks PVC windows.

A folder of MIT-BIH beat-annotation pairs (`<rec>_all.csv`, `<rec>_pvc.csv`, the tpcp
format) is cut into the same RR windows the agent scores; a window is positive when it
holds a ventricular ectopic beat. The result is AUROC per record and over all windows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.litert import Scorer
from models import INITIAL_PATH, features


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    Returns None when one class is absent (the area is undefined).

    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    >>> auroc(np.array([0.5, 0.5]), np.array([0, 1]))
    0.5
    >>> auroc(np.array([0.2, 0.3]), np.array([0, 0])) is None
    True
    """
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def records_in(folder: Path) -> list[str]:
    """The records with both CSVs in `folder`, sorted.

    Raises:
        FileNotFoundError: `folder` holds no record pair.
    """
    found = sorted(
        p.name.removesuffix("_all.csv")
        for p in Path(folder).glob("*_all.csv")
        if (p.parent / p.name.replace("_all.csv", "_pvc.csv")).exists()
    )
    if not found:
        raise FileNotFoundError(f"no <rec>_all.csv with <rec>_pvc.csv in {folder}")
    return found


def evaluate(
    folder: Path,
    model: Path | None = None,
    on_record: Callable[[str, dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """AUROC of `model` (default: the shipped one) per record and overall.

    `on_record` is called with each record's name and figures as they are done.

    Raises:
        FileNotFoundError: `folder` holds no record pair.
        ModelError: The model cannot be loaded.
    """
    path = model or INITIAL_PATH
    scorer = Scorer(path)
    per_record: dict[str, dict[str, object]] = {}
    all_scores, all_labels = [], []
    for record in records_in(folder):
        x, y = features.record_dataset(folder, record)
        s = scorer.score(x)
        all_scores.append(s)
        all_labels.append(y)
        per_record[record] = {
            "auroc": _rounded(auroc(s, y)),
            "windows": len(y),
            "positive_windows": int(y.sum()),
        }
        if on_record is not None:
            on_record(record, per_record[record])
    overall = auroc(np.concatenate(all_scores), np.concatenate(all_labels))
    return {
        "model": path.name,
        "records": per_record,
        "overall_auroc": _rounded(overall),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
