"""Scoring a model on a labelled split: per-image scores, their mean, the kinds of mistakes, and the files that say so."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import numpy as np

import data
from mito.files import atomic_write, write_json
from mito.metrics import ERROR_KINDS, SCORE_NAMES, error_breakdown, mean_scores, segmentation_scores
from mito.overlay import overlay

ERROR_BAND = 2  # pixels: wrong pixels this close to a true edge count as boundary errors


def score_split(segmenter, dataset, split: str, output, model_path, overlays: bool = False,
                adaptation: dict | None = None) -> dict:
    """Score ``segmenter`` on ``<dataset>/<split>``; print the table, write scores.csv and summary.json to ``output``.

    ``segmenter``: a ``mito.segmenter.Segmenter``; ``adaptation``: how its model was adapted to these
    slices (mito.adaptation), recorded in the summary. Returns the summary. Raises DataError for a bad split
    or an output folder that cannot be made, before anything is written.
    """
    from tqdm import tqdm

    pairs, images, masks = data.load_split(dataset, split)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{output}: cannot create the output folder ({error.strerror})") from None
    print(f"Model {model_path}: {segmenter.describe()}")
    print(f"Scoring {len(pairs)} images of {Path(dataset) / split}")

    rows, errors, started = [], dict.fromkeys(ERROR_KINDS, 0), time.time()
    for pair, image, mask in tqdm(list(zip(pairs, images, masks)), desc="test", unit="image", file=sys.stderr):
        predicted = segmenter.mask(segmenter.probability(image))
        rows.append({"image": pair.image.name, **segmentation_scores(predicted, mask)})
        for kind, count in error_breakdown(predicted, mask, ERROR_BAND).items():
            errors[kind] += count
        if overlays:
            (output / "overlays").mkdir(exist_ok=True)
            picture = overlay(segmenter.normalize(image), [(mask, (0, 255, 0)), (predicted, (255, 0, 255))])
            data.write_image(output / "overlays" / f"{pair.image.stem}.png", picture)
    seconds = time.time() - started
    mean = mean_scores(rows)
    shares = print_scores(rows, mean, errors)
    write_scores(output / "scores.csv", rows)
    summary = {
        "model": str(Path(model_path).resolve()),
        "dataset": str(Path(dataset).resolve()),
        "split": split,
        "images": len(rows),
        "threshold": segmenter.threshold,
        "postprocess": segmenter.postprocess,
        "tta": segmenter.tta,
        "precision": segmenter.precision,
        "adaptation": adaptation,
        "tile_size": segmenter.tile_size,
        "overlap": segmenter.overlap,
        "mean": {name: round(value, 6) for name, value in mean.items()},
        "errors": {"band_px": ERROR_BAND, "pixels": errors, "shares": shares},
        "seconds_per_image": round(seconds / len(rows), 3),
        "pixels_scored": int(sum(mask.size for mask in masks)),
        "foreground_fraction": round(float(np.mean([mask.mean() for mask in masks])), 4),
    }
    write_json(output / "summary.json", summary)
    print(f"Wrote {output / 'scores.csv'} and {output / 'summary.json'}")
    return summary


def print_scores(rows: list[dict], mean: dict, errors: dict) -> dict:
    """The table of scores per image and mean, then the wrong pixels by kind; returns each kind's share."""
    print(f"{'image':<16}" + "".join(f"{name:>20}" for name in SCORE_NAMES))
    for row in rows + [{"image": "mean", **mean}]:
        print(f"{row['image']:<16}" + "".join(f"{row[name]:>20.4f}" for name in SCORE_NAMES))
    wrong = sum(errors.values())
    shares = {kind: round(count / wrong, 4) if wrong else 0.0 for kind, count in errors.items()}
    print(f"Wrong pixels {wrong}: false objects {shares['false_objects']:.1%}, missed objects "
          f"{shares['missed_objects']:.1%}, within {ERROR_BAND} px of a true edge {shares['boundary']:.1%}, "
          f"other {shares['other']:.1%}")
    return shares


def write_scores(path: Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["image", *SCORE_NAMES])
    writer.writeheader()
    writer.writerows({key: (f"{value:.6f}" if key != "image" else value) for key, value in row.items()} for row in rows)
    atomic_write(path, lambda temporary: temporary.write_text(table.getvalue()))
