#!/usr/bin/env python
"""What a few labelled slices of a new dataset buy: zero-shot, from scratch and fine-tuned, side by side.

A model trained on one dataset (the parent, e.g. the SBEM sample) meets a new one
(another lab's EM). On the new dataset's test split this scores:

- zero-shot: the parent as it is, and adapted without labels (--adapt-batchnorm);
- from scratch on 1, 2 and 4 labelled training slices (+ 1 validation slice), and on
  all of them: the cpu preset's architecture and learning rate, for as many steps as
  the fine-tuning (all slices: the whole cpu preset);
- fine-tuned from the parent on the same slices (--preset finetune);
- the reverse direction: the model trained from scratch on all the new slices,
  fine-tuned on 2 slices of the parent's dataset, and scored on that dataset's test split,
  beside training from scratch on those 2 slices.

Every model is trained and scored by the scripts a user runs (training_mito.py,
test_mito.py), in child processes; a model already in --work is reused, so an
interrupted benchmark continues where it stopped. Which slices: spread evenly
over the sorted training slices; validation: the first validation slice.

  python benchmarks/own_data.py --parent-dataset dataset/em_mito_sample --new-dataset my_new_data
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mito.cli import Parser, run_cli  # noqa: E402
from mito.presets import PRESETS  # noqa: E402

PROG = "own_data.py"
REPO = Path(__file__).resolve().parents[1]
FEW_SLICES = (1, 2, 4)
COLUMNS = ("iou", "dice", "precision", "recall")


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--parent-dataset", required=True, help="dataset root the parent model is trained on")
    parser.add_argument("--new-dataset", required=True, help="dataset root of the new EM (train/, valid/, test/)")
    parser.add_argument("--parent", help="a trained parent model (default: train one with --preset cpu)")
    parser.add_argument("--work", default="results/own_data", help="models, slice subsets and scores "
                        "(default: %(default)s)")
    parser.add_argument("--slices", type=int, nargs="+", default=list(FEW_SLICES),
                        help="labelled training slices of the new dataset, for the few-slice rows "
                             "(default: %(default)s)")
    parser.add_argument("--training-options", default="",
                        help="options added to every training command, e.g. \"--epochs 1 --steps-per-epoch 5\" "
                             "for a quick check of the benchmark itself")
    parser.add_argument("--pixel-sizes", type=float, nargs=2, metavar=("PARENT_NM", "NEW_NM"),
                        help="nm per pixel of the two datasets: every training and scoring command gets its "
                             "dataset's --pixel-size (a --parent model must record its own)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["all-slices", "reverse"],
                        help="leave out the rows on all slices, or the reverse direction")
    return parser.parse_args(argv)


SIZES: dict = {}  # dataset root -> its --pixel-size options (empty without --pixel-sizes)


def dataset_source(subset_root: Path) -> Path | None:
    """The dataset a subset made by ``subset`` links to (its test split is a link to the source's)."""
    test = subset_root / "test"
    return test.resolve().parent if test.is_symlink() else None


def spread(items: list, count: int) -> list:
    """``count`` items evenly spread over ``items`` (the middle one for one)."""
    return [items[int((index + 0.5) * len(items) / count)] for index in range(count)]


def subset(root: Path, count: int, folder: Path) -> Path:
    """A dataset of ``count`` training slices of ``root`` and its first validation slice, test split whole;
    made of symbolic links, the originals untouched."""
    for split, names in (("train", spread(slice_names(root, "train"), count)),
                         ("valid", slice_names(root, "valid")[:1])):
        for kind in ("images", "labels"):
            target = folder / split / kind
            target.mkdir(parents=True, exist_ok=True)
            for name in names:
                link = target / name
                if not link.exists():
                    link.symlink_to((root / split / kind / name).resolve())
    test = folder / "test"
    if not test.exists():
        test.symlink_to((root / "test").resolve(), target_is_directory=True)
    return folder


def slice_names(root: Path, split: str) -> list[str]:
    return sorted(path.name for path in (root / split / "images").iterdir() if not path.name.startswith("."))


def run_script(arguments: list[str], log: Path) -> float:
    """Run one of our scripts to the end; its wall time in seconds. Its output goes to ``log``."""
    started = time.time()
    with open(log, "w") as stream:
        result = subprocess.run([sys.executable, *arguments], cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if result.returncode:
        raise SystemExit(f"{PROG}: {' '.join(arguments[:1])} failed (exit {result.returncode}); see {log}")
    return time.time() - started


def train(model: Path, arguments: list[str], extra: str = "") -> float | None:
    """Train ``model`` unless it exists; the wall time, or None for a model trained before."""
    if model.exists():
        return None
    dataset = Path(arguments[arguments.index("--dataset") + 1])
    sizes = SIZES.get(dataset.resolve()) or SIZES.get(dataset_source(dataset), [])
    return run_script(["training_mito.py", "--model", str(model), *arguments, *sizes, *shlex.split(extra)],
                      model.with_suffix(".log"))


def score(model: Path, dataset: Path, name: str, work: Path, options: list[str]) -> dict:
    """The mean test scores of ``model`` on ``dataset``, from test_mito.py's summary.json."""
    output = work / "scores" / name
    if not (output / "summary.json").exists():
        run_script(["test_mito.py", "--model", str(model), "--dataset", str(dataset), "--output", str(output),
                    "--precision", "float32", *SIZES.get(dataset.resolve(), []), *options], work / "scores" / f"{name}.log")
    return json.loads((output / "summary.json").read_text())["mean"]


def training_seconds(model: Path) -> float:
    """Training time as the model's JSON records it (the run that made it, even in an earlier benchmark)."""
    settings = json.loads(model.with_suffix(".json").read_text())
    return settings["training"]["seconds"]


def row(table: list, name: str, slices, model: Path, dataset: Path, work: Path, trained: bool = True,
        adapted: bool = False) -> None:
    """One line of the table: ``model`` scored on ``dataset``'s test split (``adapted``: with
    --adapt-batchnorm, the statistics re-estimated on those test slices, without their labels)."""
    name += ", --adapt-batchnorm" if adapted else ""
    options = ["--adapt-batchnorm"] if adapted else []
    scores = score(model, dataset, model.stem + "_on_" + dataset.name + ("_adapted" if adapted else ""), work,
                   options)
    seconds = f"{training_seconds(model):.0f}" if trained else "-"
    table.append([name, str(slices), seconds] + [f"{scores[column]:.4f}" for column in COLUMNS])
    print(" | ".join(table[-1]), flush=True)


def pixel_size_options(args, dataset_kind: str) -> list[str]:
    """``--pixel-size`` of the parent's or the new dataset, when --pixel-sizes gives them."""
    if not args.pixel_sizes:
        return []
    return ["--pixel-size", f"{args.pixel_sizes[0 if dataset_kind == 'parent' else 1]:g}"]


def run(args) -> int:
    work = Path(args.work)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    parent_data, new_data = Path(args.parent_dataset), Path(args.new_dataset)
    SIZES.update({parent_data.resolve(): pixel_size_options(args, "parent"),
                  new_data.resolve(): pixel_size_options(args, "new")})
    parent = Path(args.parent) if args.parent else work / "parent_cpu.h5"
    train(parent, ["--dataset", str(parent_data), "--preset", "cpu"], args.training_options)
    finetune = PRESETS["finetune"]
    same_budget = ["--preset", "cpu", "--epochs", str(finetune["epochs"]),
                   "--steps-per-epoch", str(finetune["steps_per_epoch"])]
    table = []
    print("row | training slices | training s | IoU | Dice | precision | recall", flush=True)
    row(table, "zero-shot: the parent", 0, parent, new_data, work, trained=False)
    row(table, "zero-shot: the parent", 0, parent, new_data, work, trained=False, adapted=True)
    for count in args.slices:
        data = subset(new_data, count, work / "data" / f"new_{count}")
        for kind, options in (("scratch", same_budget), ("finetune", ["--init-from", str(parent)])):
            model = work / f"{kind}_{count}.h5"
            train(model, ["--dataset", str(data), *options], args.training_options)
            row(table, f"{'from scratch' if kind == 'scratch' else 'fine-tuned'}, same steps", count, model,
                new_data, work)
    if "all-slices" not in args.skip:
        count = len(slice_names(new_data, "train"))
        new_cpu = work / "new_cpu.h5"
        train(new_cpu, ["--dataset", str(new_data), "--preset", "cpu"], args.training_options)
        row(table, "from scratch, whole cpu preset", count, new_cpu, new_data, work)
        model = work / f"finetune_{count}.h5"
        train(model, ["--dataset", str(new_data), "--init-from", str(parent)], args.training_options)
        row(table, "fine-tuned", count, model, new_data, work)
        if "reverse" not in args.skip:
            reverse(table, new_cpu, parent_data, same_budget, work, args.training_options)
    print_table(table)
    return 0


def reverse(table: list, new_model: Path, parent_data: Path, same_budget: list, work: Path, extra: str) -> None:
    """The new dataset's model back on 2 slices of the parent's dataset."""
    data = subset(parent_data, 2, work / "data" / "parent_2")
    row(table, "reverse, zero-shot", 0, new_model, parent_data, work, trained=False)
    row(table, "reverse, zero-shot", 0, new_model, parent_data, work, trained=False, adapted=True)
    for kind, options in (("scratch", same_budget), ("finetune", ["--init-from", str(new_model)])):
        model = work / f"reverse_{kind}_2.h5"
        train(model, ["--dataset", str(data), *options], extra)
        row(table, f"reverse, {'from scratch' if kind == 'scratch' else 'fine-tuned'}", 2, model, parent_data,
            work)


def print_table(table: list) -> None:
    print("\n| row | training slices | training s | IoU | Dice | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for line in table:
        print("| " + " | ".join(line) + " |")


def main(argv=None) -> int:
    return run_cli(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
