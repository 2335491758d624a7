"""`iomt-gateway federation status`: the last rounds, the model, the epsilon."""

from __future__ import annotations

import json

from gateway.config import Config
from gateway.federation import local
from gateway.federation.ledger import FederationLog


def status(cfg: Config, last: int = 10) -> dict[str, object]:
    """The gateway's federation state as JSON-ready data."""
    with FederationLog(cfg.path(cfg.federation.log_file)) as ledger:
        rounds = ledger.rounds(last)
        version = ledger.installed_version()
    learning = cfg.learning
    return {
        "model_version": version,
        "epsilon_spent": local.spent(cfg),
        "epsilon_max": learning.epsilon_max,
        "delta": learning.delta,
        "rounds": [r.as_dict() for r in rounds],
    }


def print_status(cfg: Config, *, last: int = 10, as_json: bool = False) -> None:
    """Print the status as text, or as one JSON object."""
    state = status(cfg, last)
    if as_json:
        print(json.dumps(state))
        return
    version = state["model_version"]
    print(
        f"model version {'none' if version is None else version} installed; "
        f"epsilon spent {state['epsilon_spent']:.3f} of {state['epsilon_max']:g} "
        f"(delta {state['delta']:g})"
    )
    for r in state["rounds"]:
        print(
            f"run {r['run_id']} round {r['server_round']}  {r['outcome']:<7}  "
            f"{r['bytes_sent']} bytes  weight {r['examples']}  "
            f"epsilon after {r['epsilon_after']:.3f}"
        )
