"""The 2D U-Net: its configuration, builder, compiler, and persistence.

Faithful defaults reproduce the original U-Net (Ronneberger et al. 2015) as the
Keras example in YunYang1994/TensorFlow2.0-Examples writes it: depth 4, 64 base
filters doubling to 1024, two 3x3 ReLU 'same' convolutions per level, dropout
0.5 at the two deepest levels, 2x upsampling followed by a 2x2 convolution, skip
concatenation, a 2-channel 3x3 ReLU head and a 1x1 sigmoid output.

The model is saved as HDF5 (``.h5``) with a JSON file of the same stem beside
it; the JSON holds everything prediction needs (architecture, normalisation,
tiling, threshold), so inference cannot drift from training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data import DEFAULT_NORMALIZATION, MAX_SCALE, MitoError, atomic_write, error_reason  # noqa: E402

# Slices up to 1280 px (1024 x 1024 included) are one bare prediction; larger ones are cut into tiles that
# overlap by the default 2 x 128 px of a depth-4 U-Net (see benchmarks/bench_predict.py and README, Performance).
DEFAULT_PREDICTION_TILE = 1280

__all__ = [
    "UNetConfig",
    "ConfigError",
    "ModelError",
    "build_unet",
    "compile_unet",
    "receptive_field",
    "LOSSES",
    "default_overlap",
    "save_model",
    "load_model",
    "make_predict_fn",
    "with_precision",
    "settings_path",
]


class ConfigError(MitoError, ValueError):
    """A configuration with one or more invalid fields; the message names them all."""


class ModelError(MitoError):
    """A model file or its settings file that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a 2D U-Net with a single-channel input and a sigmoid output.

    depth: number of 2x2 poolings; inputs are padded to multiples of ``2**depth``.
    base_filters: filters at full resolution; doubled at every level below.
    dropout: dropout rate applied at the ``dropout_levels`` deepest levels.
    batch_norm: batch normalisation after every 3x3 convolution (before ReLU).
    head_filters: filters of the extra 3x3 ReLU convolution before the 1x1
        output (2 in the original Keras example; 0 leaves it out).
    """

    depth: int = 4
    base_filters: int = 64
    dropout: float = 0.5
    dropout_levels: int = 2
    batch_norm: bool = False
    head_filters: int = 2
    kernel_initializer: str = "glorot_uniform"

    def errors(self) -> list[str]:
        """Every invalid field with the reason, empty when the config is valid."""
        problems = []
        if not isinstance(self.depth, int) or not 1 <= self.depth <= 6:
            problems.append(f"depth={self.depth!r}: must be an integer from 1 to 6")
        if not isinstance(self.base_filters, int) or self.base_filters < 1:
            problems.append(f"base_filters={self.base_filters!r}: must be a positive integer")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r}: must be in [0, 1)")
        if not isinstance(self.dropout_levels, int) or self.dropout_levels < 0:
            problems.append(f"dropout_levels={self.dropout_levels!r}: must be an integer >= 0")
        if not isinstance(self.batch_norm, bool):
            problems.append(f"batch_norm={self.batch_norm!r}: must be true or false")
        if not isinstance(self.head_filters, int) or self.head_filters < 0:
            problems.append(f"head_filters={self.head_filters!r}: must be an integer >= 0")
        if self.kernel_initializer not in ("glorot_uniform", "he_normal", "he_uniform"):
            problems.append(
                f"kernel_initializer={self.kernel_initializer!r}: "
                "must be glorot_uniform, he_normal or he_uniform"
            )
        return problems

    def validate(self) -> "UNetConfig":
        problems = self.errors()
        if problems:
            raise ConfigError("invalid U-Net config: " + "; ".join(problems))
        return self

    @property
    def alignment(self) -> int:
        """Input sizes must be multiples of this (one per pooling)."""
        return 2**self.depth

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        """Build and validate a config; unknown keys are errors, not silently dropped."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"invalid U-Net config: unknown fields {unknown}")
        return cls(**values).validate()


def build_unet(config: UNetConfig = UNetConfig()) -> tf.keras.Model:
    """Build an uncompiled, fully convolutional U-Net.

    Input ``(batch, y, x, 1)`` float32 in [0, 1] with y and x multiples of
    ``config.alignment``; output ``(batch, y, x, 1)`` float32 probabilities.
    Layer names are deterministic (``enc0_conv1`` ... ``output``).
    """
    config.validate()
    layers = tf.keras.layers

    def conv_block(x, filters, prefix, dropout):
        for index in (1, 2):
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                kernel_initializer=config.kernel_initializer,
                use_bias=not config.batch_norm,
                activation=None if config.batch_norm else "relu",
                name=f"{prefix}_conv{index}",
            )(x)
            if config.batch_norm:
                # Momentum 0.9, not Keras' 0.99: short CPU runs of a few hundred steps leave
                # 0.99 moving statistics far from the batch statistics, and validation collapses.
                x = layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn{index}")(x)
                x = layers.Activation("relu", name=f"{prefix}_relu{index}")(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
        return x

    def level_dropout(level):
        # Levels are numbered 0 (full resolution) .. depth (bottleneck).
        return config.dropout if level > config.depth - config.dropout_levels else 0.0

    inputs = layers.Input(shape=(None, None, 1), name="image")
    x = inputs
    skips = []
    for level in range(config.depth):
        x = conv_block(x, config.base_filters * 2**level, f"enc{level}", level_dropout(level))
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = conv_block(x, config.base_filters * 2**config.depth, "bottleneck", level_dropout(config.depth))
    for level in reversed(range(config.depth)):
        filters = config.base_filters * 2**level
        x = layers.UpSampling2D(2, name=f"dec{level}_upsample")(x)
        x = layers.Conv2D(
            filters,
            2,
            padding="same",
            activation="relu",
            kernel_initializer=config.kernel_initializer,
            name=f"dec{level}_upconv",
        )(x)
        x = layers.Concatenate(axis=-1, name=f"dec{level}_concat")([skips[level], x])
        x = conv_block(x, filters, f"dec{level}", 0.0)
    if config.head_filters:
        x = layers.Conv2D(
            config.head_filters,
            3,
            padding="same",
            activation="relu",
            kernel_initializer=config.kernel_initializer,
            name="head_conv",
        )(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="output")(x)
    return tf.keras.Model(inputs, outputs, name="unet")


def receptive_field(config: UNetConfig) -> int:
    """How far (pixels, along an axis) an input pixel can change the output.

    At a level of stride s = 2**level, each 3x3 convolution reaches s pixels,
    a 2x2 pooling or a 2x upsampling up to s (depending on the pixel's phase
    in the pooling grid), and the 2x2 'same' up-convolution s on one side:
    6 * s per level, 2 * 2**depth in the bottleneck, 1 for the 3x3 head.
    tests/test_unet.py checks this against impulse responses of real models.
    Tiles that keep their centre this far from their border reproduce
    whole-image prediction exactly.
    """
    reach = sum(6 * 2**level for level in range(config.depth)) + 2 * 2**config.depth
    return reach + (1 if config.head_filters else 0)


def default_overlap(config: UNetConfig) -> int:
    """Overlap between tiles that makes tiled prediction equal whole-image prediction."""
    return 2 * _round_up(receptive_field(config), config.alignment)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


LOSSES = ("bce", "dice", "bce_dice")


@tf.keras.utils.register_keras_serializable(package="mito")
class SegmentationLoss(tf.keras.losses.Loss):
    """Binary cross-entropy, soft Dice, or their sum, per tile.

    ``foreground_weight`` multiplies the cross-entropy of mitochondria
    pixels, which are a small minority (about 9 % in the real sample).
    Dice is computed over the whole batch (smoothing 1): per tile it would be
    noisy for the many tiles with few or no mitochondria.
    """

    def __init__(self, kind: str = "bce", foreground_weight: float = 1.0, name: str | None = None, **kwargs):
        if kind not in LOSSES:
            raise ConfigError(f"loss={kind!r}: must be one of {list(LOSSES)}")
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.foreground_weight = kind, float(foreground_weight)

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        axes = list(range(1, len(y_pred.shape)))
        loss = tf.zeros(tf.shape(y_pred)[:1], y_pred.dtype)
        if self.kind in ("bce", "bce_dice"):
            p = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
            weight = 1.0 + (self.foreground_weight - 1.0) * y_true
            loss += tf.reduce_mean(-weight * (y_true * tf.math.log(p) + (1 - y_true) * tf.math.log(1 - p)), axis=axes)
        if self.kind in ("dice", "bce_dice"):
            overlap = tf.reduce_sum(y_true * y_pred)
            total = tf.reduce_sum(y_true) + tf.reduce_sum(y_pred)
            loss += 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)  # the same for every tile of the batch
        return loss

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "foreground_weight": self.foreground_weight}


def compile_unet(
    model: tf.keras.Model,
    learning_rate=1e-4,
    loss: str = "bce",
    foreground_weight: float = 1.0,
    jit_compile: bool | str = "auto",
) -> tf.keras.Model:
    """Compile with Adam, the chosen loss and a foreground IoU metric named ``iou``.

    ``learning_rate`` is a number or a Keras LearningRateSchedule. ``jit_compile=True``
    runs each training step as one XLA program; Keras' "auto" never does that on a CPU.
    """
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=learning_rate),
        loss=SegmentationLoss(loss, foreground_weight),
        metrics=[tf.keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="iou")],
        jit_compile=jit_compile,
    )
    return model


# --- persistence -------------------------------------------------------------


def settings_path(model_path: str | os.PathLike) -> Path:
    """The settings JSON that belongs to a ``.h5`` model: same folder, same stem."""
    return Path(model_path).with_suffix(".json")


def write_json(path: str | os.PathLike, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def save_model(model: tf.keras.Model, path: str | os.PathLike, settings: dict | None = None) -> None:
    """Save ``model`` as HDF5 at ``path`` (which must end in .h5), atomically.

    ``settings`` (JSON-serialisable, including ``"unet"``: the config dict) is
    written beside it, also atomically, after the weights.
    """
    path = Path(path)
    if path.suffix != ".h5":
        raise ModelError(f"{path}: model files must end in .h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    # HDF5 is this project's deliberate format; Keras 3 logs that it is legacy, tf-keras warns.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
            atomic_write(path, lambda temporary: model.save(temporary, include_optimizer=False))
    finally:
        absl_logger.setLevel(level)
    if settings is not None:
        write_json(settings_path(path), settings)


class TrainingCheckpoints(tf.keras.callbacks.Callback):
    """After every epoch: keep the history, save the best model, save a resume point.

    The best model (lowest ``monitor``) goes to ``path`` (.h5, no optimizer)
    with its settings JSON; the resume point is a native .keras file with the
    optimizer state plus ``<stem>.resume.json`` naming it. Every file is
    written to a temporary name and renamed, and the JSON is written after the
    file it names, so a kill at any moment leaves a complete model and a
    consistent resume point.
    """

    def __init__(self, path, settings: dict, options: dict, state: dict | None = None, monitor: str = "val_loss",
                 patience: int = 0):
        super().__init__()
        self.path, self.settings, self.options, self.monitor = Path(path), settings, options, monitor
        self.patience, self.sign = patience, (-1.0 if "iou" in monitor else 1.0)  # IoU: higher is better
        self.history = settings.setdefault("history", {})
        self.best = state["best"] if state else float("inf") * self.sign
        self.best_epoch = state["best_epoch"] if state else None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        value = logs.get(self.monitor)
        if value is not None and np.isfinite(value) and self.sign * value < self.sign * self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.settings["training"]["best_epoch"] = self.best_epoch
            save_model(self.model, self.path, self.settings)
        # Early stopping from the persisted best epoch, so a resumed run counts the same way.
        if self.patience and self.best_epoch is not None and epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True
        save_resume_state(self.model, self.path, epoch + 1, {
            "best": self.best, "best_epoch": self.best_epoch, "options": self.options, "settings": self.settings,
            "seed_states": _seed_states(self.model),
        })


class SliceValidation(tf.keras.callbacks.Callback):
    """After every epoch, log ``val_slice_iou``: the foreground IoU of the whole validation
    slices, predicted as test and prediction will (tiled, resampled by the model's scale),
    at the threshold that suits them best.

    The tile IoU at 0.5 (``val_iou``) moves with the model's calibration from epoch to
    epoch; this is the score the finished model is tuned and judged by. Callbacks after
    this one (checkpoints, CSV, progress) see it in the epoch's logs.
    """

    def __init__(self, settings: dict, images, masks):
        super().__init__()
        self.settings, self.images, self.masks = settings, images, masks
        self.segmenter = None

    def on_epoch_end(self, epoch, logs=None):
        from metrics import tune_threshold

        if self.segmenter is None:  # one traced inference function, reading the weights as they train
            self.segmenter = Segmenter(self.model, self.settings)
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


def read_settings(path: str | os.PathLike) -> dict | None:
    """The settings JSON beside a model, or None when there is none."""
    json_path = settings_path(path)
    if not json_path.exists():
        return None
    try:
        settings = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{json_path}: not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ModelError(f"{json_path}: expected a JSON object")
    return settings


def settings_errors(settings: dict) -> list[str]:
    """Every field of a model's settings that prediction cannot use."""
    problems = []
    try:
        UNetConfig.from_dict(settings.get("unet", {}))
    except (ConfigError, TypeError) as error:
        problems.append(str(error).removeprefix("invalid U-Net config: "))
    normalization = settings.get("normalization", {})
    if not isinstance(normalization, dict) or normalization.get("mode") not in ("percentile", "range"):
        problems.append(f"normalization={normalization!r}: mode must be 'percentile' or 'range'")
    elif normalization["mode"] == "percentile":
        low, high = normalization.get("low"), normalization.get("high")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 <= low < high <= 100):
            problems.append(f"normalization={normalization!r}: need 0 <= low < high <= 100")
    for key, minimum in (("tile_size", 1), ("overlap", 0)):
        value = settings.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            problems.append(f"{key}={value!r}: must be an integer >= {minimum}")
    scale = settings.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= MAX_SCALE:
        problems.append(f"scale={scale!r}: must be a number above 0 and at most {MAX_SCALE}")
    threshold = settings.get("threshold")
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        problems.append(f"threshold={threshold!r}: must be a number between 0 and 1")
    postprocess = settings.get("postprocess") or {}
    if not isinstance(postprocess, dict) or any(
        not isinstance(postprocess.get(key, 0), int) or postprocess.get(key, 0) < 0 for key in ("min_size", "max_hole")
    ):
        problems.append(f"postprocess={postprocess!r}: min_size and max_hole must be integers >= 0")
    return problems


def default_settings(config: UNetConfig, normalization: dict | None = None, scale: float = 1.0) -> dict:
    """Settings of a new model (threshold 0.5, no clean-up): what prediction uses for a model
    without a settings JSON, and where a model trained outside training_mito.py starts."""
    return {
        "format": "emsegmentation-mito/1",
        "unet": config.to_dict(),
        "normalization": dict(normalization or DEFAULT_NORMALIZATION),
        "scale": scale,
        "tile_size": DEFAULT_PREDICTION_TILE,
        "overlap": default_overlap(config),
        "threshold": 0.5,
        "postprocess": {"min_size": 0, "max_hole": 0},
    }


def tune_segmentation(model: tf.keras.Model, settings: dict, images, masks, progress: bool = False) -> dict:
    """The threshold and clean-up that suit ``images`` best (the validation split), as settings fields.

    images: normalised (y, x) float32 slices at full size; masks: their 0/1 labels. The slices
    are predicted as test_mito.py and prediction_mito.py will (``Segmenter``), then the threshold
    and the small-object and hole sizes with the best foreground IoU are chosen. Returns
    ``{"threshold", "postprocess", "threshold_tuned_on", "threshold_valid_iou"}`` to merge into
    the settings.
    """
    from metrics import tune_postprocess, tune_threshold

    segmenter = Segmenter(model, settings, postprocess={})
    if progress:
        import sys

        from tqdm import tqdm

        images = tqdm(images, desc="tune threshold", unit="image", file=sys.stderr)
    probabilities = [segmenter.probability(image) for image in images]
    threshold, _ = tune_threshold(probabilities, masks)
    postprocess, iou = tune_postprocess([probability >= threshold for probability in probabilities], masks)
    return {"threshold": threshold, "postprocess": postprocess, "threshold_tuned_on": f"valid ({len(masks)} images)",
            "threshold_valid_iou": round(iou, 4)}


def _infer_config(model: tf.keras.Model) -> UNetConfig:
    """The geometry of a model of ours from its deterministic layer names."""
    names = {layer.name for layer in model.layers}
    depth = sum(1 for name in names if name.startswith("enc") and name.endswith("_pool"))
    if not depth or "output" not in names:
        raise ModelError("no settings JSON and the layers are not those of this project's U-Net")
    head = model.get_layer("head_conv").filters if "head_conv" in names else 0
    batch_norm = "enc0_bn1" in names
    return UNetConfig(depth=depth, base_filters=model.get_layer("enc0_conv1").filters, head_filters=head, batch_norm=batch_norm)


def load_model(path: str | os.PathLike) -> tuple[tf.keras.Model, dict]:
    """Load a saved model for inference (uncompiled, Keras safe mode) and its settings.

    Returns ``(model, settings)``. A missing JSON falls back to defaults with
    a warning. Raises ModelError naming the file when the model is missing or
    unusable, or its JSON is invalid or describes another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (train one with training_mito.py)")
    settings = read_settings(path)
    try:
        model = tf.keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # h5py, Keras and OS errors all mean "unusable file"
        reason = error_reason(error)
        raise ModelError(f"{path}: not a loadable Keras model ({reason})") from None
    if len(model.inputs) != 1 or model.inputs[0].shape[-1] != 1 or model.outputs[0].shape[-1] != 1:
        raise ModelError(f"{path}: expected a model with one single-channel input and output")
    if settings is None:
        try:
            config = _infer_config(model)
        except ModelError as error:
            raise ModelError(f"{path}: {error}") from None
        warnings.warn(f"{settings_path(path)} not found: using default settings (threshold 0.5)", stacklevel=2)
        return model, default_settings(config)
    problems = settings_errors(settings)
    if problems:
        raise ModelError(f"{settings_path(path)}: invalid settings: " + "; ".join(problems))
    expected = build_unet(UNetConfig.from_dict(settings["unet"])).count_params()
    if expected != model.count_params():
        raise ModelError(
            f"{settings_path(path)}: describes a U-Net with {expected} parameters, "
            f"but {path.name} has {model.count_params()}"
        )
    return model, settings


PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); False when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def with_precision(model: tf.keras.Model, config: UNetConfig, precision: str = "float32") -> tf.keras.Model:
    """``model`` computing in ``precision``: 'float32' (itself), 'bfloat16' or 'float16'.

    The lower precisions rebuild the U-Net under Keras' mixed policy (weights
    kept in float32, convolutions in 16 bits) and copy the weights; the
    sigmoid output stays float32. Raises ConfigError for another name.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: must be one of {list(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        return model
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(PRECISIONS[precision])
    try:
        clone = build_unet(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


def make_predict_fn(model: tf.keras.Model):
    """A fast NumPy-in, NumPy-out inference function for ``predict_tiled``.

    The function is traced once, for any batch and tile shape (no retracing
    per image size); it takes (n, y, x, 1) float32 and returns (n, y, x, 1)
    float32.
    """

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)], autograph=False)
    def infer(batch):
        return model(batch, training=False)

    return lambda batch: infer(tf.convert_to_tensor(batch, tf.float32)).numpy()


class Segmenter:
    """A model with its settings, ready to turn EM slices into probabilities and masks.

    Every option left as None comes from the model's settings JSON (tile size,
    overlap, threshold, post-processing), so scripts, notebooks and benchmarks
    segment exactly alike. ``tta`` averages the 8 flips/rotations.
    """

    def __init__(self, model, settings: dict, tile_size=None, overlap=None, threshold=None, postprocess=None,
                 tta: bool = False, batch_size: int = 1, precision: str = "float32"):
        from data import DataError, with_tta

        self.settings = settings
        self.tile_size = settings["tile_size"] if tile_size is None else tile_size
        self.overlap = settings["overlap"] if overlap is None else overlap
        self.threshold = settings["threshold"] if threshold is None else threshold
        self.postprocess = dict(settings.get("postprocess") or {}) if postprocess is None else postprocess
        self.tta, self.batch_size, self.precision = tta, batch_size, precision
        self.scale = settings.get("scale", 1.0)  # the model sees slices resampled by this factor
        config = UNetConfig.from_dict(settings["unet"])
        self.align = config.alignment
        if self.overlap >= self.tile_size:
            raise DataError(f"--overlap {self.overlap} must be smaller than --tile-size {self.tile_size}")
        predict_fn = make_predict_fn(with_precision(model, config, precision))
        self.predict_fn = with_tta(predict_fn) if tta else predict_fn

    def probability(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(y, x) normalised image -> (y, x) float32 mitochondria probability (into ``out`` if given).

        A model trained at a scale other than 1 predicts the resampled slice (tile size and
        overlap count its pixels), and the probability is interpolated back to the slice's size.
        """
        from data import predict_tiled, rescale_image, resize_probability

        if self.scale == 1:
            return predict_tiled(self.predict_fn, image, self.tile_size, self.overlap, self.align, self.batch_size,
                                 out)
        resampled = predict_tiled(self.predict_fn, rescale_image(image, self.scale), self.tile_size, self.overlap,
                                  self.align, self.batch_size)
        return resize_probability(resampled, np.shape(image), out)

    def mask(self, probability: np.ndarray) -> np.ndarray:
        """Threshold and post-process a probability map: (y, x) bool."""
        from data import postprocess

        return postprocess(probability >= self.threshold, self.postprocess)

    def describe(self) -> str:
        post = self.postprocess or {}
        return (f"threshold {self.threshold:.2f}, objects >= {post.get('min_size', 0)} px, holes <= "
                f"{post.get('max_hole', 0)} px filled, tiles {self.tile_size}px with overlap {self.overlap}px"
                + (f", batches of {self.batch_size}" if self.batch_size > 1 else "")
                + (f", {self.precision}" if self.precision != "float32" else "")
                + (f", slices resampled x{self.scale:g}" if self.scale != 1 else "")
                + (", test-time augmentation x8" if self.tta else ""))
