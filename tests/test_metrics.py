"""Scores against brute force and hand-computed values."""

import itertools

import numpy as np
import pytest

from metrics import SCORE_NAMES, mean_scores, rand_index, segmentation_scores, tune_threshold


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
