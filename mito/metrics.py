"""Segmentation scores for binary mitochondria masks, and threshold tuning.

All functions take masks as (y, x) arrays where nonzero is foreground.

- Rand index: pair counting over all pixels of the two binary masks (two
  clusters each), 1.0 for identical masks.
- Adapted Rand error (SNEMI3D/CREMI convention, scikit-image): on connected
  components, background of the ground truth ignored; 0.0 is perfect.
- Foreground IoU (Jaccard), Dice (F1), precision and recall on pixels. When a
  ratio's denominator is empty (e.g. no mitochondria in either mask), nothing
  was missed or wrongly found, so the score is 1.0.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components
from skimage.metrics import adapted_rand_error

SCORE_NAMES = ("iou", "dice", "precision", "recall", "rand_index", "adapted_rand_error")


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / denominator if denominator else 1.0


def confusion_counts(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """(true positives, false positives, false negatives, true negatives) in pixels."""
    predicted, truth = np.asarray(predicted) > 0, np.asarray(truth) > 0
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {truth.shape}")
    tp = int(np.count_nonzero(predicted & truth))
    fp = int(np.count_nonzero(predicted)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return tp, fp, fn, predicted.size - tp - fp - fn


def rand_index(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixel pairs on which the two binary masks agree (same/different class)."""
    tp, fp, fn, tn = confusion_counts(predicted, truth)
    n = tp + fp + fn + tn

    def pairs(count):
        return count * (count - 1) // 2  # exact Python integers: no overflow

    total = pairs(n)
    if total == 0:
        return 1.0
    same_in_both = sum(pairs(c) for c in (tp, fp, fn, tn))
    same_in_truth = pairs(tp + fn) + pairs(fp + tn)
    same_in_predicted = pairs(tp + fp) + pairs(fn + tn)
    disagreements = same_in_truth + same_in_predicted - 2 * same_in_both
    return 1.0 - disagreements / total


def segmentation_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """All scores of SCORE_NAMES for one binary prediction against its ground truth."""
    tp, fp, fn, _ = confusion_counts(predicted, truth)
    truth_objects = connected_components(np.asarray(truth) > 0)
    predicted_objects = connected_components(np.asarray(predicted) > 0)
    if truth_objects.max() == 0 and predicted_objects.max() == 0:
        are = 0.0  # both empty: nothing to split or merge
    else:
        are = float(adapted_rand_error(truth_objects, predicted_objects)[0])
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "rand_index": rand_index(predicted, truth),
        "adapted_rand_error": are,
    }


ERROR_KINDS = ("false_objects", "missed_objects", "boundary", "other")


def error_breakdown(predicted: np.ndarray, truth: np.ndarray, band: int = 2) -> dict[str, int]:
    """The wrong pixels (false positives and negatives) sorted by what kind of mistake they are.

    Each pixel goes to the first kind that fits: ``false_objects``, predicted objects that touch
    no true mitochondrion; ``missed_objects``, true mitochondria that no prediction touches;
    ``boundary``, within ``band`` pixels of a true mitochondrion's edge (inside or out); ``other``,
    the rest (parts of found objects missed or grown well beyond their edge). Returns pixel counts.
    """
    from skimage.morphology import dilation, disk, erosion

    predicted, truth = np.asarray(predicted) > 0, np.asarray(truth) > 0
    wrong = predicted != truth
    predicted_objects, truth_objects = connected_components(predicted), connected_components(truth)
    touching = np.unique(predicted_objects[truth])
    false_objects = wrong & (predicted_objects > 0) & ~np.isin(predicted_objects, touching)
    found = np.unique(truth_objects[predicted])
    missed_objects = wrong & (truth_objects > 0) & ~np.isin(truth_objects, found)
    footprint = disk(band)
    near_edge = dilation(truth, footprint) & ~erosion(truth, footprint)  # the image's border is no edge
    boundary = wrong & near_edge & ~false_objects & ~missed_objects
    counts = {
        "false_objects": int(np.count_nonzero(false_objects)),
        "missed_objects": int(np.count_nonzero(missed_objects)),
        "boundary": int(np.count_nonzero(boundary)),
    }
    counts["other"] = int(np.count_nonzero(wrong)) - sum(counts.values())
    return counts


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-score mean over images."""
    return {name: float(np.mean([row[name] for row in rows])) for name in SCORE_NAMES}


def tune_threshold(probabilities, masks, thresholds=None) -> tuple[float, float]:
    """The probability threshold with the best foreground IoU over all pixels.

    probabilities: list of (y, x) float arrays in [0, 1]; masks: matching
    0/1 arrays. Returns (threshold, IoU at that threshold). Uses one histogram
    per class, so trying many thresholds costs nothing extra.
    """
    thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2) if thresholds is None else np.asarray(thresholds)
    bins = np.linspace(0.0, 1.0, 1001)
    foreground = np.zeros(len(bins) - 1)
    background = np.zeros(len(bins) - 1)
    for probability, mask in zip(probabilities, masks):
        mask = np.asarray(mask) > 0
        foreground += np.histogram(probability[mask], bins)[0]
        background += np.histogram(probability[~mask], bins)[0]
    # Pixels at or above a threshold: suffix sums from the threshold's bin.
    fg_above = np.cumsum(foreground[::-1])[::-1]
    bg_above = np.cumsum(background[::-1])[::-1]
    best = (0.5, -1.0)
    for threshold in thresholds:
        index = int(np.searchsorted(bins, threshold, side="left"))
        tp = fg_above[index] if index < len(fg_above) else 0.0
        fp = bg_above[index] if index < len(bg_above) else 0.0
        fn = foreground.sum() - tp
        iou = _ratio(tp, tp + fp + fn)
        if iou > best[1]:
            best = (float(threshold), float(iou))
    return best


def tune_postprocess(masks, truths, min_sizes=(0, 16, 32, 64, 128, 256, 512), max_holes=(0, 16, 64, 256, 1024)):
    """The small-object and hole sizes with the best foreground IoU over all pixels.

    masks: thresholded predictions (list of (y, x) bool); truths: the labels.
    Returns ({"min_size": int, "max_hole": int}, IoU). Ties keep the gentler setting.
    """
    from mito.cleanup import postprocess

    best = ({"min_size": 0, "max_hole": 0}, -1.0)
    for min_size in min_sizes:
        for max_hole in max_holes:
            options = {"min_size": int(min_size), "max_hole": int(max_hole)}
            counts = np.sum([confusion_counts(postprocess(mask, options), truth)[:3]
                             for mask, truth in zip(masks, truths)], axis=0)
            iou = _ratio(counts[0], counts.sum())
            if iou > best[1] + 1e-9:
                best = (options, float(iou))
    return best


# --- per-mitochondrion measurements ---------------------------------------------

_REGION_PROPERTIES = {
    "area": "area_px",
    "perimeter": "perimeter_px",
    "axis_major_length": "major_axis_px",
    "axis_minor_length": "minor_axis_px",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
    "centroid-0": "centroid_y_px",
    "centroid-1": "centroid_x_px",
}
# Lengths scale with the pixel size, areas with its square.
_NM_COLUMNS = {"area_px": ("area_nm2", 2), "perimeter_px": ("perimeter_nm", 1), "major_axis_px": ("major_axis_nm", 1),
               "minor_axis_px": ("minor_axis_nm", 1), "centroid_y_px": ("centroid_y_nm", 1),
               "centroid_x_px": ("centroid_x_nm", 1)}


def label_instances(mask: np.ndarray) -> np.ndarray:
    """Connected components of a binary mask (8-connected), numbered 1..n; uint16, or uint32 if needed."""
    labels = connected_components(np.asarray(mask) > 0)
    return labels.astype(np.uint16 if labels.max() < 2**16 else np.uint32)


def measure_mitochondria(instances: np.ndarray, pixel_size: float | None = None) -> list[dict]:
    """One row per labelled mitochondrion: label, area, perimeter, major/minor axis,
    eccentricity, solidity, centroid, in pixels and, given the pixel size in nm, in nm."""
    from skimage.measure import regionprops_table

    if not np.any(instances):
        return []
    table = regionprops_table(np.asarray(instances), properties=("label", "area", "perimeter", "axis_major_length",
                                                                 "axis_minor_length", "eccentricity", "solidity",
                                                                 "centroid"))
    rows = []
    for index, label in enumerate(table["label"]):
        row = {"label": int(label)}
        row.update({column: float(table[key][index]) for key, column in _REGION_PROPERTIES.items()})
        if pixel_size:
            row.update({name: row[column] * pixel_size**power for column, (name, power) in _NM_COLUMNS.items()})
        rows.append(row)
    return rows


def slice_summary(instances: np.ndarray, pixel_size: float | None = None) -> dict:
    """Count, mitochondrial area fraction and mean size of one slice's instances."""
    areas = np.bincount(np.asarray(instances).ravel())[1:]
    areas = areas[areas > 0]
    summary = {
        "count": int(len(areas)),
        "area_fraction": float(areas.sum() / np.asarray(instances).size),
        "mean_area_px": float(areas.mean()) if len(areas) else 0.0,
    }
    if pixel_size:
        summary["mean_area_nm2"] = summary["mean_area_px"] * pixel_size**2
    return summary
