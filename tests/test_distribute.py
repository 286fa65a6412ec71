"""Distributed training: MirroredStrategy on 2 logical CPU devices, multi-worker training with
TF_CONFIG (legacy tf-keras), and the per-worker share of the training tiles."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, TINY_TRAINING, TINY_TRAINING_XLA

from mito.stack_writer import StackWriter
import data
import training_mito
import mito.augmentation
import mito.demo
import mito.distribute
import mito.files
import mito.model_files
import mito.prediction

# The README's two-host example uses these options; here both hosts are 127.0.0.1.
TWO_STEP_EPOCHS = ["--epochs", "2", "--steps-per-epoch", "3", "--learning-rate", "0.01"]


def run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (TensorFlow's devices are fixed once it starts)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_mirrored_strategy_trains_two_cpu_replicas_in_sync(small_dataset, tmp_path):
    model_path = tmp_path / "two.h5"
    argv = ["--dataset", str(small_dataset), "--model", str(model_path), "--devices", "cpu:2",
            *TINY_TRAINING, *TWO_STEP_EPOCHS, "--epochs", "3"]
    # Keep a handle on the compiled model to look at each replica's copy of the weights.
    code = textwrap.dedent(f"""
        import json, numpy as np, training_mito, unet
        models = []
        compile_unet = unet.compile_unet
        unet.compile_unet = lambda model, *a, **k: models.append(model) or compile_unet(model, *a, **k)
        assert training_mito.main({argv!r}) == 0
        copies = [[replica.numpy() for replica in weight.value.values] for weight in models[0].weights]
        print(json.dumps({{"replicas": len(copies[0]),
                          "identical": all(np.array_equal(c, w[0]) for w in copies for c in w)}}))
    """)
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"replicas": 2, "identical": True}
    assert "Replicas    2 (" in result.stdout
    settings = json.loads(model_path.with_suffix(".json").read_text())
    per_replica = int(TINY_TRAINING[TINY_TRAINING.index("--batch-size") + 1])
    assert settings["training"]["replicas"] == 2
    assert settings["training"]["global_batch_size"] == 2 * per_replica
    assert settings["training"]["devices"] == "cpu:2"
    losses = settings["history"]["loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("value, message", [
    ("gpu", "expected 'all', 'cpu', 'cpu:N' or GPU indices"),
    ("cpu:0", "expected 'all', 'cpu', 'cpu:N' or GPU indices"),
])
def test_devices_option_rejects_bad_values(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training_mito.parse_args(["--devices", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(tf.config.list_physical_devices("GPU"), reason="checks the error on a machine without GPUs")
def test_devices_naming_a_missing_gpu_is_one_line_error(small_dataset, tmp_path, capsys):
    argv = ["--dataset", str(small_dataset), "--model", str(tmp_path / "m.h5"), "--devices", "0", *TINY_TRAINING]
    assert training_mito.main(argv) == 2
    error = capsys.readouterr().err
    assert "--devices 0: no GPU 0" in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(tf.config.list_physical_devices("GPU"), reason="checks the strategy of a machine without GPUs")
def test_without_a_gpu_training_runs_on_the_cpu_alone_with_xla(small_dataset, tmp_path, capsys):
    strategy = mito.distribute.make_strategy("all")
    assert strategy.num_replicas_in_sync == 1 and mito.distribute.replica_devices(strategy) == ["CPU"]
    argv = ["--dataset", str(small_dataset), "--model", str(tmp_path / "m.h5"), *TINY_TRAINING_XLA]
    assert training_mito.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Replicas    1 (CPU)" in printed and "deterministic on, XLA on" in printed
    assert json.loads((tmp_path / "m.json").read_text())["training"]["options"]["xla"] is True


def test_xla_with_determinism_on_several_replicas_is_refused_in_one_line(small_dataset, tmp_path):
    code = textwrap.dedent(f"""
        import sys, training_mito
        sys.exit(training_mito.main({["--dataset", str(small_dataset), "--model", str(tmp_path / "m.h5"),
                                      "--devices", "cpu:2", *TINY_TRAINING, "--xla", "--deterministic"]!r}))
    """)
    result = run_python(code)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "--xla with --deterministic" in error[0]
    assert not (tmp_path / "m.h5").exists()


def test_multi_worker_on_keras_3_explains_the_legacy_switch(small_dataset, tmp_path, monkeypatch, capsys):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    argv = ["--dataset", str(small_dataset), "--model", str(tmp_path / "m.h5"), *TINY_TRAINING]
    assert training_mito.main(argv) == 2
    error = capsys.readouterr().err
    assert "TF_USE_LEGACY_KERAS=1" in error and "keras-team/keras#20585" in error
    assert not list(tmp_path.iterdir())


def test_each_replica_gets_its_own_share_of_every_global_batch(small_dataset):
    _, images, masks = data.load_split(small_dataset, "train")
    images = [data.normalize(image) for image in images]
    tiles = mito.augmentation.TrainingTiles(images, masks, tile_size=32, batch_size=4, steps_per_epoch=3, seed=5)
    shares = []
    for pipeline in range(2):  # two workers with one replica each
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=2)
        shares.append([x.numpy() for x, _ in tiles.dataset(0, 2, input_context=context)])
    assert [len(share) for share in shares] == [6, 6]  # 2 epochs x 3 steps, one element per step
    for step in range(6):
        first, second = shares[0][step], shares[1][step]
        assert first.shape == second.shape == (2, 32, 32, 1)  # per-replica batch = global 4 / 2 replicas
        assert not np.array_equal(first, second)
        # Deterministic: element = that replica's part of batch (epoch, index), whatever the worker.
        np.testing.assert_array_equal(first, tiles.batch(step // 3, step % 3, share=(0, 2))[0])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None,
                    reason="multi-worker training needs tf-keras: pip install --no-deps -r requirements-multiworker.txt")
def test_two_workers_train_with_tf_config_and_only_the_chief_writes(small_dataset, tmp_path):
    model_path = tmp_path / "shared" / "two_workers.h5"
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CONFIG": json.dumps(config), "TF_USE_LEGACY_KERAS": "1"}
        command = [sys.executable, "training_mito.py", "--dataset", str(small_dataset), "--model", str(model_path),
                   *TINY_TRAINING, *TWO_STEP_EPOCHS]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], "\n".join(output[-2000:] for output in outputs)
    assert "this one the chief" in outputs[0] and "Best epoch" in outputs[0]
    assert "the chief writes the model" in outputs[1]
    model, settings = mito.model_files.load_model(model_path)  # written by tf-keras, read back by Keras 3
    assert model.get_layer("enc0_conv1").filters == int(TINY_TRAINING[TINY_TRAINING.index("--filters") + 1])
    assert settings.training["workers"] == 2 and settings.training["replicas"] == 2
    assert settings.training["global_batch_size"] == 2 * int(TINY_TRAINING[TINY_TRAINING.index("--batch-size") + 1])
    written = sorted(path.name for path in model_path.parent.iterdir())
    assert written == sorted(["two_workers.h5", "two_workers.json", "two_workers.csv", "two_workers_curves.png",
                              "two_workers.resume.json", "two_workers.resume-epoch0002.keras"])


def test_three_prediction_shards_together_equal_one_unsharded_run(tiny_model, tmp_path):
    import prediction_mito

    slices = tmp_path / "slices"
    slices.mkdir()
    rng = np.random.default_rng(3)
    for index in range(7):  # 7 files: shares of 3, 2 and 2
        data.write_image(slices / f"{index:04d}.png", mito.demo.synthetic_em_slice(rng, (96 + 8 * index, 120))[0])
    common = ["--input", str(slices), "--model", str(tiny_model), "--save-prob", "--instances"]
    assert prediction_mito.main([*common, "--output", str(tmp_path / "whole")]) == 0
    for index in (1, 2, 3):
        assert prediction_mito.main([*common, "--output", str(tmp_path / "sharded"), "--shard", f"{index}/3"]) == 0

    def outputs(folder, tables):
        return {path.name: path.read_bytes() for path in folder.iterdir() if not path.name.startswith(tables)}

    tables = ("measurements", "slices", "prediction")  # per-shard files: the tables and the run records
    whole, sharded = outputs(tmp_path / "whole", tables), outputs(tmp_path / "sharded", tables)
    assert len(whole) == 7 * 3 and whole.keys() == sharded.keys()
    assert all(whole[name] == sharded[name] for name in whole)  # byte for byte
    # Each shard measured its own files; together they are the unsharded table.
    rows = lambda path: path.read_text().splitlines()  # noqa: E731
    shard_rows = [rows(tmp_path / "sharded" / f"measurements.shard-{index}-of-3.csv") for index in (1, 2, 3)]
    whole_rows = rows(tmp_path / "whole" / "measurements.csv")
    assert all(table[0] == whole_rows[0] for table in shard_rows)
    assert sorted(row for table in shard_rows for row in table[1:]) == sorted(whole_rows[1:])
    records = [json.loads((tmp_path / "sharded" / f"prediction.shard-{index}-of-3.json").read_text())
               for index in (1, 2, 3)]
    assert all(record["threshold"] == records[0]["threshold"] and "--shard" in record["command"]
               for record in records)


def test_shard_files_cover_every_file_once():

    files = [f"{index:03d}.png" for index in range(10)]
    shares = [mito.prediction.shard_files(files, (index, 4)) for index in range(1, 5)]
    assert sorted(sum(shares, [])) == files
    assert [len(share) for share in shares] == [3, 3, 2, 2]
    assert mito.prediction.shard_files(files, None) == files


@pytest.mark.parametrize("value", ["0/3", "4/3", "2", "a/b", "1/0"])
def test_shard_option_rejects_bad_values(value, capsys):
    import prediction_mito

    with pytest.raises(SystemExit):
        prediction_mito.parse_args(["--input", "x", "--shard", value])
    assert "expected I/N with 1 <= I <= N" in capsys.readouterr().err


def test_stale_partials_of_other_machines_are_left_alone(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    local = tmp_path / f".0001.partial-{dead_pid}-{mito.files._HOST}.png"
    remote = tmp_path / f".0002.partial-{dead_pid}-another_node.png"
    alive = tmp_path / f".0003.partial-{os.getppid()}-{mito.files._HOST}.png"
    for path in (local, remote, alive):
        path.write_bytes(b"half")
    assert mito.files.remove_stale_partials(tmp_path) == 1
    assert not local.exists() and remote.exists() and alive.exists()


def test_streamed_stacks_name_their_temporary_file_after_this_machine(tmp_path):
    # A shard on another machine must see an unfinished stack as someone else's, not as stale.
    writer = StackWriter(tmp_path / "stack.tif", count=2)
    assert writer.temporary == mito.files.partial_path(tmp_path / "stack.tif")
    assert writer.temporary.name.endswith(f".partial-{os.getpid()}-{mito.files._HOST}.tif")
