"""Training recipes: one base recipe (the faithful U-Net for a GPU) and, per preset, what differs from it.

Every training option's value when it is not given; explicit options win. Why each
preset is set the way it is: docs/training.md; the runs that chose it:
benchmarks/RESULTS.md and benchmarks/EXPERIMENTS.md.
"""

from __future__ import annotations

# The faithful U-Net (Ronneberger et al. 2015, as the Keras example writes it), trained as that example does.
BASE = dict(
    dataset="dataset/SNEMI3D_mito",
    model="models/unet_mito.h5",
    epochs=100,
    steps_per_epoch=100,
    batch_size=4,
    tile_size=256,
    scale=1.0,
    normalization="percentile",
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
)

# A small U-Net that trains in under 30 minutes on 2 CPU cores: batch norm (learns about twice as fast
# per step), slices at half scale (a 128 px tile then covers 256 px of tissue for the same step cost),
# the fast augmentation engine with XLA, exact flips and turns only (interpolated rotations smooth the
# texture the model must read at half scale), and the epoch whose whole validation slices score best.
CPU = dict(
    epochs=12,
    steps_per_epoch=300,
    batch_size=8,
    tile_size=128,
    scale=0.5,
    filters=8,
    dropout=0.0,
    head_filters=0,
    batch_norm=True,
    learning_rate=3e-3,
    lr_schedule="cosine",
    loss="bce_dice",
    geometry="dihedral",
    augment="fast",
    monitor="val_slice_iou",
)

OVERRIDES = {
    "gpu": {},
    "cpu": CPU,
    # Fine-tuning a trained model on 1-4 labelled slices of the user's EM in about 5 minutes on 2 CPU cores:
    # the cpu recipe (an --init-from parent brings its own architecture, normalisation and scale), a third of its
    # steps, and a tenth of its learning rate so that the steps refine what the parent knows instead of washing
    # it out (a third did no better than training from scratch; benchmarks/RESULTS.md, "Your own EM").
    "finetune": dict(CPU, epochs=6, steps_per_epoch=200, learning_rate=3e-4),
    # The synthetic demo: a few minutes on a CPU.
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
        learning_rate=2e-3,
        loss="bce_dice",
    ),
}

PRESETS = {name: BASE | overrides for name, overrides in OVERRIDES.items()}

# Options a resumed run takes from the interrupted one (all but --epochs, which may grow).
RUN_OPTIONS = (
    "preset", "dataset", "normalization", "augmentation", "steps_per_epoch", "batch_size", "tile_size", "filters",
    "augment",  # the augmentation engine; runs saved before it existed used "keras"
    "geometry",  # runs saved before it existed used "affine"
    "depth", "dropout", "head_filters", "batch_norm", "learning_rate", "lr_schedule", "loss", "foreground_weight",
    "monitor", "patience", "seed", "deterministic", "xla", "scale",
    "init_from",  # the parent model of a fine-tuning run, or None
    "precision",  # the training arithmetic; runs saved before it existed used float32
    "pixel_size", "model_pixel_size",  # each dataset's nm per pixel and the one they were resampled to, or None
)
# What runs saved before an option existed used.
RESUME_DEFAULTS = {"augment": "keras", "geometry": "affine", "xla": False, "scale": 1.0, "init_from": None,
                   "precision": "float32", "pixel_size": None, "model_pixel_size": None}
