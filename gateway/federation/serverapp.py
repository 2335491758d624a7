"""The aggregator's Flower ServerApp (Message API), run by `flower-superlink`.

Each round it asks every connected SuperNode for one local round, waits at most
`round-timeout` seconds, and averages the updates that came back, weighted by
their examples (FedAvg on deltas: new = global + sum n_i d_i / sum n_i). A node
that died or refused (budget spent, no data) is left out; with fewer than
`min-replies` updates the round is skipped and the global model stays as it was.
Every new global model is saved as a version (.npz and .tflite) with a manifest;
the gateways get it with the next round's message, and a last message after the
final round, and install it with `gateway.litert.install_model`.

Optional central DP (`central-dp = true`, off by default) wraps FedAvg in Flower's
`DifferentialPrivacyClientSideFixedClipping`; the gateways apply its
`fixedclipping_mod`. Its noise comes from numpy's global, non-cryptographic
generator and Flower's accountant restarts with every run, so its epsilon is
never reported: each gateway's own account is the one that counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from gateway.federation import model, update
from models.features import N_FEATURES

log = logging.getLogger(__name__)

app = ServerApp()

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Settings:
    """The run config of the app (`[tool.flwr.app.config]`, `flwr run -c`)."""

    rounds: int
    min_nodes: int
    min_replies: int
    round_timeout: float
    node_wait: float
    arch: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    output_dir: Path
    central_dp: bool
    central_noise: float
    central_clip: float

    @classmethod
    def from_run_config(cls, run: dict) -> Settings:
        """Read the settings; every key has a default in the app's pyproject."""
        return cls(
            rounds=int(run["num-server-rounds"]),
            min_nodes=int(run["min-nodes"]),
            min_replies=int(run["min-replies"]),
            round_timeout=float(run["round-timeout"]),
            node_wait=float(run["node-wait"]),
            arch=str(run["arch"]),
            epochs=int(run["epochs"]),
            batch_size=int(run["batch-size"]),
            lr=float(run["lr"]),
            seed=int(run["seed"]),
            output_dir=Path(str(run["output-dir"])).expanduser(),
            central_dp=bool(run["central-dp"]),
            central_noise=float(run["central-noise"]),
            central_clip=float(run["central-clip"]),
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds and save each global model."""
    settings = Settings.from_run_config(dict(context.run_config))
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    weights = model.initial(settings.arch, N_FEATURES, settings.seed)
    manifest = Manifest(settings.output_dir, str(grid.run.run_id))
    version = 0
    for server_round in range(1, settings.rounds + 1):
        nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait)
        replies = grid.send_and_receive(
            train_messages(settings, weights, version, server_round, nodes),
            timeout=settings.round_timeout,
        )
        new = aggregate(settings, weights, server_round, replies)
        if new is None:
            manifest.skipped(server_round, len(nodes))
            continue
        weights, version = new[0], version + 1
        manifest.save(version, server_round, settings.arch, weights, new[1])
    broadcast_final(grid, settings, weights, version)


def wait_for_nodes(grid: Grid, minimum: int, wait: float) -> list[int]:
    """Node ids connected now, waiting up to `wait` s for `minimum` of them."""
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


def train_messages(
    settings: Settings,
    weights: model.Weights,
    version: int,
    server_round: int,
    nodes: list[int],
) -> list[Message]:
    """One train message per node: the global weights and the round's plan."""
    config = ConfigRecord(
        {
            "server-round": server_round,
            "model-version": version,
            "arch": settings.arch,
            "epochs": settings.epochs,
            "batch-size": settings.batch_size,
            "lr": settings.lr,
        }
    )
    if settings.central_dp:
        config["clipping_norm"] = settings.central_clip
    content = RecordDict({"arrays": _record(weights), "config": config})
    return [
        Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
        for node in nodes
    ]


def aggregate(
    settings: Settings,
    weights: model.Weights,
    server_round: int,
    replies,
) -> tuple[model.Weights, dict] | None:
    """The new global weights and round facts, or None to skip the round."""
    good = [r for r in replies if not r.has_error()]
    for reply in replies:
        if reply.has_error():
            log.info(
                "round %d: node %d sat out (code %d)",
                server_round,
                reply.metadata.src_node_id,
                reply.error.code,
            )
    if len(good) < settings.min_replies:
        log.warning(
            "round %d skipped: %d updates, %d needed",
            server_round,
            len(good),
            settings.min_replies,
        )
        return None
    examples = [int(r.content["metrics"]["num-examples"]) for r in good]
    if settings.central_dp:
        new = _central_dp(settings, weights, server_round, good)
    else:
        deltas = [update.decode(_arrays(r.content["update"])) for r in good]
        new = update.apply(weights, deltas, [float(n) for n in examples])
    facts = {
        "nodes": sorted(int(r.metadata.src_node_id) for r in good),
        "examples": sum(examples),
        "bytes_received": sum(_reply_bytes(r) for r in good),
    }
    log.info(
        "round %d aggregated: %d updates, %d bytes",
        server_round,
        len(good),
        facts["bytes_received"],
    )
    return new, facts


def _central_dp(settings, weights, server_round, good) -> model.Weights:
    """FedAvg of clipped full weights plus Flower's central Gaussian noise."""
    strategy = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_evaluate=0.0),
        noise_multiplier=settings.central_noise,
        clipping_norm=settings.central_clip,
        num_sampled_clients=len(good),
    )
    arrays, _ = strategy.aggregate_train(server_round, good)
    return {k: np.asarray(v, dtype=np.float32) for k, v in _arrays(arrays).items()}


def broadcast_final(
    grid: Grid, settings: Settings, weights: model.Weights, version: int
) -> None:
    """Send the last global model to every node so it is installed now."""
    if version == 0:
        return
    config = ConfigRecord({"model-version": version, "arch": settings.arch})
    content = RecordDict({"arrays": _record(weights), "config": config})
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in sorted(grid.get_node_ids())
    ]
    replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
    installed = sum(1 for r in replies if not r.has_error())
    log.info("global model %d sent to %d nodes", version, installed)


class Manifest:
    """The output directory's manifest.json: one entry per saved version."""

    def __init__(self, directory: Path, run_id: str) -> None:
        self.directory = directory
        self.run_id = run_id
        self.path = directory / MANIFEST
        self.entries = (
            json.loads(self.path.read_text())["versions"] if self.path.exists() else []
        )

    def save(
        self, version: int, server_round: int, arch: str, weights, facts: dict
    ) -> None:
        """Write version `version` as .npz and .tflite and list it."""
        stem = f"global-{self.run_id}-v{version:04d}"
        np.savez(self.directory / f"{stem}.npz", **weights)
        tflite = model.to_tflite(arch, weights)
        (self.directory / f"{stem}.tflite").write_bytes(tflite)
        entry = {
            "run_id": self.run_id,
            "version": version,
            "round": server_round,
            "arch": arch,
            "npz": f"{stem}.npz",
            "tflite": f"{stem}.tflite",
            "tflite_sha256": hashlib.sha256(tflite).hexdigest(),
            **facts,
        }
        self._append(entry)

    def skipped(self, server_round: int, nodes: int) -> None:
        """List a round that produced no new version."""
        self._append(
            {
                "run_id": self.run_id,
                "round": server_round,
                "skipped": True,
                "nodes_asked": nodes,
            }
        )

    def _append(self, entry: dict) -> None:
        self.entries.append(entry)
        staged = self.path.with_suffix(".tmp")
        staged.write_text(json.dumps({"versions": self.entries}, indent=1))
        staged.replace(self.path)


def _record(weights: model.Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()})


def _arrays(record: ArrayRecord) -> update.Update:
    return {name: array.numpy() for name, array in record.items()}


def _reply_bytes(reply: Message) -> int:
    """Bytes of array data in a reply, as serialised on the wire."""
    return sum(len(a.data) for a in reply.content["update"].values())
