"""Folders and photos the user may not read: each is named in one line, never skipped
without a word, never an unexpected error.

Root reads everything, so the commands run in a subprocess without the capabilities that
let it (tests.conftest.unprivileged), where file modes stop them as they stop any user.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import solid, unprivileged

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@contextlib.contextmanager
def mode(path: Path, bits: int) -> Iterator[None]:
    before = path.stat().st_mode & 0o7777
    path.chmod(bits)
    try:
        yield
    finally:
        path.chmod(before)


@pytest.fixture
def album(tmp_path: Path) -> Path:
    """album/fast/f.png readable; album/green/g0.jpg and g1.jpg the folder under test."""
    root = tmp_path / "album"
    solid(root / "fast" / "f.png", (220, 30, 40))
    for i in range(2):
        solid(root / "green" / f"g{i}.jpg", (30, 200 + 20 * i, 40))
    return root


@pytest.fixture
def base(run, pt_model) -> None:
    assert run("make-updatable", pt_model).code == 0


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith(("error:", "skipped:"))]


@pytest.mark.usefixtures("base")
def test_predict_names_a_folder_it_cannot_open(album):
    """A folder of mode 000 said "no image files found in album/green": the user looks for
    photos that are there. Inside a folder searched, it was left out without a word, with
    exit 0, as if every photo had been predicted."""
    green = album / "green"
    with mode(green, 0):
        alone = unprivileged("predict", green)
        assert alone.returncode == 1 and alone.stdout == "", alone
        assert errors(alone.stderr) == [f"error: {green}: cannot read: Permission denied"]

        searched = unprivileged("predict", "--json", album)
    assert searched.returncode == 1, searched
    assert [line for line in searched.stdout.splitlines() if '"f.png' in line or "f.png" in line]
    assert errors(searched.stderr) == [f"error: {green}: cannot read: Permission denied"]


@pytest.mark.usefixtures("base")
def test_a_folder_listed_but_not_searched_names_its_photos(album):
    """A folder of mode 0o444 (read, no search) was `unexpected PermissionError` from the
    check that a name is a file."""
    green = album / "green"
    with mode(green, 0o444):
        done = unprivileged("predict", album)
    assert done.returncode == 1, done
    assert errors(done.stderr) == [
        f"error: {green / name}: cannot read: Permission denied" for name in ("g0.jpg", "g1.jpg")
    ]
    assert "f.png" in done.stdout


@pytest.mark.usefixtures("base")
def test_retrain_says_which_folder_it_could_not_read(album):
    green = album / "green"
    with mode(green, 0):
        done = unprivileged("retrain", "--label", "healthy", album)
    assert errors(done.stderr) == [f"skipped: {green}: cannot read: Permission denied"]
    assert done.returncode == 1, done


@pytest.mark.usefixtures("base")
def test_forget_refuses_a_folder_it_cannot_read(album, run):
    """forget of a folder whose subfolder cannot be read would forget only part of what
    the user named: it says so and forgets nothing."""
    assert run("retrain", "--label", "healthy", album).code == 0
    green = album / "green"
    with mode(green, 0):
        done = unprivileged("forget", album)
    assert done.returncode == 1, done
    assert errors(done.stderr) == [f"error: {green}: cannot read: Permission denied"]
    assert len(run("examples", "--json").json_lines()) == 3


def test_make_updatable_examples_that_cannot_be_read(album, pt_model, tmp_path):
    """An --examples folder of mode 000 was `unexpected PermissionError`; a label folder of
    mode 000 "holds no photos"; a label's subfolder of mode 000 was left out of training."""
    command = ("make-updatable", pt_model, "--examples", album, "--force")
    with mode(album, 0):
        done = unprivileged(*command)
    assert done.returncode == 1, done
    assert errors(done.stderr) == [f"error: --examples {album}: Permission denied"]

    green = album / "green"
    with mode(green, 0):
        done = unprivileged(*command)
    assert done.returncode == 1, done
    assert errors(done.stderr) == [f"error: {green}: cannot read: Permission denied"]

    solid(green / "more" / "g2.jpg", (30, 150, 40))
    with mode(green / "more", 0):
        done = unprivileged(*command)
    assert done.returncode == 1, done
    assert errors(done.stderr) == [f"error: {green / 'more'}: cannot read: Permission denied"]


def test_a_folder_that_cannot_be_searched_is_named_by_examples_and_calibration(
    album, pt_model, tmp_path
):
    """A folder inside one listed but not searched (mode 0o444) cannot even be looked at
    (stat: Permission denied). The search yields it to be named, but `every_image` only
    named the folders it could see were folders: make-updatable --examples counted it as a
    photo that could not be read and trained without it (exit 0), and --calibration said
    "none of its 2 image files could be read" of two folders."""
    solid(album / "green" / "more" / "deeper" / "g3.jpg", (30, 150, 40))
    command = ("make-updatable", pt_model, "--examples", album, "--force")
    with mode(album / "green" / "more", 0o444):
        done = unprivileged(*command)
    assert done.returncode == 1, done
    deeper = album / "green" / "more" / "deeper"
    assert errors(done.stderr) == [f"error: {deeper}: cannot read: Permission denied"]

    calibration = tmp_path / "calibration"
    for name in ("a", "b"):
        solid(calibration / name / "x.png", (120, 60, 30))
    with mode(calibration, 0o444):
        done = unprivileged("make-updatable", pt_model, "--int8", "--calibration", calibration)
    assert done.returncode == 1, done
    assert errors(done.stderr) == [f"error: {calibration / 'a'}: cannot read: Permission denied"]
