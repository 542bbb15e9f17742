"""The command line people already know: gh/git/ruff conventions, and no surprises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from healthyluncher.cli_app import hoist_global_options
from healthyluncher.version import __version__
from tests.models import pytorch_style

COMMANDS = (
    "make-updatable",
    "export",
    "import",
    "predict",
    "retrain",
    "reset",
    "undo",
    "forget",
    "status",
)


def luncher(
    *args: str, stdin: str | None = None, columns: int = 80
) -> subprocess.CompletedProcess[str]:
    """The real command, in a subprocess (as a shell runs it)."""
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "healthyluncher", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_version(run):
    result = run("--version")
    assert result.code == 0 and result.stdout.strip() == f"luncher (healthyluncher) {__version__}"


def test_shell_completion_is_offered(run):
    result = run("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_names_every_option_whole(command):
    result = luncher(command, "--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
    assert "…" not in result.stdout and "{" not in lines[0]  # no cut names, no {images}
    options = re.findall(r"--[a-z][a-z0-9-]+", result.stdout)
    assert options and all(not option.endswith("-") for option in options)


def test_global_options_may_follow_the_command(run, pt_model, photos, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    assert run("make-updatable", pt_model, "--models-dir", elsewhere).code == 0
    assert (elsewhere / "state.json").is_file()
    result = run("predict", f"--models-dir={elsewhere}", "--json", photos["red"][0])
    assert result.code == 0 and len(result.json_lines()) == 1
    assert hoist_global_options(["--models-dir", "x", "predict", "-q", "a.jpg"]) == [
        "--models-dir",
        "x",
        "-q",
        "predict",
        "a.jpg",
    ]
    assert hoist_global_options(["retrain", "--label", "x", "--", "--debug"]) == [
        "retrain",
        "--label",
        "x",
        "--",
        "--debug",
    ]


def test_every_command_speaks_json(run, pt_model, photos, tmp_path):
    made = run("make-updatable", pt_model, "--json")
    assert made.code == 0
    assert made.json_lines()[0]["base"]["labels"] == ["healthy", "fast_food"]
    taught = run("retrain", "--label", "délicieux 🥞", "--json", photos["red"][0])
    assert "délicieux 🥞" in taught.stdout  # non-ASCII kept readable
    assert taught.json_lines()[0]["new_label"] is True
    archive = tmp_path / "b.tar.gz"
    outputs = [
        run("export", archive, "--json"),
        run("forget", photos["red"][0], "--json"),
        run("import", archive, "--json"),
        run("undo", "--json"),
        run("import", archive, "--json"),
        run("reset", "--json"),
        run("status", "--json"),
    ]
    for result in outputs:
        assert result.code == 0, result
        assert len(result.json_lines()) == 1
    assert outputs[3].json_lines()[0]["restored"] == "base"
    assert outputs[5].json_lines()[0]["removed_model"] is True
    assert outputs[6].json_lines()[0]["predicting_with"] == "base"


def test_json_errors_are_json_too(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    missing = tmp_path / "nowhere.jpg"
    result = run("retrain", "--label", "healthy", "--json", missing)
    assert result.code == 1
    assert "cannot read" in result.json_lines()[0]["error"]


def test_a_dash_reads_paths_from_stdin(pt_model, photos, models_dir):
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    listing = "\n".join(str(p) for p in photos["red"] + photos["green"]) + "\n"
    result = luncher("predict", "--json", "-", stdin=listing)
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["path"] for x in result.stdout.splitlines()] == listing.split()


def test_quiet_prints_results_and_errors_only(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    loud = run("retrain", "--label", "fast_food", photos["green"][0])
    quiet = run("--quiet", "retrain", "--label", "fast_food", photos["green"][1])
    assert "Trained" in loud.stdout and "Trained" not in quiet.stdout
    assert "before" in quiet.stdout  # the result itself stays


def test_predict_prints_one_row_per_photo_as_it_goes(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    lines = run("predict", *photos["red"], *photos["green"]).stdout.splitlines()
    assert lines[0] == "Predictions (base model)"
    assert lines[1].split()[:3] == ["photo", "label", "probability"]
    assert len(lines) == 2 + 6


def test_ctrl_c_in_a_read_only_command_does_not_talk_about_changes(
    run, pt_model, photos, monkeypatch
):
    import healthyluncher.predictor as predictor

    assert run("make-updatable", pt_model).code == 0

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(predictor.Predictor, "predict", interrupted)
    result = run("predict", photos["red"][0])
    assert result.code == 130 and result.stderr.strip() == "interrupted"


def test_a_waiting_process_says_what_it_waits_for(pt_model, photos, models_dir):
    from healthyluncher.store import ModelStore

    assert luncher("make-updatable", str(pt_model)).returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from healthyluncher.store import ModelStore\n"
            f"with ModelStore(Path({str(models_dir)!r})).lock():\n"
            "    print('held', flush=True); time.sleep(2)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    result = luncher("retrain", "--label", "healthy", str(photos["red"][0]))
    holder.wait()
    assert result.returncode == 0, result.stderr
    assert "another luncher process is changing" in result.stderr
    assert ModelStore(models_dir).read_state().personal is not None


def test_undo_after_make_updatable_brings_back_the_old_base_and_personalization(
    run, pt_model, photos, tmp_path
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    before = run("predict", "--json", *photos["green"]).json_lines()
    other = pytorch_style(tmp_path / "other.onnx", seed=5)
    assert run("make-updatable", other, "--force").code == 0
    assert run("status", "--json").json_lines()[0]["base_name"] == "other"
    undone = run("undo", "--json").json_lines()[0]
    assert undone["restored"] == "personalized"
    status = run("status", "--json").json_lines()[0]
    assert status["base_name"] == "tiny_pt" and status["examples_per_label"] == {"fast_food": 3}
    assert run("predict", "--json", *photos["green"]).json_lines() == before


def test_reset_names_thumbnails_as_thumbnails(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    result = run("reset")
    assert "3 thumbnail(s)" in result.stdout
    assert run("reset").stdout.startswith("Nothing to reset")
