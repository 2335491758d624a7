"""The gateway's Flower ClientApp (Message API), launched by `flower-supernode`.

The SuperNode is started with the gateway's configuration file in its node config
(``--node-config 'gateway-config="/etc/iomt-gateway/gateway.toml"'``). On a train
message the app runs one DP-SGD round through the learning job and replies with:

- ArrayRecord "update": the model delta, clipped, noised and quantised as
  `[federation]` says (see `gateway.federation.update`), or, when the aggregator
  runs Flower's central DP, the global weights plus that clipped delta (what
  Flower's `fixedclipping_mod` expects to clip again);
- MetricRecord "metrics": num-examples and epsilon-spent (the gateway's own
  cumulative epsilon), nothing else.

No readings, patient refs or device addresses leave. A gateway whose budget is
spent, or that has too little data, replies with an error the aggregator drops.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from gateway.config import load_config
from gateway.federation import local, update
from gateway.federation.local import NoTrainingData, RoundPlan
from gateway.learning.privacy import BudgetExceeded

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "gateway-config"
"""Node-config key naming the gateway's TOML configuration file."""

CLIPPING_NORM_KEY = "clipping_norm"
"""Config key Flower's DifferentialPrivacyClientSideFixedClipping sets."""

ERROR_BUDGET = 61
ERROR_NO_DATA = 62
"""Error codes of the replies of a gateway that sits a round out."""


def central_dp_mod(msg: Message, context: Context, call_next):
    """Apply Flower's `fixedclipping_mod` only when the aggregator asked for it."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and (
        config is not None and CLIPPING_NORM_KEY in config
    ):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[central_dp_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one federated round on this gateway and reply with its update."""
    cfg = load_config(str(context.node_config[NODE_CONFIG_KEY]))
    plan = round_plan(msg, context)
    global_weights = {
        name: array.numpy() for name, array in msg.content["arrays"].items()
    }
    try:
        sent = local.run_round(cfg, plan, global_weights)
    except BudgetExceeded as error:
        local.record_refusal(cfg, plan, "budget")
        log.warning("round %d refused: privacy budget spent", plan.server_round)
        return Message(Error(ERROR_BUDGET, str(error)), reply_to=msg)
    except NoTrainingData as error:
        local.record_refusal(cfg, plan, "no-data")
        log.warning("round %d skipped: %d windows", plan.server_round, error.windows)
        return Message(Error(ERROR_NO_DATA, str(error)), reply_to=msg)
    return Message(reply_content(msg, sent, global_weights), reply_to=msg)


def round_plan(msg: Message, context: Context) -> RoundPlan:
    """The round's settings from the train message's ConfigRecord."""
    config: ConfigRecord = msg.content["config"]
    return RoundPlan(
        run_id=str(context.run_id),
        server_round=int(config["server-round"]),
        model_version=int(config["model-version"]),
        arch=str(config["arch"]),
        epochs=int(config["epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
    )


def reply_content(
    msg: Message, sent: local.LocalUpdate, global_weights: update.Update
) -> RecordDict:
    """The reply: the update (or global + update under central DP) and metrics."""
    config = msg.content["config"]
    if CLIPPING_NORM_KEY in config:
        # Flower's mod clips (reply - global) again and keeps the keys it sent.
        delta = update.decode(sent.encoded)
        arrays = {k: global_weights[k] + delta[k] for k in global_weights}
    else:
        arrays = sent.encoded
    metrics = MetricRecord(
        {"num-examples": sent.examples, "epsilon-spent": float(sent.epsilon)}
    )
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return RecordDict({"update": record, "metrics": metrics})


@app.evaluate()
def install(msg: Message, context: Context) -> Message:
    """Install the aggregator's final global model (sent after the last round)."""
    cfg = load_config(str(context.node_config[NODE_CONFIG_KEY]))
    config = msg.content["config"]
    version = int(config["model-version"])
    weights = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    local.install_global(cfg, version, str(config["arch"]), weights)
    metrics = MetricRecord({"installed-version": version, "num-examples": 0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
