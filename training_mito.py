#!/usr/bin/env python
"""Train the 2D U-Net on <dataset>/{train,valid}; save the best model as .h5 with its JSON.

Examples:
  python training_mito.py --demo                   # synthetic demo, CPU-sized, then scores it
  python training_mito.py --dataset dataset/SNEMI3D_mito --model models/unet_mito.h5
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

from cli import Parser, add_debug_option, positive_float, positive_int, run_cli, scale_factor  # noqa: E402

PROG = "training_mito.py"
# Every option's value when it is not given, per preset; explicit options win.
PRESETS = {
    # The faithful U-Net (Ronneberger et al. 2015, as the Keras example writes it), for a GPU.
    "gpu": dict(
        dataset="dataset/SNEMI3D_mito",
        model="models/unet_mito.h5",
        epochs=100,
        steps_per_epoch=100,
        batch_size=4,
        tile_size=256,
        scale=1.0,
        filters=64,
        depth=4,
        dropout=0.5,
        head_filters=2,
        batch_norm=False,
        learning_rate=1e-4,
        lr_schedule="constant",
        loss="bce",
        foreground_weight=1.0,
        augmentation="standard",
        geometry="affine",
        augment="keras",
        monitor="val_loss",
        patience=0,
    ),
    # A small, fast U-Net that trains within 30 minutes on 2 CPU cores. Chosen on the real sample's
    # validation split (README "Results on real EM"): with batch norm (momentum 0.9) it learns about
    # twice as fast per step as without; 16 base filters cost 2.4x the time of 8 and gained nothing at equal
    # steps. Slices halved (scale 0.5): a 128 px tile then covers 256 px of tissue for the same step cost,
    # while mitochondria (16-100 px across) stay 8 px or more; full resolution (a stride-2 stem) cost 1.9x and
    # gained nothing. The fast augmentation engine and XLA make a step about 0.35 s, so 3,600 steps fit in
    # about 23 min (0.18 s and 11 min with AVX-512); 4,800 steps gained nothing on validation.
    # The saved epoch is the one whose whole validation slices score best, as the tuned model is judged.
    # Standard intensity changes: over three seeds they beat the strong ones on validation, test and the worst
    # case under intensity perturbations. Dihedral geometry (flips, 90-degree turns): interpolated rotations
    # and zooms smooth the texture the model must read at half scale; without them the tuned validation IoU
    # rose by 0.044 and test IoU by 0.056 over three seeds (README "Results on real EM").
    "cpu": dict(
        dataset="dataset/SNEMI3D_mito",
        model="models/unet_mito.h5",
        epochs=12,
        steps_per_epoch=300,
        batch_size=8,
        tile_size=128,
        scale=0.5,
        filters=8,
        depth=4,
        dropout=0.0,
        head_filters=0,
        batch_norm=True,
        learning_rate=3e-3,
        lr_schedule="cosine",
        loss="bce_dice",
        foreground_weight=1.0,
        augmentation="standard",
        geometry="dihedral",
        augment="fast",
        monitor="val_slice_iou",
        patience=0,
    ),
    "demo": dict(
        dataset="dataset/demo",
        model="models/demo_unet.h5",
        epochs=10,
        steps_per_epoch=25,
        batch_size=8,
        tile_size=128,
        scale=1.0,
        filters=16,
        depth=3,
        dropout=0.0,
        head_filters=0,
        batch_norm=False,
        learning_rate=2e-3,
        lr_schedule="constant",
        loss="bce_dice",
        foreground_weight=1.0,
        augmentation="standard",
        geometry="affine",
        augment="keras",
        monitor="val_loss",
        patience=0,
    ),
}
# Options a resumed run takes from the interrupted one (all but --epochs, which may grow).
RUN_OPTIONS = (
    "preset", "dataset", "normalization", "augmentation", "steps_per_epoch", "batch_size", "tile_size", "filters",
    "augment",  # the augmentation engine; runs saved before it existed used "keras"
    "geometry",  # runs saved before it existed used "affine"
    "depth", "dropout", "head_filters", "batch_norm", "learning_rate", "lr_schedule", "loss", "foreground_weight",
    "monitor", "patience", "seed", "deterministic", "xla", "scale",
)


def devices_option(text: str) -> str:
    """argparse type for --devices: 'all', 'cpu', 'cpu:N' or comma-separated GPU indices."""
    text = text.strip().lower()
    if text in ("all", "cpu"):
        return text
    count = text[4:] if text.startswith("cpu:") else None
    if count is not None and count.isdigit() and int(count) >= 1:
        return text
    if count is None and all(part.strip().isdigit() for part in text.split(",")):
        return ",".join(part.strip() for part in text.split(","))
    raise argparse.ArgumentTypeError(f"expected 'all', 'cpu', 'cpu:N' or GPU indices like '0,1', got {text!r}")


def cluster_workers() -> int:
    """Number of machines (chief + workers) that TF_CONFIG names; 1 without TF_CONFIG."""
    import json

    from unet import ConfigError

    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    except (ValueError, AttributeError):
        raise ConfigError("TF_CONFIG: not valid JSON of the form {\"cluster\": {...}, \"task\": {...}}") from None
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def make_strategy(devices: str = "all"):
    """The tf.distribute strategy for --devices and TF_CONFIG; call before TensorFlow starts its runtime.

    One machine: MirroredStrategy over the chosen GPUs (all visible ones by default); without a
    GPU the default strategy on the CPU, or MirroredStrategy over N logical CPU devices ('cpu:N').
    Several machines in TF_CONFIG: MultiWorkerMirroredStrategy, which Keras 3 (3.15) cannot drive
    through fit (keras-team/keras#20585), so it needs the legacy tf-keras (TF_USE_LEGACY_KERAS=1). Raises ConfigError for a device that is not there.
    """
    import tensorflow as tf

    from unet import ConfigError

    gpus = tf.config.list_physical_devices("GPU")
    if devices.startswith("cpu"):
        tf.config.set_visible_devices([], "GPU")
        if devices.startswith("cpu:"):
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(devices[4:]))
    elif devices != "all":
        indices = [int(index) for index in devices.split(",")]
        missing = [index for index in indices if index >= len(gpus)]
        if missing:
            raise ConfigError(f"--devices {devices}: no GPU {missing[0]} (this machine shows {len(gpus)} GPUs; "
                              "indices count from 0 among CUDA_VISIBLE_DEVICES)")
        tf.config.set_visible_devices([gpus[index] for index in indices], "GPU")
    if cluster_workers() > 1:
        if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
            raise ConfigError("TF_CONFIG names several workers: multi-worker training needs the legacy tf-keras "
                              "(Keras 3 fails in fit under MultiWorkerMirroredStrategy, keras-team/keras#20585): "
                              "pip install --no-deps tf-keras==2.21.0, then run with TF_USE_LEGACY_KERAS=1")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if devices.startswith("cpu:"):
        return tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(int(devices[4:]))])
    if devices == "cpu" or not tf.config.list_logical_devices("GPU"):
        # One CPU device: the default strategy. MirroredStrategy over the CPU alone doubled the
        # time of a training step (0.9 against 0.45 s for the cpu preset on 2 cores).
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy()


def replica_devices(strategy) -> list[str]:
    """The devices the strategy trains on (the default strategy has no list: the CPU alone)."""
    import tensorflow as tf

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return ["CPU"]
    return list(strategy.extended.worker_devices)


def set_op_determinism(on: bool) -> None:
    """TensorFlow op determinism on or off; it is process-wide, and the public API only switches it on."""
    from tensorflow.python.framework import config

    (config.enable_op_determinism if on else config.disable_op_determinism)()


def is_chief(strategy) -> bool:
    """Whether this process writes the outputs: always on one machine; with TF_CONFIG, the chief
    (or worker 0 where the cluster has no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


def build_parser() -> Parser:
    """The command line of training_mito.py (the preset defaults are filled in by parse_args)."""
    parser = Parser(prog=PROG, description=__doc__)

    def default(key):
        values = "; ".join(f"{name}: {preset[key]}" for name, preset in PRESETS.items())
        return f"(default {values})"

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--preset", choices=["gpu", "cpu"],
                        help="defaults for every option below: 'gpu' is the faithful 64-filter U-Net for a GPU "
                             "workstation (the default), 'cpu' a small U-Net that trains in under 30 minutes on "
                             "2 CPU cores; explicit options override the preset")
    recipe.add_argument("--demo", action="store_true",
                        help="use the synthetic demo (made in dataset/demo if absent) and a CPU-sized model, "
                             "then score it on the demo test split")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help=f"dataset root with train/ and valid/ {default('dataset')}")
    data.add_argument("--normalization", choices=["percentile", "range"], default="percentile",
                      help="per-image 1-99.8 percentile stretch, or division by the dtype's maximum "
                           "(default: percentile)")
    data.add_argument("--scale", type=scale_factor,
                      help="resample the slices by this factor before the model sees them, in training and in "
                           "every later prediction (0.5 halves each side: four times less work for the same field "
                           f"of view; stored in the model's JSON) {default('scale')}")
    data.add_argument("--augmentation", choices=["none", "standard", "strong"],
                      help="geometric changes (--geometry) plus intensity changes (brightness, "
                           "contrast, gamma, noise; 'strong' also blur and wider ranges) "
                           f"{default('augmentation')}")
    data.add_argument("--geometry", choices=["affine", "dihedral"],
                      help="how --augmentation moves a tile (image and mask alike): 'affine' rotates by any angle, "
                           "shifts, shears, zooms and flips (ImageDataGenerator's ranges; interpolated, which smooths "
                           "the texture a little), 'dihedral' only flips and rotates by multiples of 90 degrees "
                           f"(exact: pixels are moved, never interpolated) {default('geometry')}")
    data.add_argument("--no-augment", dest="augmentation", action="store_const", const="none",
                      help="the same as --augmentation none")
    data.add_argument("--augment", choices=["keras", "fast", "none"],
                      help="what computes the augmentation: 'keras' the ImageDataGenerator path (faithful, about "
                           "60 tiles/s on 2 cores at 256 px), 'fast' the same transforms as vectorised TensorFlow "
                           "ops (about 700 tiles/s there; other random draws), 'none' no augmentation at all "
                           f"{default('augment')}")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"output .h5 file; its settings go to the .json beside it {default('model')}")
    model.add_argument("--overwrite", action="store_true", help="replace an existing model file")
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

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, help=f"total epochs {default('epochs')}")
    train.add_argument("--steps-per-epoch", type=positive_int, help=default("steps_per_epoch"))
    train.add_argument("--batch-size", type=positive_int, help=f"tiles per replica (GPU) per step {default('batch_size')}")
    train.add_argument("--tile-size", type=positive_int,
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
                            "as test_mito.py will, at their best threshold (about 0.5 s per epoch for the "
                            f"sample's 4 validation slices at half scale on 2 cores) {default('monitor')}")
    train.add_argument("--patience", type=int,
                       help=f"stop after this many epochs without a better --monitor, 0 never {default('patience')}")
    train.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    train.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                       help="same seed and data give the same weights (default: on without a GPU, where XLA's "
                            "CPU programs repeat exactly, or TensorFlow op determinism with --no-xla; off with a "
                            "GPU, where op determinism costs speed)")
    train.add_argument("--xla", action=argparse.BooleanOptionalAction,
                       help="compile each training step with XLA (default: on when training on the CPU alone, "
                            "where a step of the cpu preset takes 0.37 s instead of 0.51 s; off with GPUs or "
                            "several replicas, where Keras leaves it off)")
    train.add_argument("--workers", type=positive_int, default=2, help="threads preparing training tiles (default: 2)")
    train.add_argument("--devices", type=devices_option, default="all",
                       help="'all' visible GPUs (else the CPU), GPU indices such as '0,1', 'cpu', or 'cpu:N' to split "
                            "the CPU into N replicas (tests the multi-device path without GPUs) (default: all). "
                            "With TF_CONFIG naming several workers, training runs on all of them")
    train.add_argument("--tensorboard", metavar="DIR", help="also log losses and metrics for TensorBoard to DIR")
    add_debug_option(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", PROG, *(sys.argv[1:] if argv is None else argv)])
    if args.demo and args.preset:
        parser.error("--demo brings its own preset; leave out --preset")
    args.preset = "demo" if args.demo else args.preset or "gpu"
    preset = PRESETS[args.preset]
    args.explicit = {key for key in preset if getattr(args, key) is not None}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.augment == "none":
        args.augmentation = "none"
    if args.demo and args.model == PRESETS["demo"]["model"]:
        args.overwrite = True  # the demo model is ours to replace
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: train(args), debug=args.debug)


def resume_options(args, state: dict) -> None:
    """Take the interrupted run's options, keeping an explicitly raised --epochs."""
    from unet import ConfigError

    # Runs saved before these options existed used these values.
    options = {"augment": "keras", "geometry": "affine", "xla": False, "scale": 1.0} | state["options"]
    for key in RUN_OPTIONS:
        setattr(args, key, options[key])
    if "epochs" not in args.explicit:
        args.epochs = state["options"]["epochs"]
    if args.epochs < state["epoch"]:
        raise ConfigError(f"--epochs {args.epochs} is below the {state['epoch']} epochs already done")


def prepare_model_path(args, data, unet) -> Path:
    """Check the model path before any work: suffix, overwrite rules, a writable folder."""
    model_path = Path(args.model)
    if model_path.suffix != ".h5":
        raise unet.ModelError(f"{model_path}: the model file must end in .h5")
    if model_path.exists() and not (args.overwrite or args.resume):
        raise unet.ModelError(f"{model_path}: already exists (use --overwrite to replace it, "
                              "--resume to continue its training, or another --model)")
    try:
        model_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data.DataError(f"{model_path.parent}: cannot create the model folder ({error.strerror})") from None
    if not os.access(model_path.parent, os.W_OK):
        raise data.DataError(f"{model_path.parent}: folder is not writable")
    data.remove_stale_partials(model_path.parent)
    return model_path


def train(args: argparse.Namespace) -> int:
    import numpy as np
    import tensorflow as tf

    import data
    import unet

    started = time.time()
    strategy = make_strategy(args.devices)
    workers = cluster_workers()
    chief = is_chief(strategy)
    model_path = prepare_model_path(args, data, unet) if chief else Path(args.model)
    state = None
    if args.resume:
        state = unet.read_resume_state(model_path)
        resume_options(args, state)
    if not chief:  # other workers train alike but write into a folder that is removed at the end
        scratch = Path(tempfile.mkdtemp(prefix="mito-worker-"))
        atexit.register(shutil.rmtree, scratch, True)
        model_path = scratch / model_path.name
        args.tensorboard = args.tensorboard and str(scratch / "tensorboard")
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
    if args.demo and not data.demo_is_complete(args.dataset):
        print(f"Writing the synthetic demo dataset to {args.dataset} ...")
        data.make_demo_dataset(args.dataset)
    normalization = dict(data.DEFAULT_NORMALIZATION) if args.normalization == "percentile" else {"mode": "range"}
    _, train_images, train_masks = data.load_split(args.dataset, "train", normalization)
    _, valid_images, valid_masks = data.load_split(args.dataset, "valid", normalization)
    # The model learns on slices resampled by --scale; the threshold is tuned on the slices as they are.
    train_images = [data.rescale_image(image, args.scale) for image in train_images]
    train_masks = [data.rescale_mask(mask, args.scale) for mask in train_masks]
    valid_x, valid_y = data.grid_tiles([data.rescale_image(image, args.scale) for image in valid_images],
                                       [data.rescale_mask(mask, args.scale) for mask in valid_masks], args.tile_size)
    if not args.resume:
        unet.remove_resume_state(model_path)  # a fresh run must not resume an older one

    on_cpu_alone = not tf.config.list_logical_devices("GPU") and strategy.num_replicas_in_sync == 1 and workers == 1
    if args.deterministic is None:
        args.deterministic = not tf.config.list_physical_devices("GPU")
    if args.xla is None:
        args.xla = on_cpu_alone
    if args.deterministic and args.xla and not on_cpu_alone:
        raise unet.ConfigError("--xla with --deterministic works only when training on the CPU alone: elsewhere "
                               "TensorFlow op determinism is needed, and Keras turns XLA off under it; drop one")
    # Keras turns XLA off under op determinism; XLA's CPU programs repeat exactly without it
    # (tests/test_reliability.py trains twice, and kills and resumes a run, to check that).
    set_op_determinism(args.deterministic and not args.xla)
    tf.keras.utils.set_random_seed(args.seed)
    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_size * replicas
    first_epoch = state["epoch"] if state else 0
    print(f"Dataset     {args.dataset}: {len(train_images)} train, {len(valid_images)} valid images")
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
          f"deterministic {'on' if args.deterministic else 'off'}, XLA {'on' if args.xla else 'off'}")
    if state:
        print(f"Resuming    after epoch {first_epoch} from {state['checkpoint']}, with that run's options")

    with strategy.scope():
        if state:
            model = unet.load_resume_model(model_path, state)
        else:
            learning_rate = args.learning_rate
            if args.lr_schedule == "cosine":
                learning_rate = tf.keras.optimizers.schedules.CosineDecay(
                    args.learning_rate, decay_steps=args.epochs * args.steps_per_epoch, alpha=0.01)
            model = unet.compile_unet(unet.build_unet(config), learning_rate, args.loss, args.foreground_weight,
                                      jit_compile=args.xla)
        model.jit_compile = args.xla  # a resumed run compiles as it was first compiled
    geometry = data.GEOMETRIES[args.geometry]
    intensity = data.INTENSITY_AUGMENTATIONS.get(args.augmentation)  # None for "none": no augmentation at all
    tiles_class = data.FastTrainingTiles if args.augment == "fast" else data.TrainingTiles
    train_tiles = tiles_class(
        train_images, train_masks, args.tile_size, global_batch, args.steps_per_epoch,
        augment=args.augmentation != "none", seed=args.seed, geometry=geometry, intensity=intensity,
    )
    options = {key: getattr(args, key) for key in RUN_OPTIONS} | {"epochs": args.epochs}
    settings = state["settings"] if state else {
        **unet.default_settings(config, normalization, args.scale),
        "train_tile_size": args.tile_size,
        "threshold_tuned_on": None,
        "training": {
            "dataset": str(Path(args.dataset).resolve()),
            "options": options,
            "replicas": replicas,
            "workers": workers,
            "devices": args.devices,
            "global_batch_size": global_batch,
            "command": args.command,
            "versions": {
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
                "keras": getattr(tf.keras, "__version__", None),
                "numpy": np.__version__,
            },
        },
        "history_csv": model_path.with_suffix(".csv").name,
        "curves_png": model_path.with_name(model_path.stem + "_curves.png").name,
    }
    if state:
        settings["training"].setdefault("resumed", []).append({"after_epoch": first_epoch, "command": args.command})
        settings["training"]["options"]["epochs"] = args.epochs
    checkpoints = unet.TrainingCheckpoints(model_path, settings, options, state, args.monitor, args.patience)
    if workers > 1:  # each worker makes its own share of every global batch (TrainingTiles.dataset)
        train_data = strategy.distribute_datasets_from_function(
            lambda context: train_tiles.dataset(first_epoch, args.epochs, args.workers, context))
    else:
        train_data = train_tiles.dataset(first_epoch, args.epochs, args.workers)
    if first_epoch < args.epochs:
        model.fit(
            train_data,
            steps_per_epoch=args.steps_per_epoch,
            initial_epoch=first_epoch,
            epochs=args.epochs,
            shuffle=False,  # the tiles are random already
            validation_data=(valid_x, valid_y),
            validation_batch_size=global_batch,
            callbacks=[
                unet.SliceValidation(settings, valid_images, valid_masks),  # before the callbacks that read it
                # The log before the resume point: a kill between the two repeats an epoch's row on
                # resume instead of losing it.
                tf.keras.callbacks.CSVLogger(str(model_path.with_suffix(".csv")), append=bool(state)),
                checkpoints,
                tf.keras.callbacks.TerminateOnNaN(),
                *([tf.keras.callbacks.TensorBoard(args.tensorboard)] if args.tensorboard else []),
            ],
            verbose=2 if not sys.stdout.isatty() else "auto",
        )
    if checkpoints.best_epoch is None:
        raise unet.ModelError(f"{model_path}: training produced no valid checkpoint (loss was NaN?)")
    if not chief:
        print(f"Worker done ({time.time() - started:.0f} s); the chief writes the model")
        return 0
    seconds = time.time() - started
    best, _ = unet.load_model(model_path)
    settings.update(unet.tune_segmentation(best, settings, valid_images, valid_masks, progress=True))
    threshold, postprocess, valid_iou = settings["threshold"], settings["postprocess"], settings["threshold_valid_iou"]
    settings["training"].update(
        best_epoch=checkpoints.best_epoch,
        **{f"best_{args.monitor}": checkpoints.best},
        seconds=round(seconds + (state["settings"]["training"].get("seconds", 0) if state else 0), 1),
    )
    unet.write_json(unet.settings_path(model_path), settings)
    plot_curves(settings["history"], model_path.with_name(settings["curves_png"]))
    print(f"Best epoch  {checkpoints.best_epoch} ({args.monitor} {checkpoints.best:.4f}) saved to {model_path}")
    print(f"Threshold   {threshold:.2f}, post-processing: objects >= {postprocess['min_size']} px, holes <= "
          f"{postprocess['max_hole']} px filled (validation IoU {valid_iou:.4f}); stored in "
          f"{unet.settings_path(model_path)}")
    print(f"Took        {seconds:.0f} s")
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
        if metric == "iou" and history.get("val_slice_iou"):
            values = history["val_slice_iou"]
            axis.plot(range(1, len(values) + 1), values, ":", label="val_slice_iou (best threshold)")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100))
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
