"""Training benchmark: DP-SGD epoch time, training child's and agent's memory, TFLite.

Prints one JSON object with four parts, each against a baseline measured in the
same run:

- `epoch`: seconds per epoch of DP-SGD (opacus, per-sample clipping, Poisson
  sampling) against plain SGD on the same windows, model, batch size and epochs,
  both through `gateway.learning.dpsgd.train_round`; rounds alternate so a busy
  machine slows both alike. CPU seconds of this process give the ratio (wall
  seconds are reported too). `opacus_modes` times the other per-sample gradient
  modes of opacus on the same data and says whether each survives an empty
  Poisson batch, which a product round must.
- `training_child`: peak RSS of the `python -m gateway.learning.job` child that
  `run_training` starts, from getrusage(RUSAGE_CHILDREN) (it is the first child).
- `agent`: VmHWM and VmRSS of a child process running the agent on the demo
  configuration against a loopback mosquitto, after replaying the demo's
  recordings as fast as possible, and whether torch was ever imported there.
- `inference`: microseconds per window scored one at a time with the shipped
  model through ai-edge-litert (`gateway.litert.Scorer`), as the agent scores;
  baseline: computing that window's features with numpy.

Pinned to one core, torch on one thread. Data: every window (stride 1) of the
nine shared MIT-BIH records.

Usage: python bench/train.py [--epochs N] [--repeat N] [--batches 256,1024]
    [--child-epochs N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from gateway.broker import LocalBroker
from gateway.evaluate import records_in
from gateway.learning import dpsgd
from gateway.learning.job import run_training
from gateway.learning.privacy import PrivacyAccount
from gateway.litert import Scorer
from models import INITIAL_PATH, features, twins
from sensors.replay import data_path

ROOT = Path(__file__).resolve().parents[1]
MITDB = data_path("mitdb/100_all.csv").parent
DEMO_CONFIG = ROOT / "config" / "demo.toml"
DELTA = 1e-5
SIGMA = 1.0
"""Noise multiplier of the timed DP rounds (time does not depend on it)."""

HYPER = {"loss": "logistic", "lr": 4.0, "max_grad_norm": 1.0}
"""As in bench/loro.py."""

MODES = ("hooks", "ew", "functorch")
"""opacus per-sample gradient modes; all clip every sample's gradient exactly."""


def load_windows() -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of every window of the nine shared records."""
    parts = [features.record_dataset(MITDB, r) for r in records_in(MITDB)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# -- (a) epoch time ------------------------------------------------------------------


def round_epochs(x, y, *, private: bool, arch: str, epochs: int, batch: int):
    """(CPU, wall) seconds of each epoch after the first of one `train_round`."""
    marks: list[tuple[float, float]] = []

    def mark(*_: float) -> None:
        marks.append((time.process_time(), time.perf_counter()))

    kwargs = dict(HYPER, arch=arch, epochs=epochs, batch_size=batch, progress=mark)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        account = PrivacyAccount(Path(tmp) / "p.db", epsilon_max=1e6, delta=DELTA)
        try:
            if private:
                dpsgd.train_round(
                    x, y, noise_multiplier=SIGMA, account=account, **kwargs
                )
            else:
                dpsgd.train_round(x, y, noise_multiplier=0, **kwargs)
        finally:
            account.close()
    # Differences between epoch ends: setup and the first epoch's warm-up excluded.
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)]


def compare_epochs(x, y, *, arch: str, epochs: int, batch: int, repeat: int):
    """Median epoch seconds, non-private and DP-SGD, rounds alternating."""
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(repeat):
        for private in (False, True):
            times[private] += round_epochs(
                x, y, private=private, arch=arch, epochs=epochs, batch=batch
            )
    plain_cpu, dp_cpu = (statistics.median(c for c, _ in times[p]) for p in (0, 1))
    plain_wall, dp_wall = (statistics.median(w for _, w in times[p]) for p in (0, 1))
    return {
        "arch": arch,
        "batch_size": batch,
        "epochs_timed": len(times[True]),
        "non_private_epoch_s": round(plain_cpu, 4),
        "dp_sgd_epoch_s": round(dp_cpu, 4),
        "ratio": round(dp_cpu / plain_cpu, 3),
        "ratio_wall": round(dp_wall / plain_wall, 3),
    }


def _loader(x, y, batch: int) -> DataLoader:
    data = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    return DataLoader(data, batch_size=batch, shuffle=True)


def _private(arch: str, x, y, batch: int, mode: str):
    """Model, optimizer and Poisson loader wrapped by opacus in `mode`."""
    model = twins.build(arch, x.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode off: timing only
        engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=HYPER["lr"]),
        data_loader=_loader(x, y, batch),
        noise_multiplier=SIGMA,
        max_grad_norm=HYPER["max_grad_norm"],
        poisson_sampling=True,
        grad_sample_mode=mode,
    )


def _plain(arch: str, x, y, batch: int):
    model = twins.build(arch, x.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=HYPER["lr"])
    return model, optimizer, _loader(x, y, batch)


def _epoch_cpu(model, optimizer, loader) -> float:
    """CPU seconds of one pass; every batch steps, an empty one too."""
    criterion = twins.loss_fn(HYPER["loss"])
    began = time.process_time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb).squeeze(-1), yb).backward()
            optimizer.step()
    return time.process_time() - began


def survives_empty_batch(arch: str, mode: str) -> bool:
    """Whether `mode` steps through Poisson batches that hold nobody.

    Synthetic data, not patient data: 10 rows sampled at q = 0.1, so about a third
    of the batches are empty.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, features.N_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    # opacus warns when the first batch is empty: here that is the point.
    logging.getLogger("opacus").setLevel(logging.ERROR)
    try:
        for _ in range(3):
            _epoch_cpu(*_private(arch, x, y, 1, mode))
    except RuntimeError:
        return False
    return True


def opacus_modes(x, y, *, arch: str, batch: int, repeat: int) -> dict:
    """Epoch CPU seconds per opacus mode against plain SGD, passes interleaved."""
    setups = {"non_private": _plain(arch, x, y, batch)}
    setups |= {mode: _private(arch, x, y, batch, mode) for mode in MODES}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeat):
        for name, parts in setups.items():
            times[name].append(_epoch_cpu(*parts))
    base = statistics.median(times["non_private"])
    out: dict[str, object] = {"non_private_epoch_s": round(base, 4)}
    for mode in MODES:
        seconds = statistics.median(times[mode])
        out[mode] = {
            "epoch_s": round(seconds, 4),
            "ratio": round(seconds / base, 3),
            "survives_empty_batch": survives_empty_batch(arch, mode),
        }
    return out


# -- (b) the training child's memory -------------------------------------------------


def training_child(x, y, *, arch: str, epochs: int, batch: int) -> dict:
    """One private round through `run_training`; peak RSS of its child process.

    Must run before any other child of this process: RUSAGE_CHILDREN reports the
    largest child waited for so far.
    """
    before_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "windows.npz", X=x, y=y)
        config = HYPER | {
            "data": str(folder / "windows.npz"),
            "out": str(folder / "weights.npz"),
            "account": str(folder / "privacy.db"),
            "epsilon_max": 8.0,
            "delta": DELTA,
            "target_epsilon": 8.0,
            "arch": arch,
            "epochs": epochs,
            "batch_size": batch,
        }
        began = time.perf_counter()
        result = run_training(config, timeout=900)
        seconds = time.perf_counter() - began
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "only_child_so_far": before_kb == 0,
        "windows": len(y),
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "epsilon": round(result["metrics"]["epsilon"], 4),
    }


# -- (c) the agent's memory ----------------------------------------------------------

AGENT_PROBE = """
import asyncio, json, sys, time
from gateway.agent import Agent
from gateway.clock import ManualClock
from gateway.config import load_config

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}

async def main(config, port, data_dir):
    cfg = load_config(config, gateway={"data_dir": data_dir}, mqtt={"port": port})
    start = time.time() // 60 * 60
    agent = Agent(cfg, clock=ManualClock(start))
    await agent.start(live_ticks=False)
    started = status()
    began = time.perf_counter()
    try:
        await agent.replay(start=start, speed=None)
        await agent.deliver_pending()
    finally:
        await agent.stop()
    return {
        "after_start_kb": started,
        "after_replay_kb": status(),
        "replay_s": round(time.perf_counter() - began, 1),
        "scorer_loaded": agent.scorer is not None,
        "torch_imported": "torch" in sys.modules,
        "opacus_imported": "opacus" in sys.modules,
    }

print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))))
"""


def agent_memory() -> dict:
    """Run the agent on the demo configuration in a child; its memory, no torch.

    Raises:
        RuntimeError: If torch entered the agent process.
    """
    with (
        LocalBroker(persistence=False) as broker,
        tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp,
    ):
        argv = [sys.executable, "-c", AGENT_PROBE, str(DEMO_CONFIG), str(broker.port)]
        done = subprocess.run(
            [*argv, tmp], capture_output=True, text=True, timeout=900, cwd=ROOT
        )
    if done.returncode != 0:
        raise RuntimeError(f"agent probe failed: {done.stderr.strip()[-300:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if probe["torch_imported"]:
        raise RuntimeError("torch was imported into the agent process")
    start, end = probe["after_start_kb"], probe["after_replay_kb"]
    return {
        "config": "config/demo.toml",
        "rss_after_start_mb": round(start["VmRSS"] / 1024, 1),
        "peak_rss_after_replay_mb": round(end["VmHWM"] / 1024, 1),
        "rss_after_replay_mb": round(end["VmRSS"] / 1024, 1),
        "replay_s": probe["replay_s"],
        "tflite_scorer_loaded": probe["scorer_loaded"],
        "torch_imported": probe["torch_imported"],
        "opacus_imported": probe["opacus_imported"],
    }


# -- (d) inference -------------------------------------------------------------------


def inference(n_windows: int) -> dict:
    """Per-window TFLite scoring against per-window numpy features, microseconds."""
    beats = features.load_beats(MITDB / "100_all.csv")
    windows = features.windows_from_beats(beats)[:n_windows]
    scorer = Scorer(INITIAL_PATH)
    feature_ns, score_ns = [], []
    for window in windows:
        t0 = time.perf_counter_ns()
        vector = features.features(window)
        t1 = time.perf_counter_ns()
        scorer.score(vector)
        score_ns.append(time.perf_counter_ns() - t1)
        feature_ns.append(t1 - t0)
    batch = features.features(windows)
    began = time.perf_counter_ns()
    scorer.score(batch)
    batched_ns = (time.perf_counter_ns() - began) / len(windows)
    feature_us, score_us = (statistics.median(v) / 1e3 for v in (feature_ns, score_ns))
    return {
        "model": INITIAL_PATH.name,
        "windows": len(windows),
        "baseline_numpy_features_us": round(feature_us, 1),
        "tflite_score_us": round(score_us, 1),
        "ratio_to_features": round(score_us / feature_us, 3),
        "tflite_score_batched_us_per_window": round(batched_ns / 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="per timed round")
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds each")
    parser.add_argument("--batches", default="256,1024", help="comma-separated")
    parser.add_argument("--child-epochs", type=int, default=20)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)

    x, y = load_windows()
    batches = [int(b) for b in args.batches.split(",")]
    timing = {"epochs": args.epochs, "repeat": args.repeat}
    # First: RUSAGE_CHILDREN must see the training child before any other child.
    child = training_child(x, y, arch="linear", epochs=args.child_epochs, batch=256)
    epochs = [
        compare_epochs(x, y, arch=arch, batch=batch, **timing)
        for arch in twins.ARCHS
        for batch in batches
    ]
    modes = {
        arch: opacus_modes(x, y, arch=arch, batch=batches[0], repeat=args.repeat * 2)
        for arch in twins.ARCHS
    }
    result = {
        "benchmark": "train",
        "cores": 1,
        "windows": len(y),
        "epoch": epochs,
        "epoch_ratio_target": 1.5,
        "opacus_modes_batch_size": batches[0],
        "opacus_modes": modes,
        "training_child": child,
        "agent": agent_memory(),
        "inference": inference(2000),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
