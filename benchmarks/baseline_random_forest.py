#!/usr/bin/env python
"""The ilastik-style classical baseline, scored side by side with a trained U-Net.

A random forest on scikit-image's multiscale_basic_features (Gaussian-smoothed
intensity, edges and texture at sigmas 1..16, like ilastik's default pixel
classifier) is trained on pixels sampled from the train split, its threshold
is tuned on the valid split like the U-Net's, and both are scored on the test
split with the same metrics code (mito.metrics.py) in one run.

  python benchmarks/baseline_random_forest.py --dataset dataset/em_mito_sample \
      --model models/em_cpu.h5

Needs scikit-learn (requirements-dev.txt).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mito.cli import Parser, positive_int, run_cli  # noqa: E402
import mito.files  # noqa: E402
import mito.metrics  # noqa: E402
import mito.model_files  # noqa: E402
import mito.segmenter  # noqa: E402

PROG = "baseline_random_forest.py"


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--dataset", default="dataset/em_mito_sample", help="dataset root (default: %(default)s)")
    parser.add_argument("--model", help="a trained U-Net (.h5) to score beside the baseline")
    parser.add_argument("--pixels", type=positive_int, default=300_000,
                        help="training pixels sampled from the train split (default: %(default)s)")
    parser.add_argument("--trees", type=positive_int, default=100, help="random forest size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--output", help="also write the comparison as JSON here")
    return parser.parse_args(argv)


def features(image):
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(image, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16)


def run(args) -> int:
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    import data
    from mito.metrics import SCORE_NAMES, mean_scores, segmentation_scores, tune_threshold

    normalization = data.DEFAULT_NORMALIZATION
    _, train_raw, train_masks = data.load_split(args.dataset, "train")
    _, valid_raw, valid_masks = data.load_split(args.dataset, "valid")
    test_pairs, test_raw, test_masks = data.load_split(args.dataset, "test")
    train_images, valid_images, test_images = ([data.normalize(image, normalization) for image in images]
                                               for images in (train_raw, valid_raw, test_raw))
    rng = np.random.default_rng(args.seed)

    started = time.time()
    per_image = args.pixels // len(train_images)
    xs, ys = [], []
    for image, mask in zip(train_images, train_masks):
        chosen = rng.choice(image.size, size=min(per_image, image.size), replace=False)
        xs.append(features(image).reshape(image.size, -1)[chosen])
        ys.append(mask.ravel()[chosen])
    forest = RandomForestClassifier(n_estimators=args.trees, min_samples_leaf=5, n_jobs=-1, random_state=args.seed)
    forest.fit(np.concatenate(xs), np.concatenate(ys))
    train_seconds = time.time() - started

    def forest_probability(image):
        return forest.predict_proba(features(image).reshape(image.size, -1))[:, 1].reshape(image.shape)

    threshold, _ = tune_threshold([forest_probability(image) for image in valid_images], valid_masks)
    results = {}
    started = time.time()
    test_probabilities = [forest_probability(image) for image in test_images]
    seconds = (time.time() - started) / len(test_images)
    for name, cut in (("random forest (threshold 0.5)", 0.5), (f"random forest (tuned {threshold:.2f})", threshold)):
        rows = [segmentation_scores(probability >= cut, mask) for probability, mask in zip(test_probabilities, test_masks)]
        results[name] = {**mean_scores(rows), "train_seconds": train_seconds, "seconds_per_slice": seconds}

    if args.model:

        model, settings = mito.model_files.load_model(args.model)
        segmenter = mito.segmenter.Segmenter(model, settings)
        started = time.time()
        rows = [segmentation_scores(segmenter.mask(segmenter.probability(image)), mask)
                for image, mask in zip(test_raw, test_masks)]
        results[f"U-Net {Path(args.model).name}"] = {
            **mean_scores(rows),
            "train_seconds": settings.training.get("seconds", float("nan")),
            "seconds_per_slice": (time.time() - started) / len(test_images),
        }

    print(f"Test split of {args.dataset} ({len(test_pairs)} slices), mean per slice:")
    print(f"{'method':<34}" + "".join(f"{name:>12}" for name in ("IoU", "Dice", "precision", "recall", "Rand", "ARAND",
                                                                 "train s", "s/slice")))
    for name, scores in results.items():
        print(f"{name:<34}" + "".join(f"{scores[key]:>12.4f}" for key in SCORE_NAMES)
              + f"{scores['train_seconds']:>12.0f}{scores['seconds_per_slice']:>12.2f}")
    if args.model and len(results) == 3:
        unet_iou = list(results.values())[-1]["iou"]
        best_forest = max(scores["iou"] for name, scores in results.items() if name.startswith("random"))
        print(f"U-Net IoU - best random forest IoU = {unet_iou - best_forest:+.4f}")
    if args.output:
        import json

        report = json.dumps({"dataset": str(Path(args.dataset).resolve()), "results": results}, indent=2)
        mito.files.atomic_write(args.output, lambda temporary: temporary.write_text(report + "\n"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
