"""The trainer in use: which one, what it refuses, and a broken ONNX Runtime install."""

from __future__ import annotations

import json
import os

import pytest

from healthyluncher import runtime
from healthyluncher.training import TRAINER_ENV, trainer_name
from tests.conftest import TRAINER, needs_ort, one_line_error


def test_the_expected_trainer_is_the_one_in_use():
    """CI names the trainer each environment must get; a silent fallback fails here."""
    expected = os.environ.get("LUNCHER_EXPECT_TRAINER")
    if expected is None:
        pytest.skip("LUNCHER_EXPECT_TRAINER is not set")
    assert expected == TRAINER


def test_status_names_the_trainer(run, pt_model):
    assert run("make-updatable", pt_model).code == 0
    data = json.loads(run("status", "--json").stdout)
    assert data["trainer"] == TRAINER
    assert data["version"]
    assert f"trainer           {TRAINER}" in run("status").stdout


def test_without_ort_training_deeper_cuts_are_refused_in_one_line(run, pt_model, monkeypatch):
    monkeypatch.setenv(TRAINER_ENV, "numpy")
    result = run("make-updatable", pt_model, "--trainable-layers", "2")
    assert result.code == 1 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line
    assert "onnxruntime-training-cpu" in line and "3.10 to 3.12" in line
    assert "--trainable-layers 1" in line
    assert run("make-updatable", pt_model, "--trainable-layers", "1").code == 0


@needs_ort
def test_a_deeper_base_made_elsewhere_predicts_but_does_not_retrain(
    run, pt_model, photos, monkeypatch
):
    assert run("make-updatable", pt_model, "--trainable-layers", "2").code == 0
    monkeypatch.setenv(TRAINER_ENV, "numpy")
    assert run("predict", *photos["red"]).code == 0
    result = run("retrain", "--label", "healthy", *photos["red"])
    assert result.code == 1
    assert "trains its last 2 layer(s)" in result.stderr and "still predicts" in result.stderr


def test_the_numpy_trainer_can_be_forced(monkeypatch):
    monkeypatch.setenv(TRAINER_ENV, "numpy")
    assert trainer_name() == "numpy"


def test_a_typo_in_the_trainer_variable_is_named_not_ignored(run, pt_model, photos, monkeypatch):
    """LUNCHER_TRAINER=nump used to pick the default trainer without a word."""
    assert run("make-updatable", pt_model).code == 0
    monkeypatch.setenv(TRAINER_ENV, "nump")
    result = run("retrain", "--label", "healthy", *photos["red"])
    one_line_error(result, "LUNCHER_TRAINER='nump'", "numpy or onnxruntime")
    assert run("status", "--json").code == 1
    # Empty is the default: the base's own trainer (numpy for a base without artifacts).
    monkeypatch.setenv(TRAINER_ENV, "")
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0


def test_both_onnxruntime_wheels_installed_is_named_with_its_fix(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def both(name: str) -> str:
        if name in ("onnxruntime", "onnxruntime-training-cpu"):
            return "1.19.2"
        return real(name)

    monkeypatch.setattr(metadata, "version", both)
    problem = runtime.install_problem()
    assert problem is not None
    assert "pip uninstall -y onnxruntime onnxruntime-training-cpu" in problem


def _predicted(run, photo) -> dict[str, float | None]:
    result = run("predict", "--json", photo)
    assert result.code == 0, result
    return result.json_lines()[0]["probabilities"]


@pytest.mark.parametrize("damage", [b"junk", b""])
def test_damaged_start_weights_are_plain_words_and_name_the_command(
    run, pt_model, photos, models_dir, monkeypatch, damage
):
    """A damaged head_weights.npz quoted numpy ("This file contains pickled (object) data.
    If you trust the file you can load it unsafely...") and said "make the base again"
    without saying how."""
    from healthyluncher.store import Files, ModelStore

    monkeypatch.setenv(TRAINER_ENV, "numpy")
    assert run("make-updatable", pt_model).code == 0
    path = ModelStore(models_dir).base_dir() / Files.HEAD_WEIGHTS  # type: ignore[operator]
    path.write_bytes(damage)
    line = one_line_error(
        run("retrain", "--label", "fast_food", photos["red"][0]),
        str(path),
        "make-updatable MODEL.onnx --keep-personalization",
    )
    assert "pickle" not in line and "unsafe" not in line, line


@pytest.mark.parametrize("cause", ["damaged start", "diverged"])
def test_nan_weights_never_become_the_personalized_model(
    run, pt_model, photos, models_dir, monkeypatch, cause
):
    """A NaN in the base's head_weights.npz (the numpy trainer's start) trained into a
    model that predicted null for every photo, with exit code 0."""
    import numpy as np

    from healthyluncher import numpy_trainer
    from healthyluncher.store import Files, ModelStore

    monkeypatch.setenv(TRAINER_ENV, "numpy")
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    before = _predicted(run, photos["red"][1])
    if cause == "damaged start":
        path = ModelStore(models_dir).base_dir() / Files.HEAD_WEIGHTS  # type: ignore[operator]
        with np.load(path) as data:
            weights = {name: data[name] * np.nan for name in data.files}
        np.savez(path, **weights)
        words = "damaged"
    else:
        real = numpy_trainer.train_linear

        def diverging(*args, **kwargs):
            params, loss = real(*args, **kwargs)
            return {name: value * np.inf for name, value in params.items()}, loss

        monkeypatch.setattr(numpy_trainer, "train_linear", diverging)
        words = "NaN or infinite"
    one_line_error(run("retrain", "--label", "fast_food", photos["red"][1]), words)
    assert _predicted(run, photos["red"][1]) == before


def _after(result) -> list[float]:
    assert result.code == 0, result
    return [photo["after"] for photo in json.loads(result.stdout)["photos"]]


@needs_ort
def test_a_base_made_by_the_numpy_trainer_retrains_where_onnx_runtime_trains(
    run, pt_model, photos, models_dir
):
    """A base made under LUNCHER_TRAINER=numpy has no ONNX Runtime training files; in an
    environment where ONNX Runtime trains, its retrain was refused as "damaged". Its last
    layer is one linear layer, so the numpy trainer trains it, and status says so."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRAINER_ENV, "numpy")
        assert run("make-updatable", pt_model).code == 0
        expected = _after(run("retrain", "--json", "--label", "healthy", *photos["red"]))
        assert run("undo").code == 0
    assert not any(models_dir.glob("base-*/artifacts"))
    assert json.loads(run("status", "--json").stdout)["trainer"] == "numpy"
    assert "trainer           numpy" in run("status").stdout
    # The same weights as the numpy trainer's own retrain, not a damaged base.
    assert _after(run("retrain", "--json", "--label", "healthy", *photos["red"])) == expected
    # A label of your own grows the head; a rename keeps the weights; forget retrains.
    assert run("retrain", "--label", "pancakes", "--new-label", *photos["green"]).code == 0
    assert run("labels", "rename", "pancakes", "greens").code == 0
    assert run("undo").code == 0
    assert run("forget", photos["green"][0]).code == 0
    assert run("predict", photos["green"][1]).code == 0
    # Insisting on ONNX Runtime is refused in one line that says why and what to do.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRAINER_ENV, "onnxruntime")
        one_line_error(
            run("retrain", "--label", "healthy", photos["red"][0]),
            "no ONNX Runtime training files",
            "make-updatable",
        )


@needs_ort
def test_a_base_made_by_onnx_runtime_retrains_with_the_numpy_trainer_and_back(
    run, pt_model, photos
):
    assert run("make-updatable", pt_model).code == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRAINER_ENV, "numpy")
        assert json.loads(run("status", "--json").stdout)["trainer"] == "numpy"
        assert run("retrain", "--label", "pancakes", "--new-label", *photos["green"]).code == 0
        assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    assert json.loads(run("status", "--json").stdout)["trainer"] == "onnxruntime"
    # The copy the numpy trainer made has no ONNX Runtime files of its grown head. (The
    # photo moves: taught again as pancakes, it would change nothing and train nothing.)
    assert run("retrain", "--label", "fast_food", photos["green"][0]).code == 0
    assert run("undo").code == 0
    assert run("forget", photos["red"][0]).code == 0
