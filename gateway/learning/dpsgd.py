"""One DP-SGD training round with opacus: the only module importing torch/opacus.

It runs in the training child process (`gateway.learning.job`), never in the agent.
Privacy choices, and why:

- Poisson sampling, so the sampling rate the account composes is the one the
  batches were really drawn with (the RDP analysis assumes it).
- Noise and sampling generators are seeded from the OS CSPRNG: opacus'
  `secure_mode` is not installable and torch's default seed is guessable.
- The round is reserved in the account with its planned steps BEFORE training, so a
  crash mid-round over-counts rather than under-counts.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gateway.errors import GatewayError
from gateway.learning import privacy
from gateway.learning.privacy import PrivacyAccount, noise_for_target
from models import twins

log = logging.getLogger(__name__)

Progress = Callable[[int, float, float], None]
"""Called after each epoch: (epoch, loss on the training set, epsilon so far)."""


class UnsupportedModelError(GatewayError):
    """The model cannot be trained with per-sample gradients (DP-SGD).

    Attributes:
        problems: One line per offending layer.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listed = "; ".join(problems)
        super().__init__(
            f"model refused for DP-SGD: {listed}; use GroupNorm/LayerNorm instead of "
            "BatchNorm and activations with inplace=False"
        )


@dataclass
class RoundResult:
    """What a round hands back: trained weights and metrics, no data."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float | int | list[float]] = field(default_factory=dict)


@dataclass
class PrivateParts:
    """The opacus-wrapped model, optimizer and Poisson loader of one round."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    sample_rate: float
    steps_per_epoch: int


def csprng_generator() -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS CSPRNG."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def validate_model(model: nn.Module) -> None:
    """Refuse models whose per-sample gradients opacus cannot compute.

    Raises:
        UnsupportedModelError: On BatchNorm and other layers opacus rejects, or on
            in-place activations (they overwrite what the per-sample hooks keep).
    """
    problems = [
        f"{name or 'model'}: in-place {type(m).__name__}"
        for name, m in model.named_modules()
        if getattr(m, "inplace", False)
    ]
    try:
        ModuleValidator.validate(model, strict=True)
    except UnsupportedModuleError as error:
        problems = [str(e) for e in error.args[0]] + problems
    if problems:
        raise UnsupportedModelError(problems)


def sampling_plan(n: int, batch_size: int) -> tuple[float, int]:
    """Poisson sampling rate and steps per epoch as opacus derives them.

    opacus draws len(loader) = ceil(n / batch_size) batches with q = 1 / that.
    """
    steps = math.ceil(n / batch_size)
    return 1.0 / steps, steps


def make_private(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
) -> PrivateParts:
    """Wrap model, optimizer and a Poisson-sampled loader for DP-SGD.

    Raises:
        UnsupportedModelError: If the model cannot be trained privately.
    """
    validate_model(model)
    loader = _loader(X, y, batch_size, shuffle=False)
    with warnings.catch_warnings():
        # We seed every generator from the OS CSPRNG ourselves (see module doc),
        # which is what the warning about secure_mode being off asks for.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=csprng_generator(),
    )
    sample_rate, steps = sampling_plan(len(X), batch_size)
    assert math.isclose(loader.sample_rate, sample_rate), "opacus changed its plan"
    return PrivateParts(model, optimizer, loader, engine, sample_rate, steps)


def _loader(X: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool):
    data = TensorDataset(
        torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    )
    # The Poisson sampler inherits this generator: it decides who is in a batch.
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=csprng_generator()
    )


def train_round(
    X: np.ndarray,
    y: np.ndarray,
    *,
    arch: str = "linear",
    loss: str = "logistic",
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    max_grad_norm: float = 1.0,
    account: PrivacyAccount | None = None,
    progress: Progress | None = None,
    initial: dict[str, np.ndarray] | None = None,
) -> RoundResult:
    """Train a twin for `epochs` epochs with DP-SGD, charging `account`.

    `batch_size` is the expected batch size: batches are Poisson-sampled with
    q = 1 / ceil(n / batch_size). Give either `noise_multiplier` or
    `target_epsilon` (the cumulative epsilon, history included, to stay under).
    `noise_multiplier=0` trains without noise or clipping, for baselines only; it
    spends nothing and needs no account. `initial` (named as `RoundResult.weights`)
    starts from those weights, e.g. a federated global model, instead of a fresh
    random initialisation.

    Raises:
        BudgetExceeded: If the round would cross the account's cap; not started.
        UnsupportedModelError: If the model cannot be trained privately.
        ValueError: On a missing account or noise setting.
    """
    model = twins.build(arch, X.shape[1])
    if initial is not None:
        _load_initial(model, initial)
    if noise_multiplier == 0:
        return _train_baseline(model, X, y, loss, epochs, batch_size, lr, progress)
    if account is None or (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "DP-SGD needs an account and one of noise_multiplier or target_epsilon"
        )

    q, per_epoch = sampling_plan(len(X), batch_size)
    planned = epochs * per_epoch
    if noise_multiplier is None:
        target = min(target_epsilon, account.epsilon_max)
        noise_multiplier = noise_for_target(
            account.mechanisms(), q, planned, target=target, delta=account.delta
        )
    parts = make_private(
        model,
        X,
        y,
        batch_size=batch_size,
        lr=lr,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )
    round_id = account.reserve(noise_multiplier, q, planned)
    return _train_private(parts, X, y, loss, epochs, account, round_id, progress)


def _load_initial(model: nn.Module, initial: dict[str, np.ndarray]) -> None:
    """Start from `initial`; raises ValueError if names or shapes do not match."""
    tensors = {
        k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in initial.items()
    }
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"initial weights do not fit the model: {exc}") from exc


def _train_private(
    parts: PrivateParts,
    X: np.ndarray,
    y: np.ndarray,
    loss: str,
    epochs: int,
    account: PrivacyAccount,
    round_id: int,
    progress: Progress | None,
) -> RoundResult:
    """Run the reserved round; record the steps that really ran, even on failure."""
    criterion, steps, losses = twins.loss_fn(loss), 0, []
    try:
        for epoch in range(1, epochs + 1):
            losses.append(_epoch(parts.model, parts.optimizer, parts.loader, criterion))
            steps += parts.steps_per_epoch
            so_far = _epsilon_so_far(account, round_id, parts.sample_rate, steps)
            _report(progress, epoch, _evaluate(parts.model, X, y, criterion), so_far)
    except BaseException:
        account.abort(round_id, steps)
        raise
    spent = account.finish(round_id, steps)
    sigma = parts.optimizer.noise_multiplier
    log.info("DP-SGD round %d done: %d steps, epsilon %.3f", round_id, steps, spent)
    metrics = _metrics(losses, steps, len(X))
    metrics |= {"epsilon": spent, "noise_multiplier": sigma, "round_id": round_id}
    metrics["sample_rate"] = parts.sample_rate
    # opacus' own accountant on the same orders, as a cross-check of this round.
    metrics["epsilon_round_opacus"] = parts.engine.accountant.get_epsilon(
        account.delta, alphas=list(privacy.ORDERS)
    )
    return RoundResult(_weights(parts.model), metrics)


def _train_baseline(model, X, y, loss, epochs, batch_size, lr, progress):
    """Plain SGD without clipping or noise: a baseline that spends no epsilon."""
    criterion, losses = twins.loss_fn(loss), []
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = _loader(X, y, batch_size, shuffle=True)
    for epoch in range(1, epochs + 1):
        losses.append(_epoch(model, optimizer, loader, criterion))
        _report(progress, epoch, _evaluate(model, X, y, criterion), 0.0)
    metrics = _metrics(losses, epochs * len(loader), len(X))
    metrics |= {"epsilon": 0.0, "noise_multiplier": 0.0}
    log.info("baseline round done: %d steps, not private", metrics["steps"])
    return RoundResult(_weights(model), metrics)


def _epoch(model, optimizer, loader, criterion) -> float:
    """One pass over the loader; every batch steps, even an empty Poisson one."""
    model.train()
    total, count = 0.0, 0
    for xb, yb in loader:
        optimizer.zero_grad()
        batch_loss = criterion(model(xb).squeeze(-1), yb)
        with warnings.catch_warnings():
            # opacus' hooks on the first layer need only the output gradients;
            # torch warns because the data (rightly) does not require grad.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            batch_loss.backward()
        # The step must follow its backward directly: opacus keeps per-sample
        # gradients between them, and the accountant counts this step.
        optimizer.step()
        if len(yb):
            total += float(batch_loss.detach()) * len(yb)
            count += len(yb)
    return total / count if count else float("nan")


def _evaluate(model: nn.Module, X, y, criterion) -> float:
    """Loss on (X, y) in eval mode without gradients: safe between epochs only."""
    model.eval()
    with torch.no_grad():
        xs = torch.as_tensor(X, dtype=torch.float32)
        value = float(criterion(model(xs).squeeze(-1), torch.as_tensor(y).float()))
    model.train()
    return value


def _epsilon_so_far(account, round_id, sample_rate, steps) -> float:
    """Cumulative epsilon counting only the steps of this round run so far."""
    others = account.mechanisms(exclude=round_id)
    mechanism = (account_sigma(account, round_id), sample_rate, steps)
    return privacy.epsilon([*others, mechanism], account.delta)


def account_sigma(account: PrivacyAccount, round_id: int) -> float:
    """The noise multiplier a round was reserved with."""
    return next(r.noise_multiplier for r in account.history() if r.id == round_id)


def _report(progress: Progress | None, epoch: int, loss: float, eps: float) -> None:
    log.debug("epoch %d done", epoch)
    if progress is not None:
        progress(epoch, loss, eps)


def _metrics(losses: list[float], steps: int, n: int) -> dict:
    return {"train_losses": losses, "steps": steps, "n_samples": n}


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Trained parameters as numpy arrays, named as in the unwrapped twin."""
    inner = getattr(model, "_module", model)
    return {k: v.detach().cpu().numpy().copy() for k, v in inner.state_dict().items()}
