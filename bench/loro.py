"""Leave-records-out AUROC of the PVC-window model, non-private and with DP-SGD.

For each of the nine shared MIT-BIH records, the model is trained on the other eight
and scores the held-out one. Four settings: without privacy (plain SGD, no clipping,
no noise) and DP-SGD at target epsilon 8, 3 and 1 (delta 1e-5). Every setting goes
through `gateway.learning.dpsgd.train_round`, the product's own round, with a fresh
privacy account in a temporary file whose cap is the target, so each fold spends
exactly that setting's epsilon and nothing else. The held-out record is scored
through TFLite (`gateway.litert.Scorer`), as the agent would score it.

Hyper-parameters, chosen once for all settings (see `HYPER`): the shipped linear
model with logistic loss, 20 epochs, expected batch 256, SGD lr 4.0, clip norm 1.0.
They were set on the non-private training loss of one fold, which stops falling
after about 20 epochs at this rate, not on any held-out AUROC. The noise multiplier
follows from the target epsilon, the sampling rate and the steps
(`privacy.noise_for_target`).

Randomness: the model's initial weights come from a fixed seed per fold, the same
for the four settings. Batch sampling and DP noise are drawn from the OS CSPRNG (as
in the product) and cannot be fixed: use `--runs N` to see the spread.

Prints one JSON object; `--markdown` also writes the table to stderr.

Usage: python bench/loro.py [--runs N] [--markdown] [--arch linear|mlp] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from gateway.evaluate import auroc, records_in
from gateway.learning import dpsgd
from gateway.learning.privacy import PrivacyAccount
from gateway.litert import Scorer
from models import features, tflite_template, twins
from sensors.replay import data_path

DELTA = 1e-5
TARGETS: tuple[float | None, ...] = (None, 8.0, 3.0, 1.0)
"""Target epsilons; None is the non-private baseline."""

HYPER = {
    "arch": "linear",
    "loss": "logistic",
    "epochs": 20,
    "batch_size": 256,
    "lr": 4.0,
    "max_grad_norm": 1.0,
}
"""Training settings shared by every setting and fold."""

MITDB = data_path("mitdb/100_all.csv").parent
"""The nine shared MIT-BIH records' beat annotations."""

SEED = 20240611
"""Base seed of the initial weights (fold i uses SEED + i)."""

Dataset = tuple[np.ndarray, np.ndarray]


@dataclass
class Fold:
    """One held-out record's scores under one setting."""

    scores: np.ndarray
    labels: np.ndarray
    noise_multiplier: float
    epsilon: float


def setting_name(target: float | None) -> str:
    """JSON key of a setting: 'non_private' or 'epsilon_<target>'."""
    return "non_private" if target is None else f"epsilon_{target:g}"


def load(folder: Path) -> dict[str, Dataset]:
    """Features and labels (stride 1) of every record pair in `folder`."""
    return {r: features.record_dataset(folder, r) for r in records_in(folder)}


def train(x: np.ndarray, y: np.ndarray, target: float | None, seed: int, hyper: dict):
    """One round through the product's `train_round`; a fresh account if private."""
    torch.manual_seed(seed)
    if target is None:
        return dpsgd.train_round(x, y, noise_multiplier=0, **hyper)
    with tempfile.TemporaryDirectory(prefix="loro-") as tmp:
        account = PrivacyAccount(
            Path(tmp) / "privacy.db", epsilon_max=target, delta=DELTA
        )
        try:
            return dpsgd.train_round(
                x, y, target_epsilon=target, account=account, **hyper
            )
        finally:
            account.close()


def tflite_scores(result: dpsgd.RoundResult, arch: str, x: np.ndarray) -> np.ndarray:
    """Scores of `x` by the round's weights written into the TFLite template."""
    model = twins.build(arch, features.N_FEATURES)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in result.weights.items()})
    model_bytes = tflite_template.with_weights(arch, twins.weights(model))
    with tempfile.TemporaryDirectory(prefix="loro-") as tmp:
        path = Path(tmp) / "fold.tflite"
        path.write_bytes(model_bytes)
        return Scorer(path).score(x)


def run_fold(data: dict[str, Dataset], held: str, seed: int, hyper: dict):
    """Train on every record but `held`, in each setting; score `held`."""
    x = np.concatenate([d[0] for r, d in data.items() if r != held])
    y = np.concatenate([d[1] for r, d in data.items() if r != held])
    x_held, y_held = data[held]
    folds = {}
    for target in TARGETS:
        result = train(x, y, target, seed, hyper)
        folds[setting_name(target)] = Fold(
            tflite_scores(result, hyper["arch"], x_held),
            y_held,
            float(result.metrics["noise_multiplier"]),
            float(result.metrics["epsilon"]),
        )
    return folds


def run_once(data: dict[str, Dataset], hyper: dict) -> dict[str, dict]:
    """Every fold in every setting: AUROC per record, mean and pooled."""
    per_setting: dict[str, dict[str, Fold]] = {setting_name(t): {} for t in TARGETS}
    for i, held in enumerate(data):
        for name, fold in run_fold(data, held, SEED + i, hyper).items():
            per_setting[name][held] = fold
    return {name: summarise(folds) for name, folds in per_setting.items()}


def summarise(folds: dict[str, Fold]) -> dict:
    """AUROC per held-out record, their mean, and AUROC over all held-out windows."""
    per_record = {r: auroc(f.scores, f.labels) for r, f in folds.items()}
    pooled = auroc(
        np.concatenate([f.scores for f in folds.values()]),
        np.concatenate([f.labels for f in folds.values()]),
    )
    return {
        "auroc": {r: round(v, 4) for r, v in per_record.items()},
        "mean_auroc": round(float(np.mean(list(per_record.values()))), 4),
        "pooled_auroc": round(pooled, 4),
        "noise_multiplier": {r: round(f.noise_multiplier, 4) for r, f in folds.items()},
        "epsilon_spent_max": round(max(f.epsilon for f in folds.values()), 4),
    }


def across_runs(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per setting: mean AUROC per record, and each figure's mean and range."""
    out = {}
    for name in runs[0]:
        settings = [run[name] for run in runs]
        records = settings[0]["auroc"]
        out[name] = {
            "auroc": {
                r: round(float(np.mean([s["auroc"][r] for s in settings])), 4)
                for r in records
            },
        }
        for key in ("mean_auroc", "pooled_auroc"):
            values = [s[key] for s in settings]
            out[name][key] = round(float(np.mean(values)), 4)
            out[name][f"{key}_range"] = [min(values), max(values)]
    return out


def markdown(summary: dict[str, dict], data: dict[str, Dataset], runs: int) -> str:
    """The AUROC table: one row per held-out record, one column per setting."""
    names = list(summary)
    heads = ["non-private" if n == "non_private" else _eps_head(n) for n in names]
    lines = [
        "| held-out record | windows (PVC) | " + " | ".join(heads) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for record, (_, y) in data.items():
        cells = [f"{summary[n]['auroc'][record]:.3f}" for n in names]
        row = f"| {record} | {len(y)} ({int(y.sum())}) | " + " | ".join(cells)
        lines.append(row + " |")
    total = sum(len(y) for _, y in data.values())
    positives = sum(int(y.sum()) for _, y in data.values())
    for key, label in (("mean_auroc", "mean"), ("pooled_auroc", "pooled")):
        cells = [_with_range(summary[n], key, runs) for n in names]
        counts = f"{total} ({positives})" if key == "pooled_auroc" else ""
        lines.append(f"| **{label}** | {counts} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _eps_head(name: str) -> str:
    return f"DP ε={name.removeprefix('epsilon_')}"


def _with_range(setting: dict, key: str, runs: int) -> str:
    text = f"**{setting[key]:.3f}**"
    if runs > 1:
        low, high = setting[f"{key}_range"]
        text += f" ({low:.3f}-{high:.3f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole run")
    parser.add_argument("--markdown", action="store_true", help="table on stderr")
    parser.add_argument("--arch", choices=twins.ARCHS, default=HYPER["arch"])
    parser.add_argument("--data", type=Path, default=MITDB, help="record CSV pairs")
    parser.add_argument(
        "--batch-size", type=int, default=HYPER["batch_size"], help="expected batch"
    )
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)

    hyper = HYPER | {"arch": args.arch, "batch_size": args.batch_size}
    data = load(args.data)
    began, cpu_began = time.perf_counter(), time.process_time()
    runs = [run_once(data, hyper) for _ in range(args.runs)]
    summary = across_runs(runs)
    result = {
        "benchmark": "loro",
        "cores": 1,
        "records": list(data),
        "delta": DELTA,
        "hyperparameters": hyper,
        "runs": len(runs),
        "seconds": round(time.perf_counter() - began, 1),
        "cpu_seconds": round(time.process_time() - cpu_began, 1),
        "summary": summary,
        "per_run": runs,
    }
    print(json.dumps(result, indent=2))
    if args.markdown:
        print(markdown(summary, data, len(runs)), file=sys.stderr)


if __name__ == "__main__":
    main()
