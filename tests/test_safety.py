"""Foot-guns that cost a user their files, each refused in one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import one_line_error, solid


def test_export_never_overwrites_a_file_without_force(run, pt_model, photos, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    photo = solid(tmp_path / "lunch.jpg", (10, 200, 10))
    before = photo.read_bytes()
    for force in ((), ("--force",)):  # a photo's name is not a backup's: never written
        assert run("export", photo, *force).code == 2
    assert photo.read_bytes() == before
    older = tmp_path / "older.tar.gz"
    older.write_bytes(b"last week's backup")
    result = run("export", older)
    assert result.code == 1 and "already exists; use --force" in result.stderr
    assert older.read_bytes() == b"last week's backup"
    assert run("export", older, "--force").code == 0
    assert older.read_bytes() != b"last week's backup"


def test_export_never_replaces_what_is_not_a_regular_file(run, pt_model, photos, tmp_path):
    """`export --force /dev/stdout` (or a named pipe, or a device) was replaced by a regular
    file: as root, /dev/stdout and /dev/full were gone."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    pipe = tmp_path / "pipe.tar.gz"
    os.mkfifo(pipe)
    one_line_error(run("export", pipe, "--force"), "not a regular file")
    assert stat.S_ISFIFO(pipe.lstat().st_mode)


def test_the_same_photo_twice_is_one_example_and_the_backup_restores(
    run, pt_model, photos, tmp_path
):
    assert run("make-updatable", pt_model).code == 0
    copy = tmp_path / "copy.png"
    copy.write_bytes(photos["red"][0].read_bytes())
    result = run("retrain", "--label", "healthy", photos["red"][0], photos["red"][0], copy)
    assert result.code == 0, result
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {"healthy": 1}
    archive = tmp_path / "b.tar.gz"
    assert run("export", archive).code == 0
    assert run("reset").code == 0
    assert run("import", archive).code == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_or_a_device_as_the_model_is_refused_not_read(run, tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    result = run("make-updatable", fifo)
    assert result.code == 1 and "not a regular file" in result.stderr
    if os.path.exists("/dev/zero"):
        result = run("make-updatable", "/dev/zero")
        assert result.code == 1 and "not a regular file" in result.stderr


def test_identity_nodes_in_a_cycle_are_refused_not_followed_forever(run, tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["b"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
        ],
        "cycle",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])],
    )
    path = tmp_path / "cycle.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = run("make-updatable", path)
    assert result.code == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "cycle" in result.stderr


def test_a_folder_of_other_files_is_not_taken_over_as_models_directory(run, pt_model, tmp_path):
    mine = tmp_path / "documents"
    (mine / "cache").mkdir(parents=True)
    (mine / "cache" / "mine.txt").write_text("keep me")
    (mine / "notes.txt").write_text("keep me too")
    result = run("--models-dir", mine, "make-updatable", pt_model)
    assert result.code == 1 and "is not a models directory" in result.stderr
    result = run("--models-dir", mine, "reset")
    assert result.code == 1
    assert (mine / "cache" / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["cache", "notes.txt"]


@pytest.mark.parametrize("writer", ["forget", "purge"])
def test_a_reader_that_read_the_old_state_loads_the_new_one(
    run, pt_model, photos, models_dir, monkeypatch, writer
):
    """A predict that read state.json just before a writer switched it and removed the
    directory it named used to fail with "the personalized model ... is damaged; run
    `luncher undo` or `luncher reset`" (10 of 150 predicts under natural timing). It now
    reads the new state and loads that."""
    from healthyluncher.predictor import Predictor
    from healthyluncher.store import ModelStore

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    store = ModelStore(models_dir)
    stale = store.read_state()
    if writer == "forget":  # a new copy; the old one goes with the cleared history
        assert run("forget", photos["red"][0]).code == 0
    else:
        assert run("reset", "--purge").code == 0
    assert stale.personal is not None and not (models_dir / stale.personal).exists()
    fresh = store.read_state()
    reads = iter([stale])
    monkeypatch.setattr(store, "read_state", lambda: next(reads, fresh))
    predictor = Predictor(store)
    assert predictor.model.personalized == (writer == "forget")
    assert next(iter(predictor.predict(photos["red"][:1]))).label in ("healthy", "fast_food")


def test_a_killed_import_leaves_no_photos_in_tmp_and_the_next_writer_cleans_up(
    run, pt_model, photos, models_dir, tmp_path, monkeypatch
):
    """A killed import left `$TMPDIR/luncher-import-*` with the user's thumbnails (25 of
    them accumulated) and nothing ever removed them. Import now unpacks into a hidden
    directory of the models directory, which the next writer removes unless a live import
    holds it."""
    import tempfile

    from healthyluncher.store import ModelStore

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    archive = tmp_path / "b.tar.gz"
    assert run("export", archive).code == 0
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    assert run("import", archive).code == 0
    assert list(private_tmp.iterdir()) == []
    # What a killed import leaves: a scratch directory with thumbnails, no owner alive.
    leftover = models_dir / ".scratch-0123456789ab"
    (leftover / "thumbnails").mkdir(parents=True)
    (leftover / "thumbnails" / "x.jpg").write_bytes(b"a photo")
    store = ModelStore(models_dir)
    with store.scratch() as live:  # an import still reading: left alone
        assert run("retrain", "--label", "healthy", *photos["green"]).code == 0
        assert live.is_dir() and not leftover.exists()
    assert not live.exists()


def test_a_cancelled_retrain_leaves_no_thumbnails_or_cache_behind(
    run, pt_model, photos, models_dir, monkeypatch
):
    """Ctrl-C during a retrain left the thumbnails and cached head inputs of the cancelled
    photos (190 thumbnails for 127 examples), and a thumbnail's .tmp survived every later
    retrain. The next writer now removes every such file that no kept state uses."""
    import healthyluncher.personal as personal

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    thumbnails = models_dir / "thumbnails"
    kept = sorted(p.name for p in thumbnails.glob("*.jpg"))
    cached = sorted(p.name for p in (models_dir / "cache").rglob("*.npy"))
    assert len(kept) == 3 and cached == []  # the examples hold their views

    def cancelled(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(personal, "fit", cancelled)
        assert run("retrain", "--label", "healthy", *photos["green"]).code == 130
    assert len(list(thumbnails.glob("*.jpg"))) == 6  # the cancelled photos' files
    assert len(list((models_dir / "cache").rglob("*.npy"))) == 3
    (thumbnails / ".abc.jpg.x1y2.tmp").write_bytes(b"torn")  # what kill -9 leaves
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0  # a change
    assert sorted(p.name for p in thumbnails.iterdir()) == kept
    assert sorted(p.name for p in (models_dir / "cache").rglob("*.npy")) == cached


def test_control_characters_in_names_are_shown_as_escapes(run, pt_model, photos, tmp_path):
    """A file name (or any text from a file) with ESC, CR or U+202E went straight to the
    terminal: it could recolour or erase the screen, split an error line, or reverse the
    text around it. Every line luncher prints shows them as escapes."""
    assert run("make-updatable", pt_model).code == 0
    hostile = tmp_path / "lunch\x1b[2J\r\u202egpj.jpg"
    hostile.write_bytes(b"not an image")
    good = tmp_path / "fine\x1b[31m.png"
    good.write_bytes(photos["red"][0].read_bytes())
    result = run("predict", good, hostile)
    assert result.code == 1
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\r" not in stream and "\u202e" not in stream
    assert "\\x1b[2J\\r\\u202egpj.jpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "fine\\x1b[31m.png" in result.stdout


def test_a_65535x1_photo_is_used_not_called_unreadable(run, pt_model, tmp_path):
    """Its thumbnail could not be a JPEG (at most 65500 pixels a side), and the retrain said
    "none of the photos could be read". The thumbnail now keeps the strip's centre."""
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (65535, 1), (200, 40, 40)).save(strip)
    assert run("make-updatable", pt_model).code == 0
    result = run("retrain", "--label", "healthy", strip)
    assert result.code == 0, result


def test_a_full_disk_says_so_and_changes_nothing(run, pt_model, photos, models_dir, monkeypatch):
    """A full disk (or a thumbnails folder that cannot be written) was reported per photo as
    "none of the photos could be read". It is the disk: one line that says so, nothing
    changed."""
    import errno

    import healthyluncher.embedder as embedder

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    before = run("status", "--json").json_lines()[0]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embedder, "atomic_write_bytes", full)
        result = run("retrain", "--label", "healthy", *photos["green"])
    assert result.code == 1
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "No space left on device" in line
    assert "could be read" not in line and "was not changed" in line
    assert run("status", "--json").json_lines()[0] == before


def test_an_unreadable_state_json_is_not_called_damaged(run, pt_model, models_dir, monkeypatch):
    """state.json is created 0600: another user was told it is "damaged" and to run
    `reset`. It is unreadable, and the message says that."""
    assert run("make-updatable", pt_model).code == 0
    real = os.open

    def denied(path, *args, **kwargs):
        if os.fspath(path).endswith("state.json") and not args[0] & os.O_WRONLY:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", denied)
        result = run("status")
    assert result.code == 1
    assert "cannot read" in result.stderr and "Permission denied" in result.stderr
    assert "damaged" not in result.stderr and "reset" not in result.stderr


def test_reset_in_a_script_reads_nothing_it_does_not_need(run, models_dir, monkeypatch):
    """reset without a terminal does not ask, so it must not set up the shipped base just
    to find out whether there was something to ask about: in an empty models directory it
    still says there is nothing to reset, and leaves no base behind."""
    monkeypatch.delenv("LUNCHER_BUNDLED_MODEL")  # the shipped base is there to be set up
    result = run("reset")
    assert result.code == 0 and "Nothing to reset" in result.stdout, result
    assert not list(models_dir.glob("base-*"))


def _export_killed_midway(models_dir: Path, target: Path) -> None:
    """In a child process: export, dying (as with kill -9) while the archive is written."""
    import tarfile

    import healthyluncher

    added = 0
    real_addfile = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):
        nonlocal added
        added += 1
        if added == 3:
            os._exit(86)
        return real_addfile(self, *args, **kwargs)

    tarfile.TarFile.addfile = addfile  # type: ignore[method-assign]
    healthyluncher.open(str(models_dir)).export_backup(target)
    os._exit(0)


def test_killed_exports_leave_nothing_that_accumulates_beside_the_archive(
    run, pt_model, photos, models_dir, tmp_path
):
    """An export killed while it packed left a hidden scratch directory (with a copy of
    the user's examples) and a temporary archive beside the target, and nothing ever
    removed them: each killed export added two. The next export now removes those that
    no live export holds."""
    import multiprocessing

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    out = tmp_path / "out"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    for _ in range(2):
        child = context.Process(target=_export_killed_midway, args=(models_dir, out / "b.tar.gz"))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 86
    assert not (out / "b.tar.gz").exists()
    assert run("export", out / "c.tar.gz").code == 0
    assert [path.name for path in out.iterdir()] == ["c.tar.gz"]
    assert run("export", out / "b.tar.gz").code == 0
    assert sorted(path.name for path in out.iterdir()) == ["b.tar.gz", "c.tar.gz"]


def test_a_writer_cleaning_up_never_removes_an_import_scratch_as_it_is_made(
    run, pt_model, photos, models_dir, tmp_path, monkeypatch
):
    """A writer's cleanup (any retrain, in another process) removes scratch directories
    that no import holds. An import made its scratch directory and only then took hold of
    it: a cleanup in between removed it, and the import failed ('cannot open the lock
    file ...'). The directory is now made and held under the writers' lock."""
    from healthyluncher.errors import LuncherError
    from healthyluncher.fileio import exclusive_lock
    from healthyluncher.store import ModelStore

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    archive = tmp_path / "b.tar.gz"
    assert run("export", archive).code == 0
    store = ModelStore(models_dir)
    mkdir = Path.mkdir
    cleanups = []

    def mkdir_then_a_writer_cleans_up(path: Path, *args, **kwargs) -> None:
        made = not path.exists()
        mkdir(path, *args, **kwargs)
        if made and path.name.startswith(".scratch-"):
            try:  # another process's writer, at this very moment, if it gets the lock
                with exclusive_lock(models_dir / ".lock", timeout=0, busy="busy"):
                    store.collect_garbage(store.read_state())
                    cleanups.append(path)
            except LuncherError:
                pass  # it waits for the lock: after the import, or before this mkdir

    monkeypatch.setattr(Path, "mkdir", mkdir_then_a_writer_cleans_up)
    result = run("import", archive)
    assert result.code == 0, result
    assert cleanups == []


def test_a_working_folder_that_exists_already_is_left_to_its_owner(tmp_path):
    """owned_folder made its folder inside the `try` whose `finally` removes it: a name that
    existed (another owner's folder) was removed with everything in it."""
    from healthyluncher.fileio import owned_folder

    theirs = tmp_path / ".luncher-export-0123456789ab"
    theirs.mkdir()
    (theirs / "examples.npz").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        with owned_folder(theirs):
            pass
    assert (theirs / "examples.npz").read_bytes() == b"someone else's"


def test_a_file_name_too_long_for_the_file_system_is_one_line(run, pt_model, photos, tmp_path):
    """Path.is_dir and Path.is_file raise ENAMETOOLONG where os.path's tests say False:
    `luncher export <300 characters>.tar.gz`, `make-updatable <300>.onnx` (or its
    --examples, --calibration) and `forget <300>` were 'unexpected OSError: [Errno 36] File
    name too long'."""
    long = tmp_path / ("k" * 300)
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    for args in (
        ["export", f"{long}.tar.gz"],
        ["import", f"{long}.tar.gz"],
        ["predict", f"{long}.jpg"],
        ["retrain", "--label", "healthy", f"{long}.jpg"],
        ["make-updatable", "--force", f"{long}.onnx"],
        ["make-updatable", "--force", pt_model, "--examples", long],
        ["make-updatable", "--force", pt_model, "--int8", "--calibration", long],
        ["forget", f"{long}.jpg"],
        ["forget", long],
    ):
        line = one_line_error(run(*args), "k" * 300)
        assert "unexpected" not in line and "Errno" not in line, line
    assert not list(tmp_path.glob(".luncher-export-*"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("which", ["state.json", "personal meta.json"])
def test_a_named_pipe_in_place_of_a_json_file_is_damage_not_a_hang(
    run, pt_model, photos, models_dir, which
):
    """A named pipe as state.json blocked `status`, `predict`, every command, forever (a
    read of a pipe without a writer); a pipe as a copy's meta.json blocked predict."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    [personal] = models_dir.glob("personal-*")
    path = models_dir / "state.json" if which == "state.json" else personal / "meta.json"
    path.unlink()
    os.mkfifo(path)
    done = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "predict", str(photos["red"][0])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 1, done
    if which == "state.json":
        assert done.returncode == 0, done  # readers use the state the directories hold
        assert run("repair").code == 0 and (models_dir / "state.json").is_file()
    else:
        assert done.returncode == 1 and "damaged" in done.stderr, done


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize(
    "which", ["examples.npz", "segment", "model.onnx", "model.data", "replay.npz"]
)
def test_a_named_pipe_among_the_models_files_is_damage_not_a_hang(
    run, pt_model, photos, models_dir, tmp_path, which
):
    """numpy and ONNX Runtime open what they are given and wait on a named pipe forever:
    one in place of a copy's examples, a shared segment, the personalized model or its
    weights file, or the base's replay set blocked predict, retrain or export (a retrain
    after saving its change, comparing weights files for an undo step)."""
    replay = tmp_path / "replay.npz"
    np.savez(replay, inputs=np.ones((4, 8), np.float32), labels=np.array(["healthy"] * 4))
    assert run("make-updatable", pt_model, "--replay", replay).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    [personal] = models_dir.glob("personal-*")
    path = {
        "examples.npz": personal / "examples.npz",
        "segment": next((models_dir / "examples").glob("*.npy")),
        "model.onnx": personal / "model.onnx",
        "model.data": personal / "model.data",
        "replay.npz": next(models_dir.glob("base-*/replay.npz")),
    }[which]
    path.unlink()
    os.mkfifo(path)
    for args in (
        ["predict", photos["green"][0]],
        ["retrain", "--label", "healthy", photos["green"][1]],
        ["export", "--force", tmp_path / "b.tar.gz"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "healthyluncher", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 1, done
