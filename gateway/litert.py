"""Score feature windows with a .tflite model, and swap models safely.

The only module that imports the TFLite runtime: `ai_edge_litert` (the renamed
tflite-runtime), or `tflite_runtime` where only that is installed. The old
tflite-runtime 2.14 wheel cannot create an interpreter under numpy 2, so it is
the fallback, not the first choice.

A models directory holds `current.tflite`, the model the rules use, and
`previous.tflite`, the one it replaced. `install_model` replaces `current.tflite`
atomically (temp file, fsync, verify, rename), so a power cut leaves either the
old or the new model, never half of one; `rollback` puts the previous one back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from gateway.errors import ExitCode, GatewayError
from gateway.files import fsync_dir, write_synced

try:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
except ImportError:  # pragma: no cover - only on gateways with the old runtime
    from tflite_runtime.interpreter import Interpreter, OpResolverType

# The built-in kernels alone: for a model of a few kB the XNNPACK delegate saves
# nothing measurable, and without it the runtime prints nothing on stderr (its
# delegate banner would break JSON log lines) and scores the same everywhere.
_RESOLVER = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES

log = logging.getLogger(__name__)

CURRENT = "current.tflite"
PREVIOUS = "previous.tflite"
SCORE_TOLERANCE = 1e-5
"""Largest allowed difference from `expected_score` when verifying a new model."""


class ModelError(GatewayError):
    """A model cannot be loaded, scores wrongly, or cannot be installed.

    Attributes:
        path: The model file or models directory concerned.
    """

    exit_code = ExitCode.MODEL_INVALID

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"model {path}: {reason}")


class Scorer:
    """Scores feature vectors with one .tflite model (output: sigmoid(logit))."""

    def __init__(self, path: Path | str) -> None:
        """Load the model at `path`.

        Raises:
            ModelError: If the file is missing or is not a usable model.
        """
        self.path = Path(path)
        try:
            self._interp = Interpreter(
                model_path=str(self.path), experimental_op_resolver_type=_RESOLVER
            )
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(self.path, f"cannot load: {exc}") from exc
        self._input = self._interp.get_input_details()[0]
        self._output = self._interp.get_output_details()[0]
        self.n_features = int(self._input["shape"][-1])
        self._batch = int(self._input["shape"][0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] of features shaped (n_windows, n_features), float32 (n,).

        Raises:
            ModelError: If the feature width does not match the model's input.
        """
        x = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if x.shape[1] != self.n_features:
            raise ModelError(
                self.path, f"expects {self.n_features} features, got {x.shape[1]}"
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        self._resize(x.shape[0])
        self._interp.set_tensor(self._input["index"], x)
        self._interp.invoke()
        return self._interp.get_tensor(self._output["index"]).reshape(-1).copy()

    def _resize(self, batch: int) -> None:
        # Resizing reallocates the arena: only do it when the batch size changes.
        if batch == self._batch:
            return
        self._interp.resize_tensor_input(self._input["index"], [batch, self.n_features])
        self._interp.allocate_tensors()
        self._batch = batch


def verify_model(
    path: Path, known_window: np.ndarray, expected_score: float | None = None
) -> float:
    """Load `path`, score `known_window` and check the score; return it.

    Raises:
        ModelError: If the model does not load, or the score is not finite, is
            outside [0, 1], or differs from `expected_score` by more than
            `SCORE_TOLERANCE`.
    """
    got = Scorer(path).score(np.atleast_2d(known_window))
    if got.shape != (1,) or not np.isfinite(got[0]) or not 0.0 <= got[0] <= 1.0:
        raise ModelError(path, "scores the known window outside [0, 1]")
    value = float(got[0])
    if expected_score is not None and abs(value - expected_score) > SCORE_TOLERANCE:
        raise ModelError(path, f"scores the known window {value:.6f}, not expected")
    return value


def install_model(
    new_bytes: bytes,
    models_dir: Path | str,
    *,
    known_window: np.ndarray,
    expected_score: float | None = None,
) -> Path:
    """Verify a new model and make it `current.tflite`, keeping the old as previous.

    Args:
        new_bytes: The new .tflite model.
        models_dir: Directory of `current.tflite` and `previous.tflite`.
        known_window: One feature vector the new model must score in [0, 1].
        expected_score: If given, the score the new model must give it (for
            example the torch twin's), within `SCORE_TOLERANCE`.

    Returns:
        Path of the installed `current.tflite`.

    Raises:
        ModelError: If the new model fails verification or cannot be written;
            the current model is then left as it was.
    """
    directory = Path(models_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        staged = write_synced(
            new_bytes, directory, prefix=".incoming-", suffix=".tflite"
        )
    except OSError as exc:
        raise ModelError(directory, f"cannot write: {exc}") from exc
    try:
        verify_model(staged, known_window, expected_score)
        _keep_previous(directory)
        os.replace(staged, directory / CURRENT)
        fsync_dir(directory)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    log.info("model installed (%d bytes)", len(new_bytes))
    return directory / CURRENT


def _keep_previous(directory: Path) -> None:
    # A hard link keeps current.tflite in place until the new one replaces it,
    # so there is no moment without a current model.
    current = directory / CURRENT
    if not current.exists():
        return
    link = directory / f".{PREVIOUS}.link"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.link(current, link)
    os.replace(link, directory / PREVIOUS)


def rollback(models_dir: Path | str) -> Path:
    """Put `previous.tflite` back as `current.tflite`.

    Returns:
        Path of the restored `current.tflite`.

    Raises:
        ModelError: If there is no previous model to restore.
    """
    directory = Path(models_dir)
    previous = directory / PREVIOUS
    if not previous.exists():
        raise ModelError(directory, "no previous model to roll back to")
    os.replace(previous, directory / CURRENT)
    fsync_dir(directory)
    log.info("model rolled back to the previous one")
    return directory / CURRENT
