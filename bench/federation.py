"""Federated uplink figures: bytes per round, and AUROC against central training.

Three gateways on loopback (real SuperLink and SuperNodes), each holding one
MIT-BIH record in its store, run DP-SGD rounds through Flower. Printed as JSON:

- bytes per round per gateway: array data sent as float32, and what the same
  updates take quantised to 8 bits (int8 codes plus one float32 scale per
  tensor), both as raw array bytes and as Flower serialises them (np.save);
- AUROC on held-out records of the federated model, and of the same linear model
  trained centrally on the pooled records without privacy.

Usage: .venv/bin/python bench/federation.py [--rounds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array

from gateway.evaluate import auroc
from gateway.federation import model, update
from gateway.federation.ledger import FederationLog
from gateway.federation.loopback import LoopbackFleet, record_gateway
from models.features import record_dataset

ROOT = Path(__file__).resolve().parents[1]
MITDB = ROOT / "sensors" / "data" / "mitdb"
GATEWAYS = {"gw1": "105", "gw2": "108", "gw3": "116"}
HELD_OUT = ("100", "123")
SIGMA, BATCH, LR = 1.1, 64, 0.5


def serialised(encoded: update.Update) -> int:
    """Bytes of the arrays as Flower carries them (np.save, header included)."""
    return sum(len(Array(np.asarray(v)).data) for v in encoded.values())


def bytes_per_round(configs: dict[str, Path], run_id: str) -> list[dict]:
    """Per gateway and round: float32 bytes sent, and the 8-bit equivalent."""
    rows = []
    for name, config in configs.items():
        with FederationLog(config.parent / "federation.db") as ledger:
            entries = ledger.rounds()
        for entry in entries:
            kept = config.parent / "federation" / "sent"
            with np.load(kept / f"{run_id}-{entry.server_round}.npz") as f:
                sent = {k: f[k] for k in f.files}
            q = update.quantise(sent)
            rows.append(
                {
                    "gateway": name,
                    "round": entry.server_round,
                    "float32_bytes": entry.bytes_sent,
                    "float32_serialised": serialised(sent),
                    "int8_bytes": update.payload_bytes(q),
                    "int8_serialised": serialised(q),
                    "epsilon_after": round(entry.epsilon_after, 4),
                }
            )
    return rows


def held_out_auroc(score) -> dict[str, float | None]:
    out = {}
    for record in HELD_OUT:
        x, y = record_dataset(MITDB, record)
        value = auroc(score(x), y)
        out[record] = None if value is None else round(value, 4)
    return out


def central_baseline(epochs: int) -> dict[str, float | None]:
    """The same linear model on the pooled records, plain SGD, no privacy."""
    from gateway.learning import dpsgd

    parts = [record_dataset(MITDB, r) for r in GATEWAYS.values()]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    result = dpsgd.train_round(
        x, y, arch="linear", epochs=epochs, batch_size=BATCH, lr=LR, noise_multiplier=0
    )
    return held_out_auroc(lambda xs: model.scores(result.weights, xs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fed-bench-") as tmp:
        root = Path(tmp)
        configs = {n: record_gateway(root, n, r) for n, r in GATEWAYS.items()}
        started = time.monotonic()
        with LoopbackFleet(root / "fleet") as fleet:
            for name, config in configs.items():
                fleet.add_node(name, config)
            run = fleet.run(_run_config(root / "models", args))
            run.wait(timeout=1800)
        elapsed = time.monotonic() - started
        versions = json.loads((root / "models" / "manifest.json").read_text())
        final = [v for v in versions["versions"] if not v.get("skipped")][-1]
        with np.load(root / "models" / final["npz"]) as f:
            weights = {k: f[k] for k in f.files}
        figures = {
            "gateways": GATEWAYS,
            "rounds": args.rounds,
            "epochs_per_round": args.epochs,
            "noise_multiplier": SIGMA,
            "seconds": round(elapsed, 1),
            "bytes_per_round": bytes_per_round(configs, final["run_id"]),
            "auroc_federated": held_out_auroc(lambda x: model.scores(weights, x)),
            "auroc_central_no_privacy": central_baseline(args.rounds * args.epochs),
        }
    print(json.dumps(figures, indent=1))
    return 0


def _run_config(out: Path, args: argparse.Namespace) -> dict[str, object]:
    return {
        "num-server-rounds": args.rounds,
        "min-nodes": 3,
        "min-replies": 3,
        "round-timeout": 300.0,
        "epochs": args.epochs,
        "batch-size": BATCH,
        "lr": LR,
        "output-dir": str(out),
    }


if __name__ == "__main__":
    sys.exit(main())
