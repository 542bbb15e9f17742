"""Damage in the corners of the models directory that other tests do not reach: an undo
step's files, the lock file, and the shared folders (thumbnails, cache, examples)."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthyluncher.store import ModelStore
from tests.conftest import one_line_error
from tests.test_cli import probabilities


@pytest.fixture
def two_retrains(run, pt_model, photos, models_dir) -> Path:
    """A personalized model with one undo step before it (and the base before that); the
    path of that undo step's directory."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    step = ModelStore(models_dir).read_state().history[0].personal
    assert step is not None
    return models_dir / step


DAMAGE = {
    "model.onnx": (b"not a model", "model.onnx is not a valid ONNX file"),
    "examples.npz": (b"not numpy", "examples.npz is damaged"),
    "weights.npz": (b"PK\x03\x04 cut", "weights.npz is damaged"),
    "meta.json": (b"{", "meta.json is damaged"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_undo_to_a_damaged_step_keeps_the_current_model(
    name, two_retrains, run, photos, models_dir
):
    """`undo` switched to an undo step whose files could not be read, and there is no redo:
    the working personalized model was gone for good, and the damage was only found by the
    next predict (for meta.json, undo said to run `luncher undo`, which failed again the
    same way). It now reads the step first, keeps the current model, and says what is
    wrong."""
    state = (models_dir / "state.json").read_bytes()
    before = probabilities(run, *photos["red"], *photos["green"])
    content, words = DAMAGE[name]
    target = two_retrains / name
    target.unlink()  # an undo step's model.data is a link to the base's: not this file
    target.write_bytes(content)

    line = one_line_error(run("undo"), "cannot undo", words, "was not changed")
    assert "`luncher undo`" not in line  # not the way: it is what failed
    assert (models_dir / "state.json").read_bytes() == state
    assert probabilities(run, *photos["red"], *photos["green"]) == before
    assert run("status", "--json").json_lines()[0]["undo_steps"] == 2


def test_undo_to_a_step_whose_meta_is_missing_names_the_damage(two_retrains, run, models_dir):
    (two_retrains / "meta.json").unlink()
    state = (models_dir / "state.json").read_bytes()
    one_line_error(run("undo"), "cannot undo", "incomplete", "was not changed")
    assert (models_dir / "state.json").read_bytes() == state
