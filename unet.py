"""The 2D U-Net: its configuration, builder, receptive field, loss and compiler. No file I/O.

Faithful defaults reproduce the original U-Net (Ronneberger et al. 2015) as the
Keras example in YunYang1994/TensorFlow2.0-Examples writes it: depth 4, 64 base
filters doubling to 1024, two 3x3 ReLU 'same' convolutions per level, dropout
0.5 at the two deepest levels, 2x upsampling followed by a 2x2 convolution, skip
concatenation, a 2-channel 3x3 ReLU head and a 1x1 sigmoid output.
Saving and loading are in mito/model_files.py.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from mito.errors import ConfigError  # noqa: E402

__all__ = ["UNetConfig", "ConfigError", "build_unet", "compile_unet", "receptive_field", "LOSSES", "SegmentationLoss"]


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


def build_unet(config: UNetConfig = UNetConfig(), dtype_policy: str | None = None) -> tf.keras.Model:
    """Build an uncompiled, fully convolutional U-Net.

    Input ``(batch, y, x, 1)`` float32 in [0, 1] with y and x multiples of
    ``config.alignment``; output ``(batch, y, x, 1)`` float32 probabilities.
    Layer names are deterministic (``enc0_conv1`` ... ``output``).
    ``dtype_policy``: a Keras mixed-precision policy for the layers (e.g.
    'mixed_bfloat16': float32 weights, 16-bit arithmetic; the output stays
    float32); None builds under the global policy (float32 unless changed).
    """
    if dtype_policy is None:
        return _build_unet(config)
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(dtype_policy)
    try:
        return _build_unet(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def _build_unet(config: UNetConfig) -> tf.keras.Model:
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


















































