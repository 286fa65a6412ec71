"""The model on a Dask worker: loaded once per worker process, with TensorFlow's threads set so that several
workers share the cores instead of fighting over them."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@functools.lru_cache(maxsize=2)
def worker_segmenter(model: str, options: tuple, threads: int | None):
    """A ``Segmenter`` for ``model`` with the inference ``options`` (``freeze``'s hashable form), cached per
    process, so each worker loads the model once. ``threads``: TensorFlow's intra-op threads (None:
    TensorFlow's default, every core), set before TensorFlow runs its first operation in this process."""
    from mito.cli import import_tensorflow_quietly

    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import_tensorflow_quietly()  # without the start-up lines of TensorFlow, once per worker
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already ran in this process (a worker thread of the client, in tests)
            pass
    from mito.model_files import load_model
    from mito.segmenter import Segmenter

    loaded, settings = load_model(model)
    keywords = {key: dict(value) if key == "postprocess" else value for key, value in options}
    return Segmenter(loaded, settings, **keywords)


def loader(model: str, options: dict, threads: int | None):
    """A picklable ``() -> Segmenter`` for ``mito.blockwise.Job``: each worker calls it, the first call loads."""
    frozen = tuple(sorted((key, tuple(sorted(value.items())) if isinstance(value, dict) else value)
                          for key, value in options.items()))
    return functools.partial(worker_segmenter, str(model), frozen, threads)
