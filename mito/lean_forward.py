"""A U-Net forward pass for tiles that computes the decoder only where the tile's kept output needs it.

A tile carries margins of the network's receptive-field reach on its inner sides, and
only its centre is kept. The encoder must see the whole tile (the bottleneck's reach
is what the margins are for), but each decoder level reaches much less far to the
output: at full resolution a few pixels, at level k about ``4 * 2**(k+1)``. So the
feature maps entering each decoder level, and the skip joined to them, are cropped to
the part that can still reach the kept output. The kept output is the same as the
whole tile's (same weights, same arithmetic), and about two thirds of a U-Net's
work, its decoder, stops paying for the margins. tests/test_lean_forward.py checks the
kept region against the full network, margins at the receptive-field reach.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# ``config`` below is a unet.UNetConfig (not imported: nothing here needs more than its fields).


def decoder_reach(config, level: int) -> int:
    """How far (full-resolution pixels) a change in the input of decoder ``level`` can move the output.

    Per level j <= ``level`` at stride s = 2**j: the 2x upsampling (up to s, by phase),
    the 2x2 'same' up-convolution (s) and two 3x3 convolutions (2 s); then the 3x3 head.
    """
    return sum(4 * 2**j for j in range(level + 1)) + (1 if config.head_filters else 0)


def decoder_crops(config, needed_from_border: int) -> list[int]:
    """Per decoder level (0 = full resolution), how many full-resolution pixels to crop on a side
    whose first needed output pixel lies ``needed_from_border`` pixels in.

    A multiple of 2**(level + 1) so the upsampled map lands on the skip's grid; never negative.
    """
    crops = []
    for level in range(config.depth):
        step = 2 ** (level + 1)
        crops.append(max(0, needed_from_border - decoder_reach(config, level)) // step * step)
    return crops


def layer_names(config) -> set[str]:
    """The names of the layers this forward pass calls, as ``unet.build_unet`` names them."""
    block = ["conv1", "conv2"] + (["bn1", "relu1", "bn2", "relu2"] if config.batch_norm else [])
    prefixes = [f"enc{level}" for level in range(config.depth)] + ["bottleneck"]
    prefixes += [f"dec{level}" for level in range(config.depth)]
    names = {f"{prefix}_{name}" for prefix in prefixes for name in block}
    for level in range(config.depth):
        names |= {f"enc{level}_pool", f"dec{level}_upsample", f"dec{level}_upconv", f"dec{level}_concat"}
    return names | {"output"} | ({"head_conv"} if config.head_filters else set())


def _crop(tensor, top, bottom, left, right):
    shape = tf.shape(tensor)
    return tensor[:, top : shape[1] - bottom, left : shape[2] - right, :]


class LeanTilePredictor:
    """``predict(batch, needed)``: the model's probabilities for a batch of tiles, computed where needed.

    batch: (n, y, x, 1) float32; needed: ((y0, y1), (x0, x1)), the part of the tiles whose
    output is wanted, or None for all of it. Returns (n, y, x, 1) float32 that equals the
    model's output inside ``needed`` and is NaN where the decoder was cropped away. The
    model must come from ``unet.build_unet`` (its layer names). Traced once for any shape.
    """

    takes_needed_region = True  # mito.tiling.predict_tiled passes the kept part of each batch

    def __init__(self, model: tf.keras.Model, config):
        self.model, self.config = model, config
        self._infer = tf.function(
            self._forward,
            input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32),
                             tf.TensorSpec([config.depth, 4], tf.int32)],
            autograph=False,
        )

    @staticmethod
    def can_run(model: tf.keras.Model, config) -> bool:
        """Whether ``model`` has the layers ``unet.build_unet`` names for ``config``."""
        return {layer.name for layer in model.layers} >= layer_names(config)

    def _block(self, prefix, x):
        layer = self.model.get_layer
        for index in (1, 2):
            x = layer(f"{prefix}_conv{index}")(x)
            if self.config.batch_norm:
                x = layer(f"{prefix}_relu{index}")(layer(f"{prefix}_bn{index}")(x, training=False))
        return x  # dropout is the identity at inference

    def _forward(self, batch, crops):
        """crops[level] = (top, bottom, left, right) in full-resolution pixels, cumulative from the tile's border."""
        layer, depth = self.model.get_layer, self.config.depth
        x, skips = batch, []
        for level in range(depth):
            x = self._block(f"enc{level}", x)
            skips.append(x)
            x = layer(f"enc{level}_pool")(x)
        x = self._block("bottleneck", x)
        done = tf.zeros([4], tf.int32)  # what is already cropped from x, in full-resolution pixels
        for level in reversed(range(depth)):
            extra = (crops[level] - done) // 2 ** (level + 1)
            x = _crop(x, extra[0], extra[1], extra[2], extra[3])
            x = layer(f"dec{level}_upconv")(layer(f"dec{level}_upsample")(x))
            skip_crop = crops[level] // 2**level
            skip = _crop(skips[level], skip_crop[0], skip_crop[1], skip_crop[2], skip_crop[3])
            x = self._block(f"dec{level}", layer(f"dec{level}_concat")([skip, x]))
            done = crops[level]
        if self.config.head_filters:
            x = layer("head_conv")(x)
        return layer("output")(x)

    def crops_for(self, tile_shape, needed) -> np.ndarray:
        """(depth, 4) crops for tiles of ``tile_shape`` whose output is needed in ``needed``."""
        if needed is None:
            return np.zeros((self.config.depth, 4), np.int32)
        (y0, y1), (x0, x1) = needed
        distances = (y0, tile_shape[0] - y1, x0, tile_shape[1] - x1)
        return np.array([decoder_crops(self.config, distance) for distance in distances], np.int32).T

    def __call__(self, batch: np.ndarray, needed=None) -> np.ndarray:
        batch = np.asarray(batch, np.float32)
        crops = self.crops_for(batch.shape[1:3], needed)
        computed = self._infer(tf.convert_to_tensor(batch), tf.convert_to_tensor(crops)).numpy()
        if not crops[0].any():
            return computed
        top, bottom, left, right = crops[0]
        result = np.full(batch.shape, np.nan, np.float32)
        result[:, top : batch.shape[1] - bottom, left : batch.shape[2] - right] = computed
        return result
