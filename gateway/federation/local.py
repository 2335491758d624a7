"""One federated round on the gateway, without Flower: train, bound, log.

`gateway.federation.clientapp` turns a Flower message into a `RoundPlan` and the
global weights, calls `run_round`, and turns the `LocalUpdate` back into a reply.
The round trains in the learning job's child process and charges the gateway's
own cumulative privacy account (`[learning] privacy_file`), exactly as a local
round does; Flower's own accountant is never used.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway import audit
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.federation import model, update
from gateway.federation.ledger import FederationLog
from gateway.learning import dataset, job
from gateway.learning.privacy import BudgetExceeded
from gateway.learning.train import account
from models import features

log = logging.getLogger(__name__)

MIN_EXAMPLES = 32
"""Fewer labelled windows than this and the gateway sits a round out."""


class NoTrainingData(GatewayError):
    """The gateway has too few labelled windows of consenting patients to train."""

    def __init__(self, windows: int) -> None:
        self.windows = windows
        super().__init__(
            f"{windows} labelled windows, fewer than {MIN_EXAMPLES}: this gateway "
            "sits the round out until it has more data of consenting patients"
        )


@dataclass(frozen=True)
class RoundPlan:
    """What the aggregator asks for in one round."""

    run_id: str
    server_round: int
    model_version: int
    arch: str
    epochs: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class LocalUpdate:
    """What goes upstream: the encoded update, its weight, and epsilon so far."""

    encoded: update.Update
    examples: int
    epsilon: float
    sha256: str
    bytes_sent: int


def run_round(
    cfg: Config, plan: RoundPlan, global_weights: model.Weights
) -> LocalUpdate:
    """Train from the global weights and return the bounded update.

    Raises:
        BudgetExceeded: The round would cross `epsilon_max`; nothing ran.
        NoTrainingData: Too few labelled windows; nothing ran.
        TrainingJobError: The training child failed.
    """
    x, y = training_data(cfg)
    if len(y) < MIN_EXAMPLES:
        raise NoTrainingData(len(y))
    install_global(cfg, plan.model_version, plan.arch, global_weights)
    local = _train(cfg, plan, global_weights, x, y)
    delta = {k: local[k] - global_weights[k] for k in global_weights}
    fed = cfg.federation
    encoded = update.prepare(
        delta,
        bound=fed.update_clip,
        noise=fed.update_noise,
        quantise_8bit=fed.quantise_8bit,
    )
    return _finish(cfg, plan, encoded, len(y))


def training_data(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Labelled windows of the patients who consent to training."""
    from gateway import vault

    refs = vault.training_refs(cfg)
    if refs is None:
        refs = {p.ref for p in cfg.patients}
    return dataset.training_set(cfg.path(cfg.store.file), refs)


def _train(
    cfg: Config,
    plan: RoundPlan,
    global_weights: model.Weights,
    x: np.ndarray,
    y: np.ndarray,
) -> model.Weights:
    """One DP-SGD round in the learning job's child, from the global weights."""
    work = cfg.path(cfg.federation.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="round-", dir=work))
    try:
        np.savez(scratch / "data.npz", X=x, y=y)
        np.savez(scratch / "global.npz", **global_weights)
        result = job.run_training(_job_config(cfg, plan, scratch))
        with np.load(result["weights"]) as trained:
            return {name: trained[name] for name in trained.files}
    finally:
        # The scratch files hold training windows: never leave them behind.
        shutil.rmtree(scratch, ignore_errors=True)


def _job_config(cfg: Config, plan: RoundPlan, scratch: Path) -> dict:
    learning, fed = cfg.learning, cfg.federation
    return {
        "data": str(scratch / "data.npz"),
        "initial": str(scratch / "global.npz"),
        "out": str(scratch / "local.npz"),
        "account": str(cfg.path(learning.privacy_file)),
        "epsilon_max": learning.epsilon_max,
        "delta": learning.delta,
        "arch": plan.arch,
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "lr": plan.lr,
        "noise_multiplier": fed.noise_multiplier,
        "max_grad_norm": fed.max_grad_norm,
    }


def _finish(
    cfg: Config, plan: RoundPlan, encoded: update.Update, examples: int
) -> LocalUpdate:
    """Log the round, keep a copy if asked, and package the update."""
    sent = LocalUpdate(
        encoded=encoded,
        examples=examples,
        epsilon=spent(cfg),
        sha256=update.digest(encoded),
        bytes_sent=update.payload_bytes(encoded),
    )
    with FederationLog(cfg.path(cfg.federation.log_file)) as ledger:
        ledger.record(
            run_id=plan.run_id,
            server_round=plan.server_round,
            outcome="sent",
            bytes_sent=sent.bytes_sent,
            update_sha256=sent.sha256,
            examples=examples,
            epsilon_after=sent.epsilon,
            model_version=plan.model_version,
        )
    _audit(cfg, plan, sent)
    if cfg.federation.keep_sent_updates:
        kept = cfg.path(cfg.federation.work_dir) / "sent"
        kept.mkdir(parents=True, exist_ok=True)
        name = f"{plan.run_id}-{plan.server_round}.npz"
        np.savez(kept / name, **{k.replace("/", "|"): v for k, v in encoded.items()})
    log.info(
        "federated round %d: %d bytes sent, weight %d",
        plan.server_round,
        sent.bytes_sent,
        examples,
    )
    return sent


def _audit(cfg: Config, plan: RoundPlan, sent: LocalUpdate) -> None:
    """The local training round and the update that left, in the audit trail."""
    with account(cfg) as gateway_account:
        rounds = gateway_account.history()
    this, before = rounds[-1], (rounds[-2].epsilon_after if len(rounds) > 1 else 0.0)
    audit.record_training_round(
        cfg, this.id, this.epsilon_after - before, this.epsilon_after
    )
    with audit.AuditLog.for_config(cfg) as trail:
        trail.record(
            "update.sent",
            details={
                "run": plan.run_id,
                "server_round": plan.server_round,
                "training_round": this.id,
                "sha256": sent.sha256,
                "bytes": sent.bytes_sent,
                "epsilon_total": this.epsilon_after,
            },
        )


def record_refusal(cfg: Config, plan: RoundPlan, outcome: str) -> None:
    """Log a round the gateway sat out ('budget' or 'no-data')."""
    with FederationLog(cfg.path(cfg.federation.log_file)) as ledger:
        ledger.record(
            run_id=plan.run_id,
            server_round=plan.server_round,
            outcome=outcome,
            bytes_sent=0,
            update_sha256=None,
            examples=0,
            epsilon_after=spent(cfg),
            model_version=plan.model_version,
        )


def spent(cfg: Config) -> float:
    """Cumulative epsilon of the gateway's privacy account."""
    with account(cfg) as gateway_account:
        return gateway_account.spent()


def install_global(
    cfg: Config, version: int, arch: str, weights: model.Weights
) -> bool:
    """Install a global model if it is newer than the installed one.

    Version 0 is the aggregator's random start: it never replaces a model. The
    new model must score a steady 75 bpm window as the numpy twin does.

    Returns:
        True if it was installed.

    Raises:
        ModelError: The model failed verification; the current one stays.
    """
    from gateway import litert

    with FederationLog(cfg.path(cfg.federation.log_file)) as ledger:
        installed = ledger.installed_version()
        if version < 1 or (installed or 0) >= version:
            return False
        known = features.features(np.full(features.WINDOW_BEATS, 800.0))[0]
        litert.install_model(
            model.to_tflite(arch, weights),
            cfg.path(cfg.learning.models_dir),
            known_window=known,
            expected_score=float(model.scores(weights, known)[0]),
        )
        ledger.set_installed(version)
    log.info("global model version %d installed", version)
    return True


__all__ = [
    "BudgetExceeded",
    "LocalUpdate",
    "NoTrainingData",
    "RoundPlan",
    "install_global",
    "record_refusal",
    "run_round",
]
