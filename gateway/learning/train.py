"""One on-device training round, from the store to an installed model.

The parent side of a round, free of torch: it gathers the labelled windows of the
patients who consent to training, hands them to the training child by a private
file, and installs the weights that come back as the new `current.tflite` through
the atomic, verified swap of `gateway.litert`. The privacy account is charged by
the child before it trains (see `gateway.learning.dpsgd`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway import audit, vault
from gateway.config import Config
from gateway.errors import ExitCode, GatewayError
from gateway.learning import dataset
from gateway.learning.job import run_training
from gateway.learning.privacy import BudgetExceeded, PrivacyAccount
from gateway.litert import CURRENT, install_model
from gateway.outbox import Outbox
from gateway.store import ReadingStore
from models import INITIAL_PATH, tflite_template

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, float]], None]


class NotEnoughData(GatewayError):
    """Too few labelled windows of consenting patients for a round."""

    exit_code = ExitCode.TRAINING_DATA_MISSING


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What a round did, for the terminal and the audit trail (no data).

    Attributes:
        windows: Labelled windows trained on.
        positives: Of them, windows holding a ventricular ectopic beat.
        patients: Consenting patients with labelled windows, whose windows were
            used.
        epsilon_before: The account's epsilon before the round.
        epsilon_after: ...and after it.
        epsilon_max: The cap.
        model: The installed model file.
        metrics: What the child reported (loss per epoch, noise, steps...).
    """

    windows: int
    positives: int
    patients: int
    epsilon_before: float
    epsilon_after: float
    epsilon_max: float
    model: Path
    metrics: dict[str, object]

    @property
    def epsilon_left(self) -> float:
        """Budget left after the round."""
        return max(0.0, self.epsilon_max - self.epsilon_after)


def consenting_patients(cfg: Config) -> set[str]:
    """Refs whose data may train the model, read afresh for every round.

    With a roster vault, exactly the patients recorded there as consenting to
    training (an opt-out applies from the next round on). Without one, every
    patient of the configuration, whose roster is then the consent record.

    Raises:
        KeyFileError: A vault exists but its key is missing or unsafe.
        VaultError: The vault does not decrypt.
    """
    consenting = vault.training_refs(cfg)
    if consenting is not None:
        return consenting
    return {p.ref for p in cfg.patients} | {r.patient for r in cfg.replay if r.patient}


def train_round(
    cfg: Config,
    *,
    refs: Iterable[str] | None = None,
    on_progress: Progress | None = None,
) -> RoundReport:
    """Train one DP-SGD round on the store's windows and install the result.

    Args:
        cfg: The gateway's configuration (`[learning]` holds the round settings).
        refs: Patients to train on; default: those consenting to training.
        on_progress: Called after each epoch with {"epoch", "loss", "epsilon"}.

    Raises:
        NotEnoughData: Too few labelled windows, or only one class; nothing spent.
        BudgetExceeded: The round's `round_epsilon` would cross epsilon_max;
            nothing ran.
        TrainingJobError: The training child failed (what it reserved is counted).
        ModelError: The new model failed verification; the old one stays.
    """
    learning = cfg.learning
    patients = sorted(consenting_patients(cfg) if refs is None else set(refs))
    sync_ert_labels(cfg)
    parts = dataset.training_parts(cfg.path(cfg.store.file), patients)
    x, y = dataset.joined(parts)
    _check_data(y, learning.min_windows)
    before = _spent(cfg)
    if before + learning.round_epsilon > learning.epsilon_max + 1e-9:
        # A sliver of budget would buy only noise: refuse rather than train on it.
        raise BudgetExceeded(
            learning.epsilon_max - before,
            before + learning.round_epsilon,
            learning.epsilon_max,
        )
    arrays, result = _train_in_child(
        cfg, x, y, before + learning.round_epsilon, on_progress
    )
    model = _install(cfg, arrays, x[:1], result["known_score"])
    round_id, after = _last_round(cfg)
    audit.record_training_round(cfg, round_id, after - before, after)
    log.info(
        "training round done: %d windows, epsilon %.3f -> %.3f of %g",
        len(y),
        before,
        after,
        learning.epsilon_max,
    )
    return RoundReport(
        windows=len(y),
        positives=int(y.sum()),
        patients=len(parts),
        epsilon_before=before,
        epsilon_after=after,
        epsilon_max=learning.epsilon_max,
        model=model,
        metrics=result.get("metrics", {}),
    )


def _train_in_child(
    cfg: Config,
    x: np.ndarray,
    y: np.ndarray,
    target_epsilon: float,
    on_progress: Progress | None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run the round in the training child; its weights (in template order)."""
    learning = cfg.learning
    current = cfg.path(learning.models_dir) / CURRENT
    with tempfile.TemporaryDirectory(prefix=".round-", dir=cfg.gateway.data_dir) as tmp:
        work = Path(tmp)  # mode 0700: the windows are health data
        np.savez(work / "data.npz", X=x, y=y)
        result = run_training(
            {
                "data": str(work / "data.npz"),
                "out": str(work / "weights.npz"),
                "account": str(cfg.path(learning.privacy_file)),
                "epsilon_max": learning.epsilon_max,
                "delta": learning.delta,
                "initial_model": str(current if current.exists() else INITIAL_PATH),
                "arch": learning.arch,
                "epochs": learning.epochs,
                "batch_size": learning.batch_size,
                "lr": learning.lr,
                "max_grad_norm": learning.max_grad_norm,
                "target_epsilon": target_epsilon,
            },
            on_progress=on_progress,
        )
        with np.load(result["weights"]) as weights:
            return [weights[name] for name in weights.files], result


def _install(
    cfg: Config, arrays: list[np.ndarray], known: np.ndarray, expected: float
) -> Path:
    """Write the weights into the template and swap the model in, verified."""
    models_dir = cfg.path(cfg.learning.models_dir)
    if not (models_dir / CURRENT).exists():
        # The shipped model becomes the previous one, so a rollback has a target.
        install_model(INITIAL_PATH.read_bytes(), models_dir, known_window=known)
    return install_model(
        tflite_template.with_weights(cfg.learning.arch, arrays),
        models_dir,
        known_window=known,
        expected_score=expected,
    )


def sync_ert_labels(cfg: Config) -> int:
    """Copy the ERT's verdicts on rhythm alerts from the outbox into the store.

    Returns:
        The number of label spans written (re-writing one replaces it).

    Raises:
        StoreError: The outbox or the store cannot be read or written.
    """
    outbox_path = cfg.path(cfg.alerts.outbox_file)
    if not outbox_path.exists():
        return 0
    outbox = Outbox(outbox_path)
    try:
        spans = dataset.ert_labels(outbox.list_alerts(limit=1_000_000))
    finally:
        outbox.close()
    if spans:
        with ReadingStore(cfg.path(cfg.store.file)) as store:
            store.add_labels(spans)
    return len(spans)


def _check_data(y: np.ndarray, min_windows: int) -> None:
    if len(y) < min_windows:
        raise NotEnoughData(
            f"{len(y)} labelled windows of consenting patients; a round needs "
            f"{min_windows} ([learning] min_windows)"
        )
    if y.min() == y.max():
        raise NotEnoughData(
            "the labelled windows are all of one class; a round needs both "
            "irregular and regular rhythm"
        )


def account(cfg: Config) -> PrivacyAccount:
    """The gateway's privacy account, as configured in `[learning]` (close it)."""
    learning = cfg.learning
    return PrivacyAccount(
        cfg.path(learning.privacy_file),
        epsilon_max=learning.epsilon_max,
        delta=learning.delta,
    )


def _spent(cfg: Config) -> float:
    with account(cfg) as gateway_account:
        return gateway_account.spent()


def _last_round(cfg: Config) -> tuple[int, float]:
    """The id of the account's latest round, and the epsilon after it."""
    with account(cfg) as gateway_account:
        return gateway_account.history()[-1].id, gateway_account.spent()
