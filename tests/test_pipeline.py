"""training_mito.py --augmentation-engine keras|fast, and the input-pipeline benchmark (seconds, tiny sizes)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY_TRAINING

import training_mito
import mito.checkpoints
import mito.model_files


def train(argv, capsys):
    assert training_mito.main(argv) == 0
    return capsys.readouterr().out


def test_fast_augmentation_trains_resumes_with_it_and_old_runs_resume_as_keras(small_dataset, tmp_path, capsys):
    model = tmp_path / "fast.h5"
    printed = train(["--dataset", str(small_dataset), "--model", str(model), *TINY_TRAINING, "--augmentation-engine", "fast",
                     "--augmentation", "strong", "--geometry", "dihedral"], capsys)
    assert "augmentation strong (fast), geometry dihedral" in printed
    _, settings = mito.model_files.load_model(model)
    assert settings.training["options"]["augment"] == "fast"
    assert settings.training["options"]["geometry"] == "dihedral"

    printed = train(["--model", str(model), "--resume", "--epochs", "2"], capsys)  # takes the run's options
    assert "augmentation strong (fast), geometry dihedral" in printed

    resume_file = mito.checkpoints.resume_json_path(model)
    state = json.loads(resume_file.read_text())
    del state["options"]["augment"], state["options"]["geometry"]  # as written before those options existed
    resume_file.write_text(json.dumps(state))
    printed = train(["--model", str(model), "--resume", "--epochs", "3"], capsys)
    assert "augmentation strong (keras), geometry affine" in printed


def test_engine_and_strength_are_one_pair_of_options():
    args = training_mito.parse_args(["--augmentation", "none", "--preset", "cpu"])
    assert args.augmentation == "none" and args.augment == "fast"
    assert training_mito.parse_args([]).augment == "keras"  # the faithful default
    assert training_mito.parse_args(["--preset", "cpu"]).augment == "fast"  # the same transforms, 2.5x the steps
    assert training_mito.parse_args(["--preset", "cpu"]).geometry == "dihedral"
    assert training_mito.parse_args(["--preset", "gpu"]).geometry == "affine"  # the faithful recipe
    assert training_mito.parse_args(["--preset", "cpu", "--augmentation-engine", "keras"]).augment == "keras"


@pytest.mark.parametrize("options, message", [
    (["--augmentation-engine", "turbo"], "argument --augmentation-engine: invalid choice: 'turbo'"),
    (["--augment", "fast"], "--augment is now --augmentation-engine keras|fast"),
    (["--no-augment"], "--no-augment is now --augmentation none"),
    (["--tile-size", "64"], "in training --tile-size is now --train-tile-size"),
    (["--augmentation", "none", "--geometry", "dihedral"], "--geometry has no effect with --augmentation none"),
    (["--demo", "--dataset", "a", "b"], "--demo trains on the one demo dataset"),
    (["--model", "m.h5", "--resume", "--init-from", "parent.h5"], "--resume continues a run as it was started"),
])
def test_options_that_cannot_take_effect_are_one_line_errors(options, message):
    result = subprocess.run([sys.executable, str(REPO / "training_mito.py"), *options], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_pixel_size_that_cannot_take_effect_is_a_one_line_error(tiny_model, small_dataset, tmp_path):
    # The model records no training pixel size, and there are no --instances to measure in nm.
    result = subprocess.run([sys.executable, str(REPO / "prediction_mito.py"), "--input",
                             str(small_dataset / "unlabeled"), "--model", str(tiny_model), "--output",
                             str(tmp_path / "out"), "--pixel-size", "5"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pixel-size 5 has no effect" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_model_with_a_pixel_size_says_what_it_assumes_when_none_is_given(tiny_model, small_dataset, tmp_path):
    import dataclasses

    model_path = tmp_path / "at8nm.h5"
    shutil.copy(tiny_model, model_path)
    _, settings = mito.model_files.load_model(tiny_model)
    mito.model_files.write_settings(model_path, dataclasses.replace(settings, pixel_size=8.0))
    for extra, noted in (([], True), (["--pixel-size", "8"], False)):
        result = subprocess.run([sys.executable, str(REPO / "prediction_mito.py"), "--input",
                                 str(small_dataset / "unlabeled"), "--model", str(model_path), "--output",
                                 str(tmp_path / f"out{len(extra)}"), *extra], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert ("learned mitochondria at 8 nm per pixel" in result.stderr) == noted, result.stderr


def test_pipeline_benchmark_prints_one_json_line_per_measurement(small_dataset, capsys):
    from test_benchmarks import load_script

    bench = load_script("benchmarks/bench_pipeline.py")
    assert bench.main(["--quick", "--dataset", str(small_dataset)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_kind = {}
    for line in lines:
        by_kind.setdefault(line["kind"], []).append(line)
    assert [line["pipeline"] for line in by_kind["pipeline"]] == ["keras", "fast", "none"]
    assert [line["model"] for line in by_kind["model"]] == ["cpu", "gpu"]
    assert len(by_kind["verdict"]) == 6
    for line in by_kind["pipeline"] + by_kind["model"]:
        assert line["tiles_per_s"] > 0 and line["tiles_per_cpu_s"] > 0 and line["tile_size"] == 64
    for line in by_kind["verdict"]:
        expected = "input-bound" if line["pipeline_tiles_per_s"] < line["model_tiles_per_s"] else "compute-bound"
        assert line["verdict"] == expected
