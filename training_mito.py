#!/usr/bin/env python
"""Train the 2D U-Net on <dataset>/{train,valid}; save the best model as .h5 with its JSON.

Examples:
  python training_mito.py --demo                   # synthetic demo, CPU-sized, then scores it
  python training_mito.py --dataset dataset/SNEMI3D_mito --model models/unet_mito.h5
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROG = "training_mito.py"
# Every training option's value when not given, per preset; explicit options win.
PRESETS = {
    "default": dict(
        dataset="dataset/SNEMI3D_mito",
        model="models/unet_mito.h5",
        epochs=100,
        steps_per_epoch=100,
        batch_size=4,
        tile_size=256,
        filters=64,
        depth=4,
        dropout=0.5,
        head_filters=2,
        batch_norm=False,
        learning_rate=1e-4,
        loss="bce",
    ),
    "demo": dict(
        dataset="dataset/demo",
        model="models/demo_unet.h5",
        epochs=10,
        steps_per_epoch=25,
        batch_size=8,
        tile_size=128,
        filters=16,
        depth=3,
        dropout=0.0,
        head_filters=0,
        batch_norm=False,
        learning_rate=2e-3,
        loss="bce_dice",
    ),
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def default(key):
        return f"(default: {PRESETS['default'][key]}; demo: {PRESETS['demo'][key]})"

    data = parser.add_argument_group("data")
    data.add_argument("--demo", action="store_true",
                      help="use the synthetic demo (made in dataset/demo if absent) and a CPU-sized model, "
                           "then score it on the demo test split")
    data.add_argument("--dataset", help=f"dataset root with train/ and valid/ {default('dataset')}")
    data.add_argument("--normalization", choices=["percentile", "range"], default="percentile",
                      help="per-image 1-99.8 percentile stretch, or division by the dtype's maximum "
                           "(default: percentile)")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="train on plain random tiles, without geometric and intensity augmentation")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"output .h5 file; its settings go to the .json beside it {default('model')}")
    model.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    model.add_argument("--filters", type=positive_int, help=f"base filters {default('filters')}")
    model.add_argument("--depth", type=positive_int, help=f"number of poolings {default('depth')}")
    model.add_argument("--dropout", type=float, help=f"dropout at the two deepest levels {default('dropout')}")
    model.add_argument("--head-filters", type=int,
                       help=f"filters of the 3x3 layer before the output, 0 for none {default('head_filters')}")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction,
                       help=f"batch normalisation after each convolution {default('batch_norm')}")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, help=default("epochs"))
    train.add_argument("--steps-per-epoch", type=positive_int, help=default("steps_per_epoch"))
    train.add_argument("--batch-size", type=positive_int, help=f"tiles per replica (GPU) per step {default('batch_size')}")
    train.add_argument("--tile-size", type=positive_int,
                       help=f"training tile side in pixels, a multiple of 2**depth {default('tile_size')}")
    train.add_argument("--learning-rate", type=positive_float, help=default("learning_rate"))
    train.add_argument("--loss", choices=["bce", "dice", "bce_dice"], help=default("loss"))
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    train.add_argument("--workers", type=int, default=2, help="threads preparing training tiles (default: 2)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", PROG, *(sys.argv[1:] if argv is None else argv)])
    preset = PRESETS["demo" if args.demo else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.demo and args.model == PRESETS["demo"]["model"]:
        args.overwrite = True  # the demo model is ours to replace
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from data import run_cli

    return run_cli(PROG, lambda: train(args), debug=args.debug)


def train(args: argparse.Namespace) -> int:
    import numpy as np
    import tensorflow as tf

    import data
    import unet
    from metrics import tune_threshold

    started = time.time()
    config = unet.UNetConfig(
        depth=args.depth,
        base_filters=args.filters,
        dropout=args.dropout,
        head_filters=args.head_filters,
        batch_norm=args.batch_norm,
    ).validate()
    if args.tile_size % config.alignment:
        rounded = -(-args.tile_size // config.alignment) * config.alignment
        print(f"tile size {args.tile_size} is not a multiple of 2**depth = {config.alignment}: using {rounded}")
        args.tile_size = rounded
    model_path = Path(args.model)
    if model_path.suffix != ".h5":
        raise unet.ModelError(f"{model_path}: the model file must end in .h5")
    if model_path.exists() and not args.overwrite:
        raise unet.ModelError(f"{model_path}: already exists (use --overwrite to replace it, or another --model)")
    if args.demo and not data.demo_is_complete(args.dataset):
        print(f"Writing the synthetic demo dataset to {args.dataset} ...")
        data.make_demo_dataset(args.dataset)
    normalization = dict(data.DEFAULT_NORMALIZATION) if args.normalization == "percentile" else {"mode": "range"}
    _, train_images, train_masks = data.load_split(args.dataset, "train", normalization)
    valid_pairs, valid_images, valid_masks = data.load_split(args.dataset, "valid", normalization)
    try:
        model_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{model_path.parent}: cannot create the model folder ({error.strerror})") from None
    if not os.access(model_path.parent, os.W_OK):
        raise data.DataError(f"{model_path.parent}: folder is not writable")

    tf.keras.utils.set_random_seed(args.seed)
    strategy = tf.distribute.MirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_size * replicas
    print(f"Dataset     {args.dataset}: {len(train_images)} train, {len(valid_images)} valid images")
    print(f"Model       {model_path} (depth {config.depth}, {config.base_filters} base filters, "
          f"dropout {config.dropout}, batch norm {config.batch_norm})")
    print(f"Replicas    {replicas} ({', '.join(strategy.extended.worker_devices)}); "
          f"batch {args.batch_size} per replica, global batch {global_batch}")
    print(f"Training    {args.epochs} epochs x {args.steps_per_epoch} steps, tiles {args.tile_size}px, "
          f"lr {args.learning_rate}, loss {args.loss}, augmentation {'on' if args.augment else 'off'}, seed {args.seed}")

    with strategy.scope():
        model = unet.compile_unet(unet.build_unet(config), args.learning_rate, args.loss)
    train_tiles = data.TileSequence(
        train_images, train_masks, args.tile_size, global_batch, args.steps_per_epoch,
        augment=args.augment, seed=args.seed, workers=max(1, args.workers),
    )
    valid_x, valid_y = data.grid_tiles(valid_images, valid_masks, args.tile_size)
    overlap = unet.default_overlap(config)
    settings = {
        "format": "emsegmentation-mito/1",
        "unet": config.to_dict(),
        "normalization": normalization,
        "train_tile_size": args.tile_size,
        "tile_size": unet.DEFAULT_PREDICTION_TILE,
        "overlap": overlap,
        "threshold": 0.5,
        "threshold_tuned_on": None,
        "training": {
            "dataset": str(Path(args.dataset).resolve()),
            "epochs": args.epochs,
            "steps_per_epoch": args.steps_per_epoch,
            "batch_size_per_replica": args.batch_size,
            "replicas": replicas,
            "global_batch_size": global_batch,
            "learning_rate": args.learning_rate,
            "loss": args.loss,
            "augment": args.augment,
            "seed": args.seed,
            "command": args.command,
            "versions": {
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
                "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else None,
                "numpy": np.__version__,
            },
        },
        "history_csv": model_path.with_suffix(".csv").name,
        "curves_png": model_path.with_name(model_path.stem + "_curves.png").name,
    }
    checkpoint = unet.BestModelCheckpoint(model_path, settings)
    history = model.fit(
        train_tiles,
        epochs=args.epochs,
        validation_data=(valid_x, valid_y),
        validation_batch_size=global_batch,
        callbacks=[
            checkpoint,
            tf.keras.callbacks.CSVLogger(str(model_path.with_suffix(".csv"))),
            tf.keras.callbacks.TerminateOnNaN(),
        ],
        verbose=2 if not sys.stdout.isatty() else "auto",
    ).history
    if checkpoint.best_epoch is None:
        raise unet.ModelError(f"{model_path}: training produced no valid checkpoint (loss was NaN?)")
    training_seconds = time.time() - started

    # Tune the probability threshold on the validation split, with the best model.
    best, _ = unet.load_model(model_path)
    predict_fn = unet.make_predict_fn(best)
    probabilities = [
        data.predict_tiled(predict_fn, image, settings["tile_size"], overlap, config.alignment)
        for image in valid_images
    ]
    threshold, valid_iou = tune_threshold(probabilities, valid_masks)
    settings.update(
        threshold=threshold,
        threshold_tuned_on=f"valid ({len(valid_pairs)} images)",
        threshold_valid_iou=round(valid_iou, 4),
    )
    settings["training"].update(
        best_epoch=checkpoint.best_epoch,
        best_val_loss=checkpoint.best,
        seconds=round(training_seconds, 1),
    )
    settings["history"] = {key: [float(value) for value in values] for key, values in history.items()}
    unet.write_json(unet.settings_path(model_path), settings)
    plot_curves(settings["history"], model_path.with_name(settings["curves_png"]))
    print(f"Best epoch  {checkpoint.best_epoch} (val_loss {checkpoint.best:.4f}) saved to {model_path}")
    print(f"Threshold   {threshold:.2f} (validation IoU {valid_iou:.4f}) stored in {unet.settings_path(model_path)}")
    print(f"Took        {training_seconds:.0f} s")
    if args.demo:
        import test_mito

        print("\nScoring the demo model on the demo test split:")
        return test_mito.main(["--model", str(model_path), "--dataset", args.dataset])
    return 0


def plot_curves(history: dict, path: Path) -> None:
    """Loss and IoU per epoch, training and validation, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data import atomic_write

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "iou")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                axis.plot(range(1, len(values) + 1), values, style, label=(prefix or "train_") + metric)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100))
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
