"""Training callbacks and resume points: the best model saved after every epoch, and what --resume needs."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mito.errors import ModelError, error_reason  # noqa: E402
from mito.files import atomic_write, write_json  # noqa: E402
from mito.model_files import save_model  # noqa: E402


class TrainingCheckpoints(tf.keras.callbacks.Callback):
    """After every epoch: keep the history, save the best model, save a resume point.

    The best model (lowest ``monitor``) goes to ``path`` (.h5, no optimizer)
    with its settings JSON; the resume point is a native .keras file with the
    optimizer state plus ``<stem>.resume.json`` naming it. Every file is
    written to a temporary name and renamed, and the JSON is written after the
    file it names, so a kill at any moment leaves a complete model and a
    consistent resume point.
    """

    def __init__(self, path, settings, options: dict, state: dict | None = None, monitor: str = "val_loss",
                 patience: int = 0):
        super().__init__()
        self.path, self.settings, self.options, self.monitor = Path(path), settings, options, monitor
        self.patience, self.sign = patience, (-1.0 if "iou" in monitor else 1.0)  # IoU: higher is better
        self.history = settings.history
        self.best = state["best"] if state else float("inf") * self.sign
        self.best_epoch = state["best_epoch"] if state else None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        value = logs.get(self.monitor)
        if value is not None and np.isfinite(value) and self.sign * value < self.sign * self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.settings.training["best_epoch"] = self.best_epoch
            save_model(self.model, self.path, self.settings)
        # Early stopping from the persisted best epoch, so a resumed run counts the same way.
        if self.patience and self.best_epoch is not None and epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True
        save_resume_state(self.model, self.path, epoch + 1, {
            "best": self.best, "best_epoch": self.best_epoch, "options": self.options, "settings": self.settings.to_json(),
            "seed_states": _seed_states(self.model),
        })


class SliceValidation(tf.keras.callbacks.Callback):
    """After every epoch, log ``val_slice_iou``: the foreground IoU of the whole validation
    slices, predicted as test and prediction will, at the threshold that suits them best.

    The tile IoU at 0.5 (``val_iou``) moves with the model's calibration from epoch to
    epoch; this is the score the finished model is tuned and judged by. Callbacks after
    this one (checkpoints, CSV, progress) see it in the epoch's logs. ``make_segmenter``
    turns the model being trained into a ``mito.segmenter.Segmenter`` (called once: it
    reads the weights as they train); ``images`` are the raw validation slices.
    """

    def __init__(self, make_segmenter, images, masks):
        super().__init__()
        self.make_segmenter, self.images, self.masks = make_segmenter, images, masks
        self.segmenter = None

    def on_epoch_end(self, epoch, logs=None):
        from mito.metrics import tune_threshold

        if self.segmenter is None:
            self.segmenter = self.make_segmenter(self.model)
        probabilities = [self.segmenter.probability(image) for image in self.images]
        _, iou = tune_threshold(probabilities, self.masks)
        if logs is not None:
            logs["val_slice_iou"] = iou


def _seed_states(model: tf.keras.Model) -> dict:
    """The random-stream positions of the dropout layers, which model files do not keep."""
    return {
        layer.name: np.asarray(layer.seed_generator.state.numpy()).tolist()
        for layer in model.layers
        if getattr(layer, "seed_generator", None) is not None
    }


def _restore_seed_states(model: tf.keras.Model, states: dict) -> None:
    for name, value in states.items():
        state = model.get_layer(name).seed_generator.state
        state.assign(np.asarray(value, dtype=state.dtype if isinstance(state.dtype, str) else state.dtype.name))


def resume_json_path(model_path: str | os.PathLike) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".resume.json")


def _resume_checkpoints(model_path: Path) -> list[Path]:
    return sorted(model_path.parent.glob(f"{model_path.stem}.resume-epoch*.keras"))


def save_resume_state(model: tf.keras.Model, model_path: Path, epoch: int, state: dict) -> None:
    """Save what ``--resume`` needs after ``epoch`` completed epochs; keep only the newest."""
    checkpoint = model_path.with_name(f"{model_path.stem}.resume-epoch{epoch:04d}.keras")
    atomic_write(checkpoint, lambda temporary: model.save(temporary))
    write_json(resume_json_path(model_path), {"epoch": epoch, "checkpoint": checkpoint.name, **state})
    for older in _resume_checkpoints(model_path):
        if older != checkpoint:
            older.unlink(missing_ok=True)


def remove_resume_state(model_path: str | os.PathLike) -> None:
    model_path = Path(model_path)
    resume_json_path(model_path).unlink(missing_ok=True)
    for checkpoint in _resume_checkpoints(model_path):
        checkpoint.unlink(missing_ok=True)


def read_resume_state(model_path: str | os.PathLike) -> dict:
    """The resume point of a training run of ``model_path``; ModelError when there is none."""
    json_path = resume_json_path(model_path)
    if not json_path.exists():
        raise ModelError(f"{json_path}: not found, so there is no training of {Path(model_path).name} to resume")
    try:
        state = json.loads(json_path.read_text())
        checkpoint = json_path.with_name(state["checkpoint"])
        state["epoch"], state["options"], state["settings"]  # noqa: B018  (all must be present)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{json_path}: not a valid resume file ({error})") from None
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: resume checkpoint missing")
    return state


def load_resume_model(model_path: str | os.PathLike, state: dict) -> tf.keras.Model:
    """The compiled model of a resume point: optimizer state and dropout random streams included."""
    checkpoint = Path(model_path).with_name(state["checkpoint"])
    try:
        model = tf.keras.models.load_model(checkpoint, compile=True, safe_mode=True)
        _restore_seed_states(model, state.get("seed_states", {}))
    except Exception as error:  # any failure means the checkpoint is unusable
        reason = error_reason(error)
        raise ModelError(f"{checkpoint}: cannot resume from it ({reason})") from None
    return model


def plot_curves(history: dict, path: Path) -> None:
    """Loss and IoU per epoch, training and validation, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mito.files import atomic_write

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "iou")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                axis.plot(range(1, len(values) + 1), values, style, label=(prefix or "train_") + metric)
        if metric == "iou" and history.get("val_slice_iou"):
            values = history["val_slice_iou"]
            axis.plot(range(1, len(values) + 1), values, ":", label="val_slice_iou (best threshold)")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100))
    plt.close(figure)
