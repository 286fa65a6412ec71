"""Pipfile and the requirements files pin the same versions."""

import re
import tomllib

from conftest import REPO


def pins(path):
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_pipfile_and_requirements_pin_the_same_versions():
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    pipfile_pins = {}
    for section in ("packages", "dev-packages"):
        for name, spec in pipfile[section].items():
            version = spec if isinstance(spec, str) else spec["version"]
            pipfile_pins[name.lower()] = version.removeprefix("==")
    requirements = {**pins(REPO / "requirements.txt"), **pins(REPO / "requirements-dev.txt")}
    assert requirements == pipfile_pins
    gpu = pins(REPO / "requirements-gpu.txt")
    assert gpu.pop("tensorflow") == requirements["tensorflow"]
    runtime = pins(REPO / "requirements.txt")
    assert gpu == {name: version for name, version in runtime.items() if name not in ("tensorflow", "tensorflow-cpu")}


def test_multiworker_pins_match_pipfile_and_tensorflow():
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    multiworker = pins(REPO / "requirements-multiworker.txt")
    assert multiworker == {name.lower(): spec.removeprefix("==") for name, spec in pipfile["multiworker"].items()}
    # tf-keras must match TensorFlow's minor version.
    tensorflow = pins(REPO / "requirements.txt")["tensorflow"]
    assert multiworker["tf-keras"].split(".")[:2] == tensorflow.split(".")[:2]
