"""CI's demo check: the README's demo figure is found, and a demo below it fails the run."""

import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location("check_demo_score", REPO / ".ci" / "check_demo_score.py")
check_demo_score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_demo_score)


def test_the_readme_reports_the_demo_iou_that_ci_holds_the_demo_to():
    figures = check_demo_score.readme_demo_ious(REPO / "README.md")
    assert figures and all(0.5 < figure < 1 for figure in figures)


def fake_repo(tmp_path, iou):
    (tmp_path / "README.md").write_text("| `python training_mito.py --demo`, a CPU (200 s) | 0.9000 | 0.95 |\n")
    summary = tmp_path / "results" / "demo_unet" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"mean": {"iou": iou}}))
    return tmp_path


def test_a_demo_below_the_readme_figure_minus_the_tolerance_fails(tmp_path, capsys):
    assert check_demo_score.main(fake_repo(tmp_path, 0.9000 - check_demo_score.TOLERANCE - 0.001)) == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_demo_within_the_tolerance_passes(tmp_path, capsys):
    assert check_demo_score.main(fake_repo(tmp_path, 0.8800)) == 0
    assert ": ok" in capsys.readouterr().out


def test_a_readme_without_the_figure_fails(tmp_path):
    repo = fake_repo(tmp_path, 0.95)
    (repo / "README.md").write_text("# no demo table\n")
    assert check_demo_score.main(repo) == 1
