"""No photo leaves the machine, and none stays in it once forgotten: what `forget` leaves
behind, and who else can read the models directory."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import healthyluncher
from healthyluncher.records import load_examples, load_personal
from healthyluncher.store import ModelStore


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=str(models_dir))
    return healthyluncher.open(str(models_dir))


def _views_of(models_dir: Path, digest: str) -> np.ndarray:
    """The head inputs (views) of one photo, as the current copy stores them."""
    store = ModelStore(models_dir)
    examples = load_examples(load_personal(store, store.read_state()), ())
    return examples.inputs[examples.owner == examples.digests.index(digest)]


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """The files under `root` that hold any of `needles` byte for byte."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and any(needle in path.read_bytes() for needle in needles)
    )


def test_forget_leaves_no_view_of_the_photo_on_disk(lun, photos, models_dir):
    """The views of the photos a retrain taught are stored together in one shared segment
    (examples/*.npy). `forget` removed the photo from the index alone, so its head inputs,
    what the frozen network saw of the photo, stayed on disk in the segment the other
    photos still used, after "forgotten" and even after every undo step was gone."""
    lun.retrain("healthy", photos["red"])  # one segment holds the three photos' views
    lun.retrain("fast_food", photos["green"])
    forgotten = lun.examples()[0]
    kept = [item.digest for item in lun.examples()[1:]]
    views = _views_of(models_dir, forgotten.digest)
    assert len(views) and all(len(row.tobytes()) >= 16 for row in views)
    needles = [row.tobytes() for row in views]
    assert _files_holding(models_dir, needles)  # else the search proves nothing

    result = lun.forget([forgotten.digest])
    assert result.forgotten == 1 and result.retrained

    assert _files_holding(models_dir, needles) == []
    assert _files_holding(models_dir, [forgotten.digest.encode()]) == []
    assert sorted(item.digest for item in lun.examples()) == sorted(kept)
    for digest in kept:  # the other photos' views are still there, unchanged in number
        assert len(_views_of(models_dir, digest)) > 0
    assert [p.label for p in lun.predict(photos["green"])] == ["fast_food"] * 3


def test_labels_remove_leaves_no_view_of_its_photos_on_disk(lun, photos, models_dir, tmp_path):
    """`labels remove` forgets every photo of the label: their views went on sharing a
    segment with the photos kept (an import stores all of a backup's views in one), so
    they stayed on disk."""
    lun.retrain("healthy", photos["red"])
    lun.retrain("fast_food", photos["green"])
    lun.export_backup(tmp_path / "backup.tar.gz")
    lun.reset(purge=True)
    lun.import_backup(tmp_path / "backup.tar.gz")
    red = [item.digest for item in lun.examples() if item.label == "healthy"]
    needles = [row.tobytes() for digest in red for row in _views_of(models_dir, digest)]
    assert len(red) == 3 and _files_holding(models_dir, needles)

    lun.remove_label("healthy")

    assert _files_holding(models_dir, needles) == []
    assert _files_holding(models_dir, [digest.encode() for digest in red]) == []
    assert {item.label for item in lun.examples()} == {"fast_food"}


def _as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """`command` run as another, unprivileged user of the machine (uid 65534)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    ids = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run(["setpriv", *ids, *command], capture_output=True, text=True, check=False)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user can enter, as a home directory often is (pytest's own are not)."""
    path = Path(tempfile.mkdtemp(prefix="luncher-privacy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_user_cannot_read_the_photos_kept_in_the_models_directory(
    photos, pt_model, open_folder, run
):
    """Under the usual umask 022 the models directory was made 0755: on a shared machine
    any user could list it and read the thumbnails (your photos), their head inputs and
    which photos you taught. A models directory luncher makes is now private (0700); the
    backup was already written readable by you only."""
    root = open_folder / "home" / "models"
    umask = os.umask(0o022)
    try:
        assert run("--models-dir", root, "make-updatable", pt_model).code == 0
        assert run("--models-dir", root, "retrain", "--label", "healthy", *photos["red"]).code == 0
        backup = open_folder / "backup.tar.gz"
        assert run("--models-dir", root, "export", backup).code == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(root.parent.stat().st_mode) == 0o755  # not ours to change
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    thumbnail = next((root / "thumbnails").iterdir())
    for command in (["ls", str(root)], ["cat", str(thumbnail)], ["cat", str(backup)]):
        done = _as_nobody(*command)
        assert done.returncode != 0 and "Permission denied" in done.stderr, (command, done)
    assert _as_nobody("ls", str(root.parent)).returncode == 0  # the test can tell


def test_an_existing_models_directory_keeps_its_mode(pt_model, tmp_path, run):
    """A folder you made yourself (and chose to share, say) is used as it is."""
    root = tmp_path / "mine"
    root.mkdir(mode=0o750)
    root.chmod(0o750)
    assert run("--models-dir", root, "make-updatable", pt_model).code == 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o750


def test_a_ctrl_c_just_after_forget_saved_its_change_still_deletes_the_photo(
    lun, photos, run, models_dir, monkeypatch
):
    """Ctrl-C just after `forget` switched to the model without the photo cut
    short the deletions that follow: the user was told "interrupted after the change was
    saved", and the photo's thumbnail stayed on disk until some later change. The last
    steps of a change now finish first; the signal then stops the command."""
    import signal

    lun.retrain("fast_food", photos["red"])
    thumbnails = models_dir / "thumbnails"
    assert len(list(thumbnails.iterdir())) == 3
    remove = ModelStore.remove_thumbnails

    def signalled(self: ModelStore, digests: set[str] | None = None) -> int:
        signal.raise_signal(signal.SIGINT)  # as it arrives, before any deletion
        return remove(self, digests)

    monkeypatch.setattr(ModelStore, "remove_thumbnails", signalled)
    result = run("forget", photos["red"][0])
    assert result.code == 130, result
    assert result.stderr.strip() == "interrupted after the change was saved"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as it was
    assert len(list(thumbnails.iterdir())) == 2
    assert lun.status().examples_per_label == {"fast_food": 2}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX signals")
def test_a_change_keeps_a_signal_handler_that_c_code_installed(lun, photos, models_dir):
    """Holding signals while a saved change finishes replaced each handler with Python's
    and put back what signal.getsignal reported, which knows nothing of a handler C code
    installed (faulthandler.register, a library, a program embedding Python): after one
    retrain, such a SIGHUP handler was gone for good, and the next SIGHUP killed the
    program ('Hangup', exit -1) instead of running it. It is now left as it is."""
    red = [str(p) for p in photos["red"]]
    script = (
        "import faulthandler, os, signal, sys, healthyluncher\n"
        "faulthandler.register(signal.SIGHUP, file=sys.stderr, all_threads=False)\n"
        f"healthyluncher.open({str(models_dir)!r}).retrain('fast_food', {red!r})\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "print('alive')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout == "alive\n", done
    assert "Stack (most recent call first)" in done.stderr  # faulthandler's


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX signals")
def test_a_signal_held_while_a_change_ends_reaches_an_asyncio_handler_once():
    """A SIGTERM held while a saved change finished was raised again once the change
    ended: a program running luncher in its asyncio loop's thread, whose handler
    (loop.add_signal_handler) is told of a signal through a wake-up fd, had that handler
    run twice for one signal ('calls 2'; a 'press Ctrl-C twice to quit' then quits at
    once). A held signal now goes to the Python handler as it would have, once."""
    script = """
import asyncio, os, signal
from healthyluncher.signalhold import signals_held

async def main():
    calls = []
    came = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: (calls.append(1), came.set()))
    with signals_held():
        os.kill(os.getpid(), signal.SIGTERM)
        assert not calls
    await asyncio.wait_for(came.wait(), 120)
    for _ in range(5):  # a second wake-up byte is read with the first
        await asyncio.sleep(0)
    print("calls", len(calls))

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout == "calls 1\n", done
