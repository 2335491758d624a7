"""Model definitions for on-device learning (see models/README.md).

* `models.features`: RR windows to feature vectors (numpy only; the agent and the
  training job share it).
* `models.twins`: the torch twins trained with DP-SGD.
* `models.tflite_template`: the same models written as .tflite flatbuffers.
* `models/initial.tflite`: the shipped model, made by `build_initial()`.

Importing this package does not import torch; `build_initial` does.
"""

from __future__ import annotations

from pathlib import Path

INITIAL_PATH = Path(__file__).with_name("initial.tflite")
"""The shipped initial model."""

INITIAL_ARCH = "linear"
INITIAL_SEED = 20240611
INITIAL_STEPS = 400
INITIAL_RECORDS = ("102", "104", "105", "108", "114", "116", "121")
"""MIT-BIH records the initial model learns from: all shared ones but 100 and 123,
which are left out for the demo."""


def build_initial(data_dir: Path | str) -> bytes:
    """Train the initial model without DP and return its .tflite bytes.

    Full-batch Adam on logistic loss over every window (stride 1) of
    `INITIAL_RECORDS`, with a fixed seed: the same data gives the same scores.
    `models/initial.tflite` was written by
    ``INITIAL_PATH.write_bytes(build_initial(data_path("mitdb")))`` (the shipped
    MIT-BIH beat annotations, `sensors.replay.data_path`).

    Args:
        data_dir: Directory holding `<record>_all.csv` and `<record>_pvc.csv`.

    Raises:
        FileNotFoundError: If a record's CSV is missing.
    """
    import numpy as np
    import torch

    from models import features, tflite_template, twins

    parts = [features.record_dataset(data_dir, r) for r in INITIAL_RECORDS]
    x = torch.as_tensor(np.concatenate([p[0] for p in parts]))
    y = torch.as_tensor(np.concatenate([p[1] for p in parts]))
    with torch.random.fork_rng():
        torch.manual_seed(INITIAL_SEED)
        model = twins.build(INITIAL_ARCH, features.N_FEATURES)
        optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
        loss = twins.loss_fn("logistic")
        for _ in range(INITIAL_STEPS):
            optimiser.zero_grad()
            loss(model(x).reshape(-1), y).backward()
            optimiser.step()
    return tflite_template.with_weights(INITIAL_ARCH, twins.weights(model))
