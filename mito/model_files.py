"""A trained model on disk: the HDF5 weights and the settings JSON beside them.

The JSON holds everything prediction needs (architecture, normalisation, scale,
tiling, threshold, clean-up), so inference cannot drift from training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from data import DEFAULT_NORMALIZATION, MAX_SCALE  # noqa: E402
from mito.errors import ConfigError, DataError, ModelError, error_reason  # noqa: E402
from mito.files import atomic_write, write_json  # noqa: E402
from mito.tiling import round_up  # noqa: E402
from unet import UNetConfig, build_unet, receptive_field  # noqa: E402


def save_model(model: tf.keras.Model, path: str | os.PathLike, settings: Settings | None = None) -> None:
    """Save ``model`` as HDF5 at ``path`` (which must end in .h5), atomically; ``settings``
    go to the JSON beside it, also atomically, after the weights."""
    path = Path(path)
    if path.suffix != ".h5":
        raise ModelError(f"{path}: model files must end in .h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = float32_twin(model, settings)
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
        write_settings(path, settings)


def float32_twin(model: tf.keras.Model, settings: Settings | None = None) -> tf.keras.Model:
    """``model`` itself if it computes in float32, else a float32 U-Net with its weights: a model trained in
    mixed precision is saved as float32, so that loading it never changes the precision of a later run."""
    if all(layer.compute_dtype == "float32" for layer in model.layers):
        return model
    twin = build_unet(settings.unet if settings is not None else _infer_config(model))
    twin.set_weights(model.get_weights())
    return twin


def _infer_config(model: tf.keras.Model) -> UNetConfig:
    """The geometry of a model of ours from its deterministic layer names."""
    names = {layer.name for layer in model.layers}
    depth = sum(1 for name in names if name.startswith("enc") and name.endswith("_pool"))
    if not depth or "output" not in names:
        raise ModelError("no settings JSON and the layers are not those of this project's U-Net")
    head = model.get_layer("head_conv").filters if "head_conv" in names else 0
    batch_norm = "enc0_bn1" in names
    return UNetConfig(depth=depth, base_filters=model.get_layer("enc0_conv1").filters, head_filters=head, batch_norm=batch_norm)


# The trained models that come with the project (each with its JSON and MODEL_CARD.md).
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


def shipped_models() -> list[str]:
    return sorted(path.stem for path in PRETRAINED.glob("*.h5"))


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A model file, or else the name of a shipped model (``mito_em_cpu``, with or without ``.h5``), so that
    a shipped model is found from any working directory."""
    path = Path(name)
    if not path.is_file() and path.parent == Path(".") and path.stem in shipped_models():
        return PRETRAINED / f"{path.stem}.h5"
    return path


def load_model(path: str | os.PathLike) -> tuple[tf.keras.Model, Settings]:
    """Load a saved model for inference (uncompiled, Keras safe mode) and its settings.

    ``path`` may also name a shipped model (see resolve_model_path). Returns ``(model, settings)``.
    A missing JSON falls back to defaults with a warning. Raises ModelError naming the file when the
    model is missing or unusable, or its JSON is invalid or describes another architecture.
    """
    path = resolve_model_path(path)
    if not path.is_file():
        shipped = ", ".join(shipped_models())
        raise ModelError(f"{path}: model file not found (train one with training_mito.py, or name a shipped "
                         f"model: {shipped})")
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
    expected = build_unet(settings.unet).count_params()
    if expected != model.count_params():
        raise ModelError(
            f"{settings_path(path)}: describes a U-Net with {expected} parameters, "
            f"but {path.name} has {model.count_params()}"
        )
    return model, settings


def settings_path(model_path: str | os.PathLike) -> Path:
    """The settings JSON that belongs to a ``.h5`` model: same folder, same stem."""
    return Path(model_path).with_suffix(".json")


def read_settings(path: str | os.PathLike) -> Settings | None:
    """The settings JSON beside a model, or None when there is none; ModelError naming the file
    and every bad field when it cannot be used."""
    json_path = settings_path(path)
    if not json_path.exists():
        return None
    try:
        values = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{json_path}: not valid JSON ({error})") from None
    try:
        return Settings.from_json(values, str(json_path))
    except ConfigError as error:
        raise ModelError(str(error)) from None


def write_settings(path: str | os.PathLike, settings: Settings) -> None:
    """The settings JSON of the model at ``path`` (.h5), written atomically."""
    write_json(settings_path(path), settings.to_json())


FORMAT = "emsegmentation-mito/1"
# What every settings JSON has held since the first format; scale and postprocess came later.
REQUIRED_FIELDS = ("unet", "normalization", "tile_size", "overlap", "threshold")


@dataclasses.dataclass
class Settings:
    """The settings JSON beside a model: everything prediction needs, and how the model was made.

    unet: the architecture. normalization: how slices are mapped to [0, 1] before the network
    (``{"mode": "percentile", "low", "high"}`` or ``{"mode": "range"}``). scale: the resampling
    of slices before the network (0.5 halves each side). pixel_size: the nm per pixel of the
    slices it was trained on (before ``scale``), when the training was told; slices of another
    pixel size are then resampled to it (``Settings.scale_for_pixel_size``). tile_size, overlap: the prediction
    tiles, in the pixels the network sees (tile_size None: as large as the memory budget allows,
    ``mito.tile_memory``). threshold, postprocess: the tuned mask rule
    (``{"min_size", "max_hole"}`` in pixels). The rest records the training: its tile size,
    where the threshold was tuned and how well it did, the run (options, command, versions,
    best epoch, seconds), the history per epoch, and the names of its log and curves files.
    ``from_json`` fills in what older files lack and refuses, naming every bad field, what
    prediction cannot use.
    """

    unet: UNetConfig
    normalization: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    scale: float = 1.0
    pixel_size: float | None = None  # nm per pixel of the training slices (before scale); None: not given
    tile_size: int | None = None  # None: sized to memory at prediction (mito.tile_memory.auto_tile_size)
    overlap: int | None = None  # None: default_overlap(unet), the overlap that reproduces whole-slice prediction
    threshold: float = 0.5
    postprocess: dict = dataclasses.field(default_factory=lambda: {"min_size": 0, "max_hole": 0})
    train_tile_size: int | None = None
    threshold_tuned_on: str | None = None
    threshold_valid_iou: float | None = None
    training: dict = dataclasses.field(default_factory=dict)
    history: dict = dataclasses.field(default_factory=dict)
    history_csv: str | None = None
    curves_png: str | None = None
    format: str = FORMAT

    def __post_init__(self):
        if self.overlap is None and isinstance(self.unet, UNetConfig):
            self.overlap = default_overlap(self.unet)

    def errors(self) -> list[str]:
        """Every field that prediction cannot use, with the reason; empty when all is well."""
        problems = [] if isinstance(self.unet, UNetConfig) else [f"unet={self.unet!r}: not a U-Net configuration"]
        if isinstance(self.unet, UNetConfig):
            problems += self.unet.errors()
        problems += _normalization_errors(self.normalization)
        for key, minimum in (("tile_size", 1), ("overlap", 0)):
            value = getattr(self, key)
            if key == "tile_size" and value is None:
                continue
            if not _is_int(value) or value < minimum:
                problems.append(f"{key}={value!r}: must be an integer >= {minimum}")
        if not _is_number(self.scale) or not 0 < self.scale <= MAX_SCALE:
            problems.append(f"scale={self.scale!r}: must be a number above 0 and at most {MAX_SCALE}")
        if self.pixel_size is not None and (not _is_number(self.pixel_size) or not self.pixel_size > 0):
            problems.append(f"pixel_size={self.pixel_size!r}: must be a positive number (nm) or null")
        if not _is_number(self.threshold) or not 0 < self.threshold < 1:
            problems.append(f"threshold={self.threshold!r}: must be a number between 0 and 1")
        if not isinstance(self.postprocess, dict) or any(
                not _is_int(self.postprocess.get(key, 0)) or self.postprocess.get(key, 0) < 0
                for key in ("min_size", "max_hole")):
            problems.append(f"postprocess={self.postprocess!r}: min_size and max_hole must be integers >= 0")
        return problems

    def scale_for_pixel_size(self, pixel_size: float | None) -> float | None:
        """The resampling that shows the model slices of ``pixel_size`` nm as it saw its training slices:
        ``scale`` times ``pixel_size / self.pixel_size``. None (the model's own scale) when either pixel size is
        unknown. A DataError when the slices are too coarse or too fine for the model."""
        if pixel_size is None or self.pixel_size is None:
            return None
        scale = self.scale * pixel_size / self.pixel_size
        if not 1 / 64 <= scale <= MAX_SCALE:
            raise DataError(f"--pixel-size {pixel_size:g}: slices would be resampled x{scale:g} to the model's "
                            f"{self.pixel_size:g} nm pixels (x{self.scale:g}); only 1/64 to {MAX_SCALE:g} is supported")
        return scale

    def to_json(self) -> dict:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {"format": values.pop("format"), **values, "unet": self.unet.to_dict()}

    @classmethod
    def from_json(cls, values: dict, source: str = "settings") -> "Settings":
        """Settings from a parsed JSON object; ConfigError naming every bad or unknown field."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        known = {field.name for field in dataclasses.fields(cls)}
        problems = [f"unknown field {name!r}" for name in sorted(set(values) - known)]
        problems += [f"{name}: missing" for name in REQUIRED_FIELDS if name not in values]
        unet = None
        if isinstance(values.get("unet"), dict):
            try:
                unet = UNetConfig(**values["unet"])
            except TypeError as error:  # unknown architecture fields
                problems.append(f"unet: {error}")
        settings = cls(**{**{key: value for key, value in values.items() if key in known}, "unet": unet})
        problems += settings.errors() if unet is not None else []
        if problems:
            raise ConfigError(f"{source}: invalid settings: " + "; ".join(problems))
        return settings


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalization_errors(normalization) -> list[str]:
    if not isinstance(normalization, dict) or normalization.get("mode") not in ("percentile", "range"):
        return [f"normalization={normalization!r}: mode must be 'percentile' or 'range'"]
    if normalization["mode"] == "percentile":
        low, high = normalization.get("low"), normalization.get("high")
        if not (_is_number(low) and _is_number(high) and 0 <= low < high <= 100):
            return [f"normalization={normalization!r}: need 0 <= low < high <= 100"]
    return []


def default_settings(config: UNetConfig, normalization: dict | None = None, scale: float = 1.0) -> Settings:
    """Settings of a new model (threshold 0.5, no clean-up): what prediction uses for a model
    without a settings JSON, and where a model trained outside training_mito.py starts."""
    return Settings(unet=config, normalization=dict(normalization or DEFAULT_NORMALIZATION), scale=scale)


def at_scale(settings: Settings, scale: float | None) -> Settings:
    """``settings`` with the resampling ``scale`` (unchanged when None)."""
    return settings if scale is None else dataclasses.replace(settings, scale=scale)


def default_overlap(config: UNetConfig) -> int:
    """Overlap between tiles that makes tiled prediction equal whole-image prediction."""
    return 2 * round_up(receptive_field(config), config.alignment)
