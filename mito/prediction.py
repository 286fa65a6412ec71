"""The prediction pipeline of prediction_mito.py: which files, where their outputs go, and the three
overlapping stages (read and normalise the next slice, predict this one, finish and write the previous one).
"""

from __future__ import annotations

from mito.stack_writer import StackWriter
import dataclasses
from pathlib import Path

import data
from mito.errors import DataError
from mito.files import atomic_write
from mito.overlay import overlay




def shard_files(files: list, shard: tuple[int, int] | None) -> list:
    """The I-th of N shares of ``files`` (every N-th file from the I-th): over I = 1..N the
    shares cover each file exactly once and differ in size by at most one. ``files`` must be
    in the same order in every shard (list_images sorts them)."""
    if shard is None:
        return files
    index, count = shard
    return files[index - 1 :: count]


def input_images(source: Path, recursive: bool) -> tuple[Path, list[Path]]:
    """(base folder, image files) for a folder or a single image file.

    A folder with no images of its own but images in subfolders (a dataset
    root like dataset/demo) is searched recursively. Recursive searches skip
    folders named 'labels': those hold masks, not EM slices.
    """
    if source.is_file():
        if not data.is_image_file(source):
            raise DataError(f"{source}: not a PNG, TIFF or JPEG file")
        return source.parent, [source]
    if not source.is_dir():
        raise DataError(f"{source}: input folder not found")
    images = data.list_images(source)
    if recursive or not images:
        images = [path for path in data.list_images(source, recursive=True)
                  if "labels" not in path.relative_to(source).parts[:-1]]
        if images and not recursive:
            print(f"No images directly in {source}: predicting the {len(images)} in its subfolders (labels/ skipped)")
    if not images:
        raise DataError(f"{source}: no PNG, TIFF or JPEG images found")
    return source, images


def output_paths(output: Path, relative: Path, stack: bool) -> dict[str, Path]:
    """Where each output of one input goes: same stem; a stack's outputs are stacks too."""
    stem = output / relative.with_suffix("")
    return {
        "mask": stem.with_suffix(".tif" if stack else ".png"),
        "prob": stem.with_name(stem.name + "_prob.tif"),
        "instances": stem.with_name(stem.name + "_instances.tif"),
        "overlay": stem.with_name(stem.name + ("_overlay.tif" if stack else "_overlay.png")),
    }


@dataclasses.dataclass
class Plan:
    """One input file: where its outputs go and which of them to write."""

    path: Path
    relative: Path
    count: int  # slices
    targets: dict
    missing: set

    @property
    def predicts(self) -> bool:
        return bool(self.missing & {"mask", "prob"})

    @property
    def reads_image(self) -> bool:
        return self.predicts or "overlay" in self.missing


def read_slices(plans, segmenter):
    """(plan, index, (normalised slice or None, existing mask or None)) for every slice, read one at a time.

    A file that cannot be read gives (plan, -1, DataError) instead, after any slices already read.
    """
    from itertools import repeat

    for plan in plans:
        try:
            images = data.iter_slices(plan.path) if plan.reads_image else repeat(None)
            masks = data.iter_slices(plan.targets["mask"]) if not plan.predicts else repeat(None)
            for index, image, mask in zip(range(plan.count), images, masks):
                image = None if image is None else segmenter.normalize(image)
                yield plan, index, (image, None if mask is None else (mask > 0).astype("uint8"))
        except DataError as error:
            yield plan, -1, error


class Finisher:
    """Thresholds, measures and writes each predicted slice (stacks slice by slice), then closes each file."""

    def __init__(self, segmenter, args, measurements, summaries):
        self.segmenter, self.args = segmenter, args
        self.measurements, self.summaries, self.writers = measurements, summaries, {}

    def add(self, plan, index, image, probability, mask):
        from mito.metrics import label_instances, measure_mitochondria, slice_summary

        if index == 0:
            plan.targets["mask"].parent.mkdir(parents=True, exist_ok=True)
            self.writers[plan.path] = {kind: StackWriter(plan.targets[kind], plan.count, plan.count > 1)
                                       for kind in plan.missing}
        writers = self.writers[plan.path]
        if probability is not None:
            mask = self.segmenter.mask(probability).astype("uint8")
        instances = label_instances(mask) if self.args.instances else None
        pages = {
            "prob": lambda: probability,
            "mask": lambda: mask * 255,
            "instances": lambda: instances,
            "overlay": lambda: overlay(image, [(mask, (255, 0, 255))], tint=mask),
        }
        for kind, writer in writers.items():
            writer.add(pages[kind]())
        if self.args.instances:
            key = {"image": str(plan.relative), "slice": index}
            self.summaries.append(key | slice_summary(instances, self.args.pixel_size))
            self.measurements.extend(key | row for row in measure_mitochondria(instances, self.args.pixel_size))
        if index == plan.count - 1:
            self.close(plan)

    def close(self, plan):
        writers = self.writers.pop(plan.path, {})
        for kind in ("prob", "instances", "overlay", "mask"):  # the mask last: it marks the file as done
            if kind in writers:
                writers[kind].close()

    def discard(self, plan):
        for writer in self.writers.pop(plan.path, {}).values():
            writer.discard()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows with the union of their keys as columns, written atomically."""
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["image", "slice"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda temporary: temporary.write_text(table.getvalue()))
