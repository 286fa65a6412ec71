"""Scores against brute force and hand-computed values."""

import itertools

import numpy as np
import pytest

from mito.metrics import SCORE_NAMES, error_breakdown, mean_scores, rand_index, segmentation_scores, tune_threshold


def brute_force_rand_index(a, b):
    a, b = np.ravel(a) > 0, np.ravel(b) > 0
    pairs = list(itertools.combinations(range(a.size), 2))
    agree = sum((a[i] == a[j]) == (b[i] == b[j]) for i, j in pairs)
    return agree / len(pairs)


@pytest.mark.parametrize("seed", range(4))
def test_rand_index_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random((5, 7)) > 0.6, rng.random((5, 7)) > 0.5
    assert rand_index(a, b) == pytest.approx(brute_force_rand_index(a, b))


def test_perfect_prediction_scores_perfectly():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:15, 5:20] = 1
    mask[25:35, 22:30] = 1
    scores = segmentation_scores(mask, mask)
    assert scores == {"iou": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0,
                      "rand_index": 1.0, "adapted_rand_error": 0.0}
    assert set(scores) == set(SCORE_NAMES)


def test_pixel_scores_on_known_counts():
    truth = np.zeros((10, 10), np.uint8)
    truth[0:4, 0:5] = 1  # 20 pixels
    predicted = np.zeros_like(truth)
    predicted[2:4, 0:5] = 1  # 10 true positives
    predicted[9, :] = 1  # 10 false positives
    scores = segmentation_scores(predicted, truth)
    assert scores["iou"] == pytest.approx(10 / 30)
    assert scores["dice"] == pytest.approx(20 / 40)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)


def test_adapted_rand_error_sees_merged_objects():
    truth = np.zeros((20, 20), np.uint8)
    truth[2:8, 2:18] = 1
    truth[10:16, 2:18] = 1
    merged = truth.copy()
    merged[8:10, 8:12] = 1  # a bridge joins the two mitochondria
    scores = segmentation_scores(merged, truth)
    assert scores["iou"] > 0.95  # pixel scores barely notice...
    assert scores["adapted_rand_error"] > 0.3  # ...the object-level score does


def test_empty_masks_score_perfectly_and_misses_score_zero():
    empty = np.zeros((8, 8), np.uint8)
    assert segmentation_scores(empty, empty)["iou"] == 1.0
    full_miss = segmentation_scores(empty, np.ones((8, 8), np.uint8))
    assert full_miss["iou"] == 0.0 and full_miss["recall"] == 0.0


def test_mean_scores_average_each_score():
    rows = [dict.fromkeys(SCORE_NAMES, 0.2), dict.fromkeys(SCORE_NAMES, 0.6)]
    assert mean_scores(rows) == pytest.approx(dict.fromkeys(SCORE_NAMES, 0.4))


def test_threshold_tuning_finds_the_separating_threshold():
    rng = np.random.default_rng(0)
    mask = rng.random((64, 64)) > 0.8
    probability = np.where(mask, rng.uniform(0.62, 1.0, mask.shape), rng.uniform(0.0, 0.58, mask.shape))
    threshold, iou = tune_threshold([probability], [mask])
    assert threshold == pytest.approx(0.6)
    assert iou == pytest.approx(1.0)
    # At 0.5 some background counts as foreground: the tuned threshold is strictly better.
    assert segmentation_scores(probability >= 0.5, mask)["iou"] < iou


def test_measurements_of_known_objects():
    from mito.metrics import label_instances, measure_mitochondria, slice_summary

    mask = np.zeros((60, 80), np.uint8)
    mask[10:20, 10:40] = 1  # a 10 x 30 rectangle: 300 px
    mask[40:50, 50:55] = 1  # a 10 x 5 rectangle: 50 px
    yy, xx = np.mgrid[:60, :80]
    mask[(yy - 45) ** 2 + (xx - 20) ** 2 <= 36] = 1  # a disc of radius 6
    instances = label_instances(mask)
    assert instances.dtype == np.uint16 and instances.max() == 3
    rows = measure_mitochondria(instances, pixel_size=5.0)
    by_area = sorted(rows, key=lambda row: row["area_px"])
    disc_area = int(((yy - 45) ** 2 + (xx - 20) ** 2 <= 36).sum())
    assert [row["area_px"] for row in by_area] == [50, disc_area, 300]
    rectangle = by_area[-1]
    assert rectangle["centroid_y_px"] == pytest.approx(14.5) and rectangle["centroid_x_px"] == pytest.approx(24.5)
    assert rectangle["major_axis_px"] > 2.5 * rectangle["minor_axis_px"]
    assert rectangle["solidity"] == pytest.approx(1.0)
    assert by_area[1]["eccentricity"] < 0.3  # the disc is round
    assert rectangle["area_nm2"] == pytest.approx(300 * 25) and rectangle["centroid_x_nm"] == pytest.approx(122.5)
    summary = slice_summary(instances, pixel_size=5.0)
    assert summary["count"] == 3
    assert summary["area_fraction"] == pytest.approx((350 + disc_area) / (60 * 80))
    assert summary["mean_area_nm2"] == pytest.approx((350 + disc_area) / 3 * 25)
    assert measure_mitochondria(np.zeros((5, 5), np.uint16)) == []
    assert "area_nm2" not in measure_mitochondria(instances)[0]


def test_wrong_pixels_are_sorted_by_kind_of_mistake():
    truth = np.zeros((60, 80), bool)
    truth[5:15, 5:15] = True  # found, but one row too low: a boundary error
    truth[25:35, 40:50] = True  # missed entirely
    truth[40:60, 0:20] = True  # found exactly, touching the image's border (which is no edge)
    truth[40:56, 50:66] = True  # found with a notch cut 6 px deep into its middle: "other" beyond the band
    predicted = truth.copy()
    predicted[5, 5:15], predicted[15, 5:15] = False, True
    predicted[25:35, 40:50] = False
    predicted[2:6, 30:36] = True  # a false object, 24 px
    predicted[45:51, 52:60] = False  # 6 x 8 notch inside the fourth object (2 px inside its left edge)
    counts = error_breakdown(predicted, truth, band=2)
    assert counts["false_objects"] == 24 and counts["missed_objects"] == 100
    assert counts["boundary"] == 20
    # The notch lies wholly outside the 2-px band along the object's edge: all "other".
    assert counts["other"] == 6 * 8
    assert sum(counts.values()) == np.count_nonzero(predicted != truth)
    assert error_breakdown(truth, truth) == {"false_objects": 0, "missed_objects": 0, "boundary": 0, "other": 0}
