#!/usr/bin/env python
"""Train the 2D U-Net on <dataset>/{train,valid}; save the best model as .h5 with its JSON.

Examples:
  python training_mito.py --demo                   # synthetic demo, CPU-sized, then scores it
  python training_mito.py --dataset dataset/SNEMI3D_mito --model models/unet_mito.h5
  python training_mito.py --preset cpu --dataset my_data --model models/my_unet.h5
  python training_mito.py --model models/unet_mito.h5 --resume   # continue an interrupted run
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mito.cli import (Parser, add_debug_option, devices_option, positive_float, positive_int, run_cli,  # noqa: E402
                      scale_factor)
from mito.presets import PRESETS, RESUME_DEFAULTS, RUN_OPTIONS  # noqa: E402

PROG = "training_mito.py"
# Options of earlier versions, refused with what replaced them.
RETIRED_OPTIONS = {
    "--augment": "--augment is now --augmentation-engine keras|fast (and --augment none is --augmentation none)",
    "--no-augment": "--no-augment is now --augmentation none",
    "--tile-size": "in training --tile-size is now --train-tile-size (--tile-size is the prediction tile of "
                   "test_mito.py and prediction_mito.py)",
}


def build_parser() -> Parser:
    """The command line of training_mito.py (the preset defaults are filled in by parse_args)."""
    parser = Parser(prog=PROG, description=__doc__)

    def default(key):
        values = "; ".join(f"{name}: {preset[key]}" for name, preset in PRESETS.items())
        return f"(default {values})"

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--preset", choices=["gpu", "cpu", "finetune"],
                        help="defaults for every option below: 'gpu' is the faithful 64-filter U-Net for a GPU "
                             "workstation (the default), 'cpu' a small U-Net that trains in under 30 minutes on "
                             "2 CPU cores, 'finetune' adapts an --init-from model to a few labelled slices in "
                             "about 5 minutes on 2 CPU cores (the default with --init-from); explicit options "
                             "override the preset")
    recipe.add_argument("--demo", action="store_true",
                        help="use the synthetic demo (made in dataset/demo if absent) and a CPU-sized model, "
                             "then score it on the demo test split")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", nargs="+", metavar="ROOT",
                      help="dataset root with train/ and valid/; several roots train one model on all of them, each "
                           "dataset drawn as often as the others whatever its size, and report the validation IoU "
                           f"of each {default('dataset')}")
    data.add_argument("--pixel-size", type=positive_float, nargs="+", metavar="NM",
                      help="nm per pixel of each --dataset (one value for all): datasets are resampled to the first's "
                           "pixel size (with --init-from, to the parent's), and the model records it, so that test "
                           "and prediction --pixel-size resample slices of another pixel size to it")
    data.add_argument("--normalization", choices=["percentile", "range"],
                      help="per-image 1-99.8 percentile stretch, or division by the dtype's maximum "
                           "(default: percentile)")
    data.add_argument("--scale", type=scale_factor,
                      help="resample the slices by this factor before the model sees them, in training and in "
                           "every later prediction (0.5 halves each side: four times less work for the same field "
                           f"of view; stored in the model's JSON) {default('scale')}")
    data.add_argument("--augmentation", choices=["none", "standard", "strong"],
                      help="how strongly training tiles are changed: geometric moves (--geometry) plus intensity "
                           "changes (brightness, contrast, gamma, noise; 'strong' also blur and wider ranges); "
                           f"'none' feeds the tiles as they are {default('augmentation')}")
    data.add_argument("--geometry", choices=["affine", "dihedral"],
                      help="how --augmentation moves a tile (image and mask alike): 'affine' rotates by any angle, "
                           "shifts, shears, zooms and flips (ImageDataGenerator's ranges; interpolated, which smooths "
                           "the texture a little), 'dihedral' only flips and rotates by multiples of 90 degrees "
                           f"(exact: pixels are moved, never interpolated) {default('geometry')}")
    data.add_argument("--augmentation-engine", dest="augment", choices=["keras", "fast"],
                      help="what computes --augmentation: 'keras' the ImageDataGenerator path (faithful), 'fast' "
                           "the same transforms as vectorised TensorFlow ops (about ten times the tiles per second; "
                           f"other random draws; one machine only) {default('augment')}")

    add_model_options(parser.add_argument_group("model"), default)
    add_training_options(parser.add_argument_group("training"), default)
    add_debug_option(parser)
    for option in RETIRED_OPTIONS:
        parser.add_argument(option, nargs="?", const="", help=argparse.SUPPRESS, dest=f"retired_{option.strip('-')}")
    return parser


def add_model_options(model, default) -> None:
    model.add_argument("--model", help=f"output .h5 file; its settings go to the .json beside it {default('model')}")
    model.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    model.add_argument("--init-from", metavar="MODEL",
                       help="fine-tune: start from this trained model's weights, with its architecture, "
                            "normalisation and scale (explicit options that differ are an error); the threshold and "
                            "clean-up are tuned again on this dataset's validation split, and the JSON records the "
                            "parent's file name and SHA-256"),
    model.add_argument("--resume", action="store_true",
                       help="continue the interrupted (or finished) run of --model from its last completed epoch, "
                            "with its options; --epochs may raise the total")
    model.add_argument("--filters", type=positive_int, help=f"base filters {default('filters')}")
    model.add_argument("--depth", type=positive_int, help=f"number of poolings {default('depth')}")
    model.add_argument("--dropout", type=float, help=f"dropout at the two deepest levels {default('dropout')}")
    model.add_argument("--head-filters", type=int,
                       help=f"filters of the 3x3 layer before the output, 0 for none {default('head_filters')}")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction,
                       help=f"batch normalisation after each convolution {default('batch_norm')}")


def add_training_options(train, default) -> None:
    train.add_argument("--epochs", type=positive_int, help=f"total epochs {default('epochs')}")
    train.add_argument("--steps-per-epoch", type=positive_int, help=default("steps_per_epoch"))
    train.add_argument("--batch-size", type=positive_int, help=f"tiles per replica (GPU) per step {default('batch_size')}")
    train.add_argument("--train-tile-size", dest="tile_size", type=positive_int,
                       help=f"training tile side in pixels, rounded up to a multiple of 2**depth {default('tile_size')}")
    train.add_argument("--learning-rate", type=positive_float, help=default("learning_rate"))
    train.add_argument("--lr-schedule", choices=["constant", "cosine"],
                       help=f"cosine decays the learning rate to 1%% over all steps {default('lr_schedule')}")
    train.add_argument("--loss", choices=["bce", "dice", "bce_dice"], help=default("loss"))
    train.add_argument("--foreground-weight", type=positive_float,
                       help=f"weight of mitochondria pixels in the cross-entropy {default('foreground_weight')}")
    train.add_argument("--monitor", choices=["val_loss", "val_iou", "val_slice_iou"],
                       help="validation score that picks the saved model and drives --patience: the loss or IoU "
                            "(at 0.5) of the validation tiles, or the IoU of the whole validation slices predicted "
                            f"as test_mito.py will, at their best threshold {default('monitor')}")
    train.add_argument("--patience", type=int,
                       help=f"stop after this many epochs without a better --monitor, 0 never {default('patience')}")
    train.add_argument("--precision", choices=["float32", "bfloat16", "auto"], default="float32",
                       help="arithmetic of training: 'bfloat16' is Keras' mixed precision (weights, batch-norm "
                            "statistics and the loss stay float32; convolutions in bfloat16), fast only on a CPU "
                            "with bfloat16 in hardware (AVX512-BF16 or AMX); 'auto' picks it there and float32 "
                            "elsewhere. The saved model is float32 whatever was trained, and the threshold is "
                            "tuned in float32 (default: float32)")
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    train.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                       help="same seed and data give the same weights (default: on without a GPU, where XLA's "
                            "CPU programs repeat exactly, or TensorFlow op determinism with --no-xla; off with a "
                            "GPU, where op determinism costs speed)")
    train.add_argument("--xla", action=argparse.BooleanOptionalAction,
                       help="compile each training step with XLA (default: on when training on the CPU alone, "
                            "where it makes a step faster; off with GPUs or several replicas, where Keras leaves "
                            "it off)")
    train.add_argument("--workers", type=positive_int, default=2, help="threads preparing training tiles (default: 2)")
    train.add_argument("--devices", type=devices_option, default="all",
                       help="'all' visible GPUs (else the CPU), GPU indices such as '0,1', 'cpu', or 'cpu:N' to split "
                            "the CPU into N replicas (tests the multi-device path without GPUs) (default: all). "
                            "With TF_CONFIG naming several workers, training runs on all of them")
    train.add_argument("--tensorboard", metavar="DIR", help="also log losses and metrics for TensorBoard to DIR")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, replacement in RETIRED_OPTIONS.items():
        if getattr(args, f"retired_{option.strip('-')}") is not None:
            parser.error(replacement)
    args.command = shlex.join(["python", PROG, *(sys.argv[1:] if argv is None else argv)])
    if args.demo and args.preset:
        parser.error("--demo brings its own preset; leave out --preset")
    if isinstance(args.dataset, list) and len(args.dataset) == 1:
        args.dataset = args.dataset[0]  # one dataset: a plain path, as runs have always recorded it
    args.preset = "demo" if args.demo else args.preset or ("finetune" if args.init_from else "gpu")
    preset = PRESETS[args.preset]
    args.explicit = {key for key in preset if getattr(args, key) is not None}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.demo and isinstance(args.dataset, list):
        parser.error("--demo trains on the one demo dataset; give several --dataset roots without --demo")
    if args.pixel_size and not args.resume:
        count = len(dataset_roots(args))
        if len(args.pixel_size) not in (1, count):
            parser.error(f"--pixel-size: give one value, or one per --dataset root ({count})")
        args.pixel_size = args.pixel_size * count if len(args.pixel_size) == 1 else args.pixel_size
    if args.init_from and args.resume:
        parser.error("--resume continues a run as it was started, its --init-from parent included; leave out "
                     "--init-from")
    if "geometry" in args.explicit and args.augmentation == "none":
        parser.error("--geometry has no effect with --augmentation none; leave one out")
    if args.demo and args.model == PRESETS["demo"]["model"]:
        args.overwrite = True  # the demo model is ours to replace
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: train(args), debug=args.debug)


def resume_options(args, state: dict) -> None:
    """Take the interrupted run's options, keeping an explicitly raised --epochs."""
    from mito.errors import ConfigError

    options = RESUME_DEFAULTS | state["options"]
    for key in RUN_OPTIONS:
        setattr(args, key, options[key])
    if "epochs" not in args.explicit:
        args.epochs = state["options"]["epochs"]
    if args.epochs < state["epoch"]:
        raise ConfigError(f"--epochs {args.epochs} is below the {state['epoch']} epochs already done")


def prepare_model_path(args) -> Path:
    """Check the model path before any work: suffix, overwrite rules, a writable folder."""
    from mito.errors import DataError, ModelError
    from mito.files import remove_stale_partials

    model_path = Path(args.model)
    if model_path.suffix != ".h5":
        raise ModelError(f"{model_path}: the model file must end in .h5")
    if model_path.exists() and not (args.overwrite or args.resume):
        raise ModelError(f"{model_path}: already exists (use --overwrite to replace it, "
                         "--resume to continue its training, or another --model)")
    try:
        model_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{model_path.parent}: cannot create the model folder ({error.strerror})") from None
    if not os.access(model_path.parent, os.W_OK):
        raise DataError(f"{model_path.parent}: folder is not writable")
    remove_stale_partials(model_path.parent)
    return model_path


def train(args: argparse.Namespace) -> int:
    from mito import checkpoints
    from mito.distribute import cluster_workers, is_chief, make_strategy

    started = time.time()
    strategy = make_strategy(args.devices)
    workers = cluster_workers()
    chief = is_chief(strategy)
    model_path = prepare_model_path(args) if chief else Path(args.model)
    state = None
    if args.resume:
        state = checkpoints.read_resume_state(model_path)
        resume_options(args, state)
    if not chief:  # other workers train alike but write into a folder that is removed at the end
        scratch = Path(tempfile.mkdtemp(prefix="mito-worker-"))
        atexit.register(shutil.rmtree, scratch, True)
        model_path = scratch / model_path.name
        args.tensorboard = args.tensorboard and str(scratch / "tensorboard")
    parent = inherit_from_parent(args) if args.init_from and not state else None
    if not state:
        choose_model_pixel_size(args, parent[1] if parent else None)
    config = parent[1].unet if parent else unet_config(args)
    split = load_training_data(args, parent[1].normalization if parent else None)
    if not args.resume:
        checkpoints.remove_resume_state(model_path)  # a fresh run must not resume an older one
    choose_determinism_and_xla(args, strategy, workers)
    run = describe_run(args, config, strategy, workers, chief, model_path, split, state)
    model = build_or_resume_model(args, config, strategy, model_path, state, parent[0] if parent else None)
    settings = resumed_settings(args, state) if state else new_settings(args, config, run, model_path,
                                                                             split["normalization"])
    if parent:
        settings.training["parent"] = parent_record(args.init_from)
    best = fit(args, model, settings, split, strategy, model_path, state, run)
    if not chief:
        print(f"Worker done ({time.time() - started:.0f} s); the chief writes the model")
        return 0
    return finish(args, model_path, settings, split, best, time.time() - started, state)


def inherit_from_parent(args):
    """The model --init-from names and its settings; its architecture, normalisation and scale become
    this run's. An explicit option that says otherwise is a ConfigError naming both values."""
    from mito.errors import ConfigError
    from mito.model_files import load_model

    model, settings = load_model(args.init_from)  # ModelError naming the file when it is no model of ours
    unet = settings.unet
    inherited = {"depth": unet.depth, "filters": unet.base_filters, "dropout": unet.dropout,
                 "head_filters": unet.head_filters, "batch_norm": unet.batch_norm, "scale": settings.scale,
                 "normalization": settings.normalization["mode"]}
    conflicts = [f"--{key.replace('_', '-')} {getattr(args, key)} (the parent has {value})"
                 for key, value in inherited.items() if key in args.explicit and getattr(args, key) != value]
    if conflicts:
        raise ConfigError(f"{args.init_from}: " + ", ".join(conflicts) + " conflicts with the model --init-from "
                          "starts from; leave those options out to inherit them")
    for key, value in inherited.items():
        setattr(args, key, value)
    unet_config(args)  # the training tile on the parent's pooling grid
    return model, settings


def choose_model_pixel_size(args, parent_settings) -> None:
    """args.model_pixel_size: the nm per pixel every dataset is resampled to and the model records (the
    parent's where it has one, else the first dataset's); None when --pixel-size is not given."""
    parent_size = parent_settings.pixel_size if parent_settings is not None else None
    args.model_pixel_size = (parent_size or args.pixel_size[0]) if args.pixel_size else None
    if parent_size and not args.pixel_size:
        print(f"note: {args.init_from} was trained at {parent_size:g} nm per pixel; give --pixel-size to resample "
              "your slices to it (without it nothing is resampled and this model records no pixel size)", file=sys.stderr)


def parent_record(path) -> dict:
    """What the JSON keeps of the parent model: its file name, where it was, and its SHA-256."""
    import hashlib

    from mito.model_files import resolve_model_path

    path = resolve_model_path(path)
    return {"model": path.name, "path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def unet_config(args):
    """The validated architecture; the training tile rounded up to the pooling grid."""
    from unet import UNetConfig

    config = UNetConfig(depth=args.depth, base_filters=args.filters, dropout=args.dropout,
                        head_filters=args.head_filters, batch_norm=args.batch_norm).validate()
    if args.tile_size % config.alignment:
        from mito.tiling import round_up

        rounded = round_up(args.tile_size, config.alignment)
        print(f"tile size {args.tile_size} is not a multiple of 2**depth = {config.alignment}: using {rounded}")
        args.tile_size = rounded
    return config


def load_training_data(args, normalization: dict | None = None) -> dict:
    """Every slice read and checked before any work: training slices normalised and resampled by
    --scale, validation slices raw (for whole-slice scoring) and cut into tiles at the model's scale."""
    import data
    from mito.augmentation import grid_tiles

    if args.demo:
        from mito.demo import demo_is_complete, make_demo_dataset

        if not demo_is_complete(args.dataset):
            print(f"Writing the synthetic demo dataset to {args.dataset} ...")
            make_demo_dataset(args.dataset)
    if normalization is None:
        normalization = dict(data.DEFAULT_NORMALIZATION) if args.normalization == "percentile" else {"mode": "range"}
    roots = dataset_roots(args)
    loaded = [(data.load_split(root, "train")[1:], data.load_split(root, "valid")[1:]) for root in roots]
    if args.pixel_size:  # every dataset at the model's pixel size, before anything else sees it
        loaded = [resample_dataset(root, splits, size, args.model_pixel_size)
                  for root, splits, size in zip(roots, loaded, args.pixel_size)]

    def model_view(images, masks):  # what the network sees: normalised, resampled by --scale
        return ([data.rescale_image(data.normalize(image, normalization), args.scale) for image in images],
                [data.rescale_mask(mask, args.scale) for mask in masks])

    split = dict(normalization=normalization, train_images=[], train_masks=[], image_weights=[], valid_raw=[],
                 valid_masks=[], valid_dataset=[])
    for number, ((train_raw, train_masks), (valid_raw, valid_masks)) in enumerate(loaded):
        images, masks = model_view(train_raw, train_masks)
        total = sum(image.size for image in images)
        split["train_images"] += images
        split["train_masks"] += masks
        split["image_weights"] += [image.size / total / len(roots) for image in images]  # datasets alike
        split["valid_raw"] += valid_raw
        split["valid_masks"] += valid_masks
        split["valid_dataset"] += [number] * len(valid_raw)
    if len(roots) == 1:
        split["image_weights"] = None  # by area, as always
    split["valid_x"], split["valid_y"] = grid_tiles(*model_view(split["valid_raw"], split["valid_masks"]),
                                                    args.tile_size)
    return split


def resample_dataset(root, splits, pixel_size: float, model_pixel_size: float):
    """A dataset's (train, valid) (images, masks) resampled from ``pixel_size`` to ``model_pixel_size`` nm."""
    import data

    factor = pixel_size / model_pixel_size
    if factor == 1:
        return splits
    print(f"Resampled   {root}: {pixel_size:g} nm to {model_pixel_size:g} nm per pixel (x{factor:g})")
    return tuple(([data.rescale_raw(image, factor) for image in images],
                  [data.rescale_mask(mask, factor) for mask in masks]) for images, masks in splits)


def dataset_roots(args) -> list[str]:
    return list(args.dataset) if isinstance(args.dataset, list) else [args.dataset]


def choose_determinism_and_xla(args, strategy, workers: int) -> None:
    """Fill in --deterministic and --xla where not given, refuse what cannot work, seed everything."""
    import tensorflow as tf

    from mito.distribute import set_op_determinism
    from mito.errors import ConfigError

    on_cpu_alone = not tf.config.list_logical_devices("GPU") and strategy.num_replicas_in_sync == 1 and workers == 1
    if args.deterministic is None:
        args.deterministic = not tf.config.list_physical_devices("GPU")
    if args.xla is None:
        args.xla = on_cpu_alone
    if args.deterministic and args.xla and not on_cpu_alone:
        raise ConfigError("--xla with --deterministic works only when training on the CPU alone: elsewhere "
                          "TensorFlow op determinism is needed, and Keras turns XLA off under it; drop one")
    # Keras turns XLA off under op determinism; XLA's CPU programs repeat exactly without it
    # (tests/test_reliability.py trains twice, and kills and resumes a run, to check that).
    set_op_determinism(args.deterministic and not args.xla)
    args.precision = resolve_training_precision(args.precision)
    tf.keras.utils.set_random_seed(args.seed)


def resolve_training_precision(precision: str) -> str:
    """'auto' is bfloat16 on a CPU that multiplies it in hardware and float32 elsewhere (GPUs included: their
    mixed precision is float16, which needs loss scaling); bfloat16 asked for on a CPU without it is warned of."""
    from mito.segmenter import cpu_supports_bfloat16, resolve_precision

    resolved = resolve_precision(precision)
    if resolved == "bfloat16" and precision != "auto" and not cpu_supports_bfloat16():
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            print("warning: this CPU has no bfloat16 hardware (AVX512-BF16 or AMX): --precision bfloat16 is "
                  "emulated and slower than float32 here", file=sys.stderr)
    return resolved


def describe_run(args, config, strategy, workers: int, chief: bool, model_path: Path, split: dict, state) -> dict:
    """Print the effective settings of the run; returns its replicas, workers and global batch."""
    from mito.distribute import replica_devices

    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_size * replicas
    print(f"Dataset     {', '.join(dataset_roots(args))}: {len(split['train_images'])} train, "
          f"{len(split['valid_raw'])} valid images" + (", each dataset drawn alike" if split["image_weights"] else ""))
    print(f"Model       {model_path} (depth {config.depth}, {config.base_filters} base filters, "
          f"dropout {config.dropout}, batch norm {config.batch_norm})")
    print(f"Replicas    {replicas} ({', '.join(replica_devices(strategy))}"
          f"{f' on each of {workers} workers, this one the chief' if workers > 1 and chief else ''}"
          f"{f' on each of {workers} workers, this one writing to {model_path.parent}' if not chief else ''}); "
          f"batch {args.batch_size} per replica, global batch {global_batch}")
    resampled = f" of slices resampled x{args.scale:g}" if args.scale != 1 else ""
    print(f"Training    preset {args.preset}: {args.epochs} epochs x {args.steps_per_epoch} steps, "
          f"tiles {args.tile_size}px{resampled}, lr {args.learning_rate} ({args.lr_schedule}), loss {args.loss}"
          f"{f' (foreground x{args.foreground_weight:g})' if args.foreground_weight != 1 else ''}, "
          f"augmentation {args.augmentation} ({args.augment})"
          f"{f', geometry {args.geometry}' if args.augmentation != 'none' else ''}, best by {args.monitor}"
          f"{f', patience {args.patience}' if args.patience else ''}, seed {args.seed}, "
          f"deterministic {'on' if args.deterministic else 'off'}, XLA {'on' if args.xla else 'off'}, "
          f"{args.precision}")
    if state:
        print(f"Resuming    after epoch {state['epoch']} from {state['checkpoint']}, with that run's options")
    return dict(replicas=replicas, workers=workers, global_batch=global_batch)


def build_or_resume_model(args, config, strategy, model_path: Path, state, parent=None):
    import tensorflow as tf

    from mito.checkpoints import load_resume_model
    from unet import build_unet, compile_unet

    with strategy.scope():
        if state:
            model = load_resume_model(model_path, state)
        else:
            learning_rate = args.learning_rate
            if args.lr_schedule == "cosine":
                learning_rate = tf.keras.optimizers.schedules.CosineDecay(
                    args.learning_rate, decay_steps=args.epochs * args.steps_per_epoch, alpha=0.01)
            policy = "mixed_bfloat16" if args.precision == "bfloat16" else None
            model = compile_unet(build_unet(config, policy), learning_rate, args.loss, args.foreground_weight,
                                 jit_compile=args.xla)
            if parent is not None:  # fine-tuning starts from the parent's weights
                model.set_weights(parent.get_weights())
        model.jit_compile = args.xla  # a resumed run compiles as it was first compiled
    return model


def run_options(args) -> dict:
    return {key: getattr(args, key) for key in RUN_OPTIONS} | {"epochs": args.epochs}


def new_settings(args, config, run: dict, model_path: Path, normalization: dict):
    """The settings of a new run: what prediction needs, and how the model was trained."""
    import numpy as np
    import tensorflow as tf

    from mito.model_files import Settings

    return Settings(
        unet=config,
        normalization=normalization,
        scale=args.scale,
        pixel_size=args.model_pixel_size,
        train_tile_size=args.tile_size,
        training={
            "dataset": (str(Path(args.dataset).resolve()) if isinstance(args.dataset, str)
                        else [str(Path(root).resolve()) for root in args.dataset]),
            "options": run_options(args),
            "replicas": run["replicas"],
            "workers": run["workers"],
            "devices": args.devices,
            "global_batch_size": run["global_batch"],
            "command": args.command,
            "versions": {
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
                "keras": getattr(tf.keras, "__version__", None),
                "numpy": np.__version__,
            },
        },
        history_csv=model_path.with_suffix(".csv").name,
        curves_png=model_path.with_name(model_path.stem + "_curves.png").name,
    )


def resumed_settings(args, state: dict):
    from mito.model_files import Settings

    settings = Settings.from_json(state["settings"], "resume point")
    settings.training.setdefault("resumed", []).append({"after_epoch": state["epoch"], "command": args.command})
    settings.training["options"]["epochs"] = args.epochs
    return settings


def fit(args, model, settings, split: dict, strategy, model_path: Path, state, run: dict):
    """Train from the first epoch not done; returns the checkpoints callback (best epoch and score)."""
    import tensorflow as tf

    from mito.checkpoints import SliceValidation, TrainingCheckpoints
    from mito.errors import ModelError
    from mito.segmenter import Segmenter

    first_epoch = state["epoch"] if state else 0
    tiles = training_tiles(args, split, run["global_batch"])
    best = TrainingCheckpoints(model_path, settings, run_options(args), state, args.monitor, args.patience)
    if run["workers"] > 1:  # each worker makes its own share of every global batch (TrainingTiles.dataset)
        train_data = strategy.distribute_datasets_from_function(
            lambda context: tiles.dataset(first_epoch, args.epochs, args.workers, context))
    else:
        train_data = tiles.dataset(first_epoch, args.epochs, args.workers)
    if first_epoch < args.epochs:
        model.fit(
            train_data,
            steps_per_epoch=args.steps_per_epoch,
            initial_epoch=first_epoch,
            epochs=args.epochs,
            shuffle=False,  # the tiles are random already
            validation_data=(split["valid_x"], split["valid_y"]),
            validation_batch_size=run["global_batch"],
            callbacks=[
                # Before the callbacks that read val_slice_iou.
                SliceValidation(lambda training: Segmenter(training, settings), split["valid_raw"],
                                split["valid_masks"]),
                # The log before the resume point: a kill between the two repeats an epoch's row on
                # resume instead of losing it.
                tf.keras.callbacks.CSVLogger(str(model_path.with_suffix(".csv")), append=bool(state)),
                best,
                tf.keras.callbacks.TerminateOnNaN(),
                *([tf.keras.callbacks.TensorBoard(args.tensorboard)] if args.tensorboard else []),
            ],
            verbose=2 if not sys.stdout.isatty() else "auto",
        )
    if best.best_epoch is None:
        raise ModelError(f"{model_path}: training produced no valid checkpoint (loss was NaN?)")
    return best


def training_tiles(args, split: dict, global_batch: int):
    """The augmented training tiles, from the engine --augmentation-engine names."""
    from mito.augmentation import GEOMETRIES, INTENSITY_AUGMENTATIONS, TrainingTiles

    if args.augment == "fast":
        from mito.fast_augmentation import FastTrainingTiles as tiles_class
    else:
        tiles_class = TrainingTiles
    return tiles_class(
        split["train_images"], split["train_masks"], args.tile_size, global_batch, args.steps_per_epoch,
        augment=args.augmentation != "none", seed=args.seed, geometry=GEOMETRIES[args.geometry],
        intensity=INTENSITY_AUGMENTATIONS.get(args.augmentation), image_weights=split["image_weights"],
    )


def valid_iou_per_dataset(args, segmenter, split: dict) -> dict:
    """Each dataset's validation IoU (all its pixels) with the tuned threshold and clean-up, printed."""
    import numpy as np

    from mito.metrics import confusion_counts

    scores = {}
    for number, root in enumerate(dataset_roots(args)):
        counts = sum(np.array(confusion_counts(segmenter.mask(segmenter.probability(image)), mask)[:3])
                     for image, mask, source in zip(split["valid_raw"], split["valid_masks"], split["valid_dataset"])
                     if source == number)
        scores[root] = round(float(counts[0] / max(counts.sum(), 1)), 4)
        print(f"Validation  {root}: IoU {scores[root]:.4f}")
    return scores


def finish(args, model_path: Path, settings, split: dict, best, seconds: float, state) -> int:
    """Tune the threshold and clean-up on the validation slices, write the JSON and curves; score the demo."""
    from mito.checkpoints import plot_curves
    from mito.model_files import load_model, settings_path, write_settings
    from mito.segmenter import Segmenter, tune_segmentation

    model, _ = load_model(model_path)
    settings = tune_segmentation(model, settings, split["valid_raw"], split["valid_masks"], progress=True)
    settings.training.update(
        best_epoch=best.best_epoch,
        **{f"best_{args.monitor}": best.best},
        seconds=round(seconds + (state["settings"]["training"].get("seconds", 0) if state else 0), 1),
    )
    if isinstance(args.dataset, list):
        settings.training["valid_iou_per_dataset"] = valid_iou_per_dataset(args, Segmenter(model, settings), split)
    write_settings(model_path, settings)
    plot_curves(settings.history, model_path.with_name(settings.curves_png))
    postprocess = settings.postprocess
    print(f"Best epoch  {best.best_epoch} ({args.monitor} {best.best:.4f}) saved to {model_path}")
    print(f"Threshold   {settings.threshold:.2f}, post-processing: objects >= {postprocess['min_size']} px, "
          f"holes <= {postprocess['max_hole']} px filled (validation IoU {settings.threshold_valid_iou:.4f}); "
          f"stored in {settings_path(model_path)}")
    print(f"Took        {seconds:.0f} s")
    if args.demo:
        from mito.evaluation import score_split

        print("\nScoring the demo model on the demo test split:")
        score_split(Segmenter(model, settings), args.dataset, "test", Path("results") / model_path.stem, model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
