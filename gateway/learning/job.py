"""Run a DP-SGD round in a child process so torch never enters the agent.

The parent starts `python -m gateway.learning.job`, writes the config as JSON on its
stdin, and reads one JSON object per line from its stdout: progress lines
(`{"epoch", "loss", "epsilon"}`), then one `{"result": ...}` or `{"error": ...}`.
The training data goes by file (`data`: an .npz with arrays X and y), never
through a pipe or a log; the weights come back as an .npz path.

Config keys: data, out (weights .npz path), account (SQLite path), epsilon_max,
delta, initial (optional .npz of starting weights, named as the result's) or
initial_model (a .tflite whose weights start the round), and
the keyword arguments of `gateway.learning.dpsgd.train_round` (arch,
loss, epochs, batch_size, lr, noise_multiplier or target_epsilon, max_grad_norm).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.learning.privacy import BudgetExceeded, PrivacyAccount

log = logging.getLogger(__name__)

_TRAIN_KEYS = (
    "arch",
    "loss",
    "epochs",
    "batch_size",
    "lr",
    "noise_multiplier",
    "target_epsilon",
    "max_grad_norm",
)


class TrainingJobError(GatewayError):
    """The training child failed; the account still counts what it reserved."""


def run_training(
    config: dict[str, Any],
    *,
    on_progress: Callable[[dict[str, float]], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Train one round in a child process and return its result.

    Returns:
        {"weights": path of the .npz, "metrics": {...}}.

    Raises:
        BudgetExceeded: If the round would cross the privacy cap (not started).
        TrainingJobError: If the child fails or ends without a result.
    """
    with subprocess.Popen(
        [sys.executable, "-m", "gateway.learning.job"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        child.stdin.write(json.dumps(config))
        child.stdin.close()
        final = _read_lines(child.stdout, on_progress)
        child.wait(timeout=timeout)
        stderr = child.stderr.read()
    return _outcome(final, child.returncode, stderr)


def _read_lines(stream, on_progress) -> dict[str, Any] | None:
    """Forward progress lines; return the final result or error line."""
    for line in stream:
        message = json.loads(line)
        if "epoch" in message:
            if on_progress is not None:
                on_progress(message)
            continue
        return message
    return None


def _outcome(final: dict | None, code: int, stderr: str) -> dict[str, Any]:
    """Turn the child's last line and exit status into a result or an error."""
    if final is not None and "result" in final:
        return final["result"]
    if final is not None and final.get("error") == "budget":
        raise BudgetExceeded(final["left"], final["would_be"], final["epsilon_max"])
    # Only the last stderr line: a traceback's exception, never a data dump.
    reason = (final or {}).get("message") or (stderr.strip().splitlines() or ["?"])[-1]
    log.warning("training child failed with exit status %d", code)
    raise TrainingJobError(f"training child exited with status {code}: {reason}")


def _child(config: dict[str, Any], emit: Callable[[dict], None]) -> None:
    """The child's work: load data, train, save weights, emit the result."""
    # Imported here, not at the top: numpy and torch belong to the child only.
    import numpy as np

    from gateway.learning import dpsgd

    with np.load(config["data"]) as data:
        X, y = data["X"], data["y"]
    account = PrivacyAccount(
        Path(config["account"]),
        epsilon_max=config["epsilon_max"],
        delta=config["delta"],
    )
    kwargs = {k: config[k] for k in _TRAIN_KEYS if k in config}
    if config.get("initial"):
        with np.load(config["initial"]) as initial:
            kwargs["initial"] = {name: initial[name] for name in initial.files}
    elif config.get("initial_model"):
        kwargs["initial"] = _weights_of_model(
            Path(config["initial_model"]), kwargs.get("arch", "linear"), X.shape[1]
        )

    def progress(epoch: int, loss: float, eps: float) -> None:
        emit({"epoch": epoch, "loss": loss, "epsilon": eps})

    try:
        result = dpsgd.train_round(X, y, account=account, progress=progress, **kwargs)
    finally:
        account.close()
    np.savez(config["out"], **result.weights)
    known = _twin_score(result.weights, kwargs.get("arch", "linear"), X[:1])
    emit(
        {
            "result": {
                "weights": str(config["out"]),
                "metrics": result.metrics,
                "known_score": known,
            }
        }
    )


def _weights_of_model(path: Path, arch: str, n_features: int) -> dict[str, Any]:
    """A .tflite model's weights, named as the torch twin's state dict."""
    from models import tflite_template, twins

    model = twins.build(arch, n_features)
    twins.load_weights(model, tflite_template.weights_of(path.read_bytes()))
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def _twin_score(weights: dict[str, Any], arch: str, window: Any) -> float:
    """The torch twin's score of one window: what the .tflite must reproduce."""
    import torch

    from models import twins

    model = twins.build(arch, window.shape[1])
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    return float(twins.scores(model, window)[0])


def main() -> int:
    """Entry point of the child: config on stdin, JSON lines on stdout."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def emit(message: dict) -> None:
        print(json.dumps(message), flush=True)

    try:
        _child(json.load(sys.stdin), emit)
    except BudgetExceeded as error:
        emit(
            {
                "error": "budget",
                "left": error.left,
                "would_be": error.would_be,
                "epsilon_max": error.epsilon_max,
            }
        )
        return 3
    except GatewayError as error:
        emit({"error": type(error).__name__, "message": str(error)})
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
