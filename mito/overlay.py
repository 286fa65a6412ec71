"""Pictures of masks on EM slices, for people to look at."""

from __future__ import annotations

import numpy as np


def overlay(image: np.ndarray, outlines, tint: np.ndarray | None = None) -> np.ndarray:
    """An RGB picture of an EM slice with mask outlines drawn on it.

    image: (y, x) float in [0, 1]; outlines: [(mask, (r, g, b)), ...], each
    mask (y, x) with nonzero foreground; tint: a mask shaded green underneath.
    Returns (y, x, 3) uint8.
    """
    from skimage.segmentation import find_boundaries

    gray = np.clip(np.nan_to_num(image), 0, 1) * 255  # no value (NaN) shows black
    picture = np.repeat(gray[..., None], 3, axis=-1)
    if tint is not None:
        picture[tint > 0] = 0.65 * picture[tint > 0] + 0.35 * np.array([0, 255, 0])
    for mask, colour in outlines:
        picture[find_boundaries(mask > 0, mode="inner")] = colour
    return picture.astype(np.uint8)
