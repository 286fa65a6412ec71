"""The one inference path: a raw EM slice in, the mitochondria probability and mask out.

normalise -> resample to the model's scale -> predict in tiles -> resample back
-> threshold -> clean up. Test, prediction, training's validation, the notebooks
and the benchmarks all go through ``Segmenter``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data import normalize, rescale_image, resize_probability  # noqa: E402
from mito.cleanup import postprocess  # noqa: E402
from mito.errors import ConfigError, DataError  # noqa: E402
from mito.lean_forward import LeanTilePredictor  # noqa: E402
from mito.memory import keep_freed_memory  # noqa: E402
from mito.tile_memory import auto_tile_size  # noqa: E402
from mito.tiling import predict_tiled, with_tta  # noqa: E402
from unet import UNetConfig, build_unet  # noqa: E402


PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); False when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """'auto' is bfloat16 on a CPU that multiplies it in hardware (about twice float32's speed there, with
    masks that agree to a few pixels in ten thousand) and float32 elsewhere, GPUs included (their 16-bit speed
    was not measured here); any other name stays as it is."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "float32"
    return "bfloat16" if cpu_supports_bfloat16() else "float32"


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
    clone = build_unet(config, PRECISIONS[precision])
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
    """A model with its settings, ready to turn raw EM slices into probabilities and masks.

    ``probability(raw)`` normalises the slice as the model was trained (the settings'
    normalisation), resamples it by the model's scale, predicts it in overlapping tiles and
    brings the probability back to the slice's size; ``mask(probability)`` thresholds it and
    cleans it up. Every option left as None comes from the model's settings (tile size,
    overlap, threshold, clean-up), so scripts, notebooks and benchmarks segment exactly alike.
    ``tta`` averages the 8 flips and 90-degree turns; ``precision`` is the forward pass's
    arithmetic ('float32', 'bfloat16', 'float16', or 'auto': see resolve_precision); ``scale``
    replaces the model's resampling factor.
    """

    def __init__(self, model, settings, tile_size=None, overlap=None, threshold=None, postprocess=None,
                 tta: bool = False, batch_size: int = 1, precision: str = "float32", scale: float | None = None):
        self.settings = settings  # a mito.model_files.Settings
        self.normalization = settings.normalization
        self.overlap = settings.overlap if overlap is None else overlap
        self.threshold = settings.threshold if threshold is None else threshold
        self.postprocess = dict(settings.postprocess) if postprocess is None else postprocess
        self.tta, self.batch_size = tta, batch_size
        self.precision, self.precision_is_auto = resolve_precision(precision), precision == "auto"
        # The model sees slices resampled by this factor (another than the model's for slices of another
        # pixel size: mito.model_files.Settings.scale_for_pixel_size).
        self.scale = settings.scale if scale is None else scale
        config = settings.unet
        self.align = config.alignment
        # None or 'auto' (the model's JSON or --tile-size): the largest tile that fits the memory budget.
        requested = settings.tile_size if tile_size is None else tile_size
        self.tile_size_is_auto = requested in (None, "auto")
        self.tile_size = auto_tile_size(config, self.precision, batch_size) if self.tile_size_is_auto else requested
        if self.overlap >= self.tile_size:
            raise DataError(f"--overlap {self.overlap} must be smaller than --tile-size {self.tile_size}")
        keep_freed_memory()  # large feature maps reuse pages instead of faulting in new ones
        model = with_precision(model, config, self.precision)
        if tta:  # each turn of a tile needs its own region, so TTA computes whole tiles
            self.predict_fn = with_tta(make_predict_fn(model))
        elif LeanTilePredictor.can_run(model, config):
            self.predict_fn = LeanTilePredictor(model, config)
        else:  # a model not built by unet.build_unet (other layer names)
            self.predict_fn = make_predict_fn(model)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """A raw (y, x) slice of any dtype -> (y, x) float32 in [0, 1], as the model was trained;
        NaN where the slice has no finite value (``probability`` is NaN there, ``mask`` background)."""
        return normalize(raw, self.normalization, fill=False)

    def probability(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """A raw (y, x) slice -> (y, x) float32 mitochondria probability (into ``out`` if given)."""
        return self.probability_of_normalized(self.normalize(raw), out)

    def probability_of_normalized(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``probability`` of a slice that ``normalize`` already made (a reader thread may make it ahead).

        A model trained at a scale other than 1 predicts the resampled slice (tile size and
        overlap count its pixels), and the probability is interpolated back to the slice's size.
        NaN pixels (no finite value in the slice) are filled with the median for the network, and
        their probability is NaN.
        """
        invalid = np.isnan(image)
        if invalid.any():
            image = np.where(invalid, np.median(image[~invalid]), image).astype(np.float32)
        if self.scale == 1:
            probability = predict_tiled(self.predict_fn, image, self.tile_size, self.overlap, self.align,
                                        self.batch_size, out)
        else:
            resampled = predict_tiled(self.predict_fn, rescale_image(image, self.scale), self.tile_size, self.overlap,
                                      self.align, self.batch_size)
            probability = resize_probability(resampled, np.shape(image), out)
        if invalid.any():
            probability[invalid] = np.nan
        return probability

    def mask(self, probability: np.ndarray) -> np.ndarray:
        """Threshold and clean up a probability map: (y, x) bool; background where it is NaN."""
        valid = np.isfinite(probability)
        mask = postprocess(valid & (probability >= self.threshold), self.postprocess)
        return mask if valid.all() else mask & valid

    def segment(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A raw slice -> (probability, mask)."""
        probability = self.probability(raw)
        return probability, self.mask(probability)

    def describe(self) -> str:
        post = self.postprocess or {}
        return (f"threshold {self.threshold:.2f}, objects >= {post.get('min_size', 0)} px, holes <= "
                f"{post.get('max_hole', 0)} px filled, tiles {self.tile_size}px"
                + (" (sized to memory)" if self.tile_size_is_auto else "") + f" with overlap {self.overlap}px"
                + (f", batches of {self.batch_size}" if self.batch_size > 1 else "")
                + (f", {self.precision}" if self.precision != "float32" or self.precision_is_auto else "")
                + (" (--precision auto)" if self.precision_is_auto else "")
                + (f", slices resampled x{self.scale:g}" if self.scale != 1 else "")
                + (", test-time augmentation x8" if self.tta else ""))


def tune_segmentation(model: tf.keras.Model, settings, images, masks, progress: bool = False):
    """``settings`` with the threshold and clean-up that suit ``images`` best (the validation split).

    images: raw (y, x) slices; masks: their 0/1 labels. The slices are predicted as
    test_mito.py and prediction_mito.py will (``Segmenter``), then the threshold and the
    small-object and hole sizes with the best foreground IoU are chosen. Returns a new
    ``mito.model_files.Settings`` with threshold, postprocess, threshold_tuned_on and
    threshold_valid_iou filled in.
    """
    import dataclasses

    from mito.metrics import tune_postprocess, tune_threshold

    segmenter = Segmenter(model, settings, postprocess={})
    if progress:
        import sys

        from tqdm import tqdm

        images = tqdm(images, desc="tune threshold", unit="image", file=sys.stderr)
    probabilities = [segmenter.probability(image) for image in images]
    threshold, _ = tune_threshold(probabilities, masks)
    postprocess, iou = tune_postprocess([probability >= threshold for probability in probabilities], masks)
    return dataclasses.replace(settings, threshold=threshold, postprocess=postprocess,
                               threshold_tuned_on=f"valid ({len(masks)} images)", threshold_valid_iou=round(iou, 4))
