"""Damage in the corners of the models directory that other tests do not reach: an undo
step's files, the lock file, and the shared folders (thumbnails, cache, examples)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from healthyluncher.records import load_examples, load_personal
from healthyluncher.store import ModelStore
from tests.conftest import one_line_error, solid
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


def _luncher(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess, stopped (and the test failed) if it hangs."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "healthyluncher", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"luncher {' '.join(map(str, args))} hung")


@pytest.mark.parametrize("kind", ["named pipe", "empty directory"])
def test_a_lock_file_that_is_not_a_file_blocks_no_command(
    kind, run, pt_model, photos, models_dir, tmp_path
):
    """A named pipe as `.lock` made `export` (a reader, which opens it for reading) wait
    forever; an empty directory there failed every command that writes, `repair`
    included ("cannot open the lock file: Is a directory"), with no way out named."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    lock = models_dir / ".lock"
    lock.unlink()
    if kind == "named pipe":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    done = _luncher("export", tmp_path / "backup.tar.gz", timeout=15)
    assert done.returncode == 0, done
    done = _luncher("retrain", "--label", "fast_food", *photos["green"])
    assert done.returncode == 0, done
    assert _luncher("repair").returncode == 0
    counts = run("status", "--json").json_lines()[0]["examples_per_label"]
    assert counts == {"healthy": 3, "fast_food": 3}


def test_a_directory_with_files_as_the_lock_file_is_named(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    lock = models_dir / ".lock"
    lock.unlink()
    (lock / "something").mkdir(parents=True)
    line = one_line_error(run("retrain", "--label", "healthy", *photos["red"]), str(lock))
    assert "is damaged (a directory, not the lock file)" in line and "remove it" in line
    assert (lock / "something").is_dir()  # not luncher's to delete


@pytest.mark.parametrize("folder", ["thumbnails", "examples"])
def test_a_file_in_place_of_a_shared_folder_is_repaired(
    folder, two_retrains, run, photos, models_dir, solid_photo
):
    """A file where `thumbnails/` or `examples/` belongs: every retrain failed ("cannot
    write in .../thumbnails: File exists", naming nothing to do; for examples/ it named
    `luncher repair`), and `repair` said "state.json is intact" or failed the same way,
    so no photo could ever be taught again. The retrain now names `luncher repair`, which
    removes the file (the segments are then embedded again from the thumbnails)."""
    path = models_dir / folder
    shutil.rmtree(path)
    path.write_bytes(b"not a folder")
    line = one_line_error(run("retrain", "--label", "healthy", solid_photo), "`luncher repair`")
    assert str(path) in line
    result = run("repair")
    assert result.code == 0, result
    assert path.is_dir() or not path.exists()
    result = run("retrain", "--label", "healthy", solid_photo)
    assert result.code == 0, result
    counts = run("status", "--json").json_lines()[0]["examples_per_label"]
    assert counts == {"healthy": 4, "fast_food": 3}
    labels = [row["label"] for row in run("predict", "--json", *photos["green"]).json_lines()]
    assert labels == ["fast_food"] * 3


@pytest.fixture
def solid_photo(tmp_path: Path) -> Path:
    return solid(tmp_path / "new" / "orange.png", (220, 120, 30))


def test_a_folder_in_place_of_a_photos_thumbnail_does_not_block_teaching_it(
    two_retrains, run, models_dir, solid_photo
):
    """A directory at thumbnails/<digest>.jpg (damage) made every retrain of that photo fail
    ("cannot write in .../thumbnails: Is a directory"), and `repair` left it there."""
    digest = hashlib.sha256(solid_photo.read_bytes()).hexdigest()
    (models_dir / "thumbnails" / f"{digest}.jpg" / "inside").mkdir(parents=True)
    result = run("retrain", "--label", "healthy", solid_photo)
    assert result.code == 0, result
    thumbnail = models_dir / "thumbnails" / f"{digest}.jpg"
    assert thumbnail.is_file() and thumbnail.read_bytes().startswith(b"\xff\xd8\xff")


def test_a_damaged_thumbnail_is_left_out_of_the_backup_that_must_import(
    two_retrains, run, photos, models_dir, tmp_path, pt_model
):
    """A thumbnail damaged on disk (cut short) was packed as it was: `export` said the
    backup was written, and `import` on the new machine refused the whole backup ("cannot
    decode image: Truncated File Read; nothing was imported"), so the user found out they
    had no usable backup only when they needed it. The photo is now exported without its
    thumbnail (it restores on this base, as the output says) and the backup imports."""
    before = probabilities(run, *photos["red"], *photos["green"])
    damaged = sorted((models_dir / "thumbnails").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    backup = tmp_path / "backup.tar.gz"
    exported = run("export", "--json", backup)
    assert exported.code == 0, exported
    row = exported.json_lines()[0]
    assert (row["thumbnails"], row["without_thumbnail"]) == (5, 1)
    said = run("export", "--force", backup).stdout
    assert "1 photo(s) have no thumbnail (or a damaged one, left out)" in said

    elsewhere = tmp_path / "elsewhere"
    assert run("--models-dir", elsewhere, "make-updatable", pt_model).code == 0
    imported = run("--models-dir", elsewhere, "import", backup)
    assert imported.code == 0, imported
    after = run("--models-dir", elsewhere, "predict", "--json", *photos["red"], *photos["green"])
    assert {str(r["path"]): r["probabilities"] for r in after.json_lines()} == before
    assert len(list((elsewhere / "thumbnails").iterdir())) == 5


def test_a_folder_in_place_of_a_thumbnail_does_not_block_an_import(
    run, pt_model, photos, models_dir, tmp_path
):
    """The same damage failed every import of a backup holding that photo ("cannot write to
    ...: Is a directory; the models directory was not changed")."""
    elsewhere = tmp_path / "elsewhere"
    assert run("--models-dir", elsewhere, "make-updatable", pt_model).code == 0
    assert run("--models-dir", elsewhere, "retrain", "--label", "healthy", *photos["red"]).code == 0
    assert run("--models-dir", elsewhere, "export", tmp_path / "b.tar.gz").code == 0
    assert run("make-updatable", pt_model).code == 0
    digest = hashlib.sha256(photos["red"][0].read_bytes()).hexdigest()
    (models_dir / "thumbnails" / f"{digest}.jpg" / "inside").mkdir(parents=True)
    result = run("import", tmp_path / "b.tar.gz")
    assert result.code == 0, result
    assert (models_dir / "thumbnails" / f"{digest}.jpg").is_file()


def test_undo_to_a_step_whose_own_views_are_lost_can_still_be_repaired(
    run, pt_model, photos, models_dir, tmp_path
):
    """A segment of examples/ that only the undo step uses (the examples an import
    replaced), lost: undo goes there, and the views are embedded again from the thumbnails
    by `luncher repair`, as the next retrain says. It must not refuse and name `luncher
    repair`, which, with the current copy intact, has nothing to repair."""
    elsewhere = tmp_path / "elsewhere"
    assert run("--models-dir", elsewhere, "make-updatable", pt_model).code == 0
    assert (
        run("--models-dir", elsewhere, "retrain", "--label", "fast_food", *photos["green"]).code
        == 0
    )
    assert run("--models-dir", elsewhere, "export", tmp_path / "b.tar.gz").code == 0
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    own = set((models_dir / "examples").iterdir())
    assert run("import", tmp_path / "b.tar.gz").code == 0
    store = ModelStore(models_dir)
    current = load_examples(load_personal(store, store.read_state()), ())
    assert own and not set(current.segments) & {p.name for p in own}
    for path in own:
        path.unlink()

    result = run("undo")
    assert result.code == 0, result
    one_line_error(run("retrain", "--label", "healthy", *photos["green"]), "`luncher repair`")
    repaired = run("repair", "--json")
    assert repaired.code == 0 and repaired.json_lines()[0]["reembedded"] == 3, repaired
    labels = [row["label"] for row in run("predict", "--json", *photos["red"]).json_lines()]
    assert labels == ["healthy"] * 3
