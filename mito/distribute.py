"""Where training runs: tf.distribute strategies for one CPU, several GPUs, several machines."""

from __future__ import annotations

import os

from mito.errors import ConfigError


def cluster_workers() -> int:
    """Number of machines (chief + workers) that TF_CONFIG names; 1 without TF_CONFIG."""
    import json


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
        # time of a training step on 2 cores.
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy()


def replica_devices(strategy) -> list[str]:
    """The devices the strategy trains on (the default strategy has no list: the CPU alone)."""
    import tensorflow as tf

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return ["CPU"]
    return list(strategy.extended.worker_devices)


def is_chief(strategy) -> bool:
    """Whether this process writes the outputs: always on one machine; with TF_CONFIG, the chief
    (or worker 0 where the cluster has no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


def set_op_determinism(on: bool) -> None:
    """TensorFlow op determinism on or off; it is process-wide, and the public API only switches it on."""
    from tensorflow.python.framework import config

    (config.enable_op_determinism if on else config.disable_op_determinism)()
