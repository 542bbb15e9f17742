"""Undo, forget and the thumbnails kept for re-embedding."""

from __future__ import annotations

from healthyluncher.store import ModelStore
from tests.conftest import one_line_error
from tests.test_cli import probabilities


def test_undo_walks_back_through_retrains(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    base = probabilities(run, *photos["red"])
    assert run("retrain", "--label", "healthy", "--epochs", "30", *photos["red"]).code == 0
    first = probabilities(run, *photos["red"])
    assert run("retrain", "--label", "fast_food", "--epochs", "30", *photos["red"]).code == 0
    assert probabilities(run, *photos["red"]) != first

    result = run("undo")
    assert result.code == 0 and "Restored" in result.stdout
    assert probabilities(run, *photos["red"]) == first
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {"healthy": 3}

    assert "Back to the base" in run("undo").stdout
    assert probabilities(run, *photos["red"]) == base
    one_line_error(run("undo"), "nothing to undo")


def test_history_is_bounded(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    for i in range(6):  # the photo moves each time: a change every time
        label = ("healthy", "fast_food")[i % 2]
        assert run("retrain", "--label", label, "--epochs", "1", photos["red"][0]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["undo_steps"] == 3
    assert len([p for p in models_dir.iterdir() if p.name.startswith("personal-")]) == 4


def test_forget_removes_the_photo_and_its_traces(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    store = ModelStore(models_dir)
    thumbs = sorted((models_dir / "thumbnails").iterdir())
    assert len(thumbs) == 6

    result = run("forget", photos["red"][0])
    assert result.code == 0, result
    assert "Forgot 1 photo" in result.stdout
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"healthy": 2, "fast_food": 3}
    assert status["undo_steps"] == 0  # undo must not bring it back
    assert len(list((models_dir / "thumbnails").iterdir())) == 5
    assert store.personal_dir() is not None

    one_line_error(run("forget", photos["red"][0]), "none of these photos")


def test_forgetting_everything_returns_to_the_base(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    base = probabilities(run, *photos["red"])
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    result = run("forget", photos["red"][0].parent)
    assert result.code == 0 and "base predicts" in result.stdout
    assert probabilities(run, *photos["red"]) == base


def test_thumbnails_are_small_and_reset_removes_them(run, pt_model, tmp_path, models_dir):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (200, 40, 40)).save(big, quality=95)
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", big).code == 0
    (thumb,) = list((models_dir / "thumbnails").iterdir())
    with Image.open(thumb) as image:
        assert min(image.size) == 18  # the tiny model's resize: round(16 * 256 / 224)
    assert "cached embedding" in run("reset", "--purge").stdout
    assert not (models_dir / "thumbnails").exists()


def test_forget_without_personalization(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    one_line_error(run("forget", photos["red"][0]), "not personalized")


def test_undo_and_forget_have_help(run):
    for command in ("undo", "forget"):
        assert "Example: luncher" in run(command, "-h").stdout
