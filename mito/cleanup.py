"""Mask clean-up after thresholding: small objects removed, small holes filled."""

from __future__ import annotations

import numpy as np


def postprocess(mask: np.ndarray, options: dict | None) -> np.ndarray:
    """Remove objects smaller than ``min_size`` pixels, then fill holes of at most ``max_hole`` pixels.

    mask: (y, x) with nonzero foreground. options: ``{"min_size": int,
    "max_hole": int}`` as tuned on the validation split and stored in the
    model's JSON; None or zeros leave the mask as it is. Returns bool (y, x).
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    mask = np.asarray(mask) > 0
    options = options or {}
    if options.get("min_size", 0) > 1:
        mask = remove_small_objects(mask, max_size=options["min_size"] - 1)
    if options.get("max_hole", 0) > 0:
        mask = remove_small_holes(mask, max_size=options["max_hole"])
    return mask
