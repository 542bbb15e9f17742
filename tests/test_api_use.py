"""The public API as an app developer drives it: threads, numbers from numpy, generators,
tasks and errors that travel; each test failed before the fix it names."""

from __future__ import annotations

import errno
import inspect
import io
import json
import os
import pickle
import re
import threading
import types
import typing
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import healthyluncher
from healthyluncher import LuncherError, Progress
from healthyluncher.errors import Command, StorageError
from healthyluncher.photos import ImageFailure
from tests.conftest import one_line_error


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=models_dir)
    return healthyluncher.open(models_dir)


def test_reads_go_on_while_another_thread_retrains(lun, photos):
    """`status`, `examples` and `label_info` read the store without its lock, as `predict`
    does, but each waited for the Luncher's own lock: an app showing its examples froze
    for as long as an `UpdateTask` retrained in the background."""
    lun.retrain("healthy", photos["red"][:1])
    training, release = threading.Event(), threading.Event()

    def progress(event: Progress) -> None:
        if event.stage == "training":
            training.set()
            release.wait(30)

    task = healthyluncher.UpdateTask(lun.retrain, "fast_food", photos["green"], progress=progress)
    task.start()
    try:
        assert training.wait(30)
        answers: list[object] = []
        client = threading.Thread(
            target=lambda: answers.extend(
                [lun.status().examples_per_label, len(lun.examples()), len(lun.label_info())]
            )
        )
        client.start()
        client.join(10)
        assert answers == [{"healthy": 1}, 1, 2], "a read waited for the retrain"
    finally:
        release.set()
        task.result(60)
    assert lun.status().examples_per_label == {"healthy": 1, "fast_food": 3}


def test_numbers_from_numpy_are_numbers(lun, photos, pt_model, models_dir):
    """`epochs=np.int64(2)` was refused as "epochs must be a whole number from 1 to 1000,
    not np.int64(2)", and `learning_rate=np.float32(0.01)` as "not a finite number": a
    program that computes its settings with numpy could not pass them."""
    result = lun.retrain(
        "healthy",
        photos["red"][:1],
        epochs=np.int64(2),
        learning_rate=np.float32(0.01),
        views=np.int32(2),
        memory_strength=np.float64(30),
        save=True,
    )
    hp = result.hyperparameters
    assert (hp.epochs, hp.learning_rate, hp.augment_views, hp.memory_strength) == (
        2,
        pytest.approx(0.01),
        2,
        30,
    )
    assert type(hp.epochs) is int and type(hp.learning_rate) is float  # kept as JSON
    assert lun.status().hyperparameters["epochs"] == 2
    made = healthyluncher.make_updatable(
        pt_model,
        models_dir=models_dir,
        force=True,
        trainable_layers=np.int64(1),
        resize=np.int64(20),
        mean=np.array([120, 110, 100], np.float32),
        std=np.full(3, 50, np.float32),
        hyperparameters=healthyluncher.Hyperparameters(epochs=np.int8(3)),
    )
    assert made.meta.preprocessing.resize == 20 and made.meta.preprocessing.mean == (120, 110, 100)
    assert lun.status().hyperparameters["epochs"] == 3
    with pytest.raises(LuncherError, match=r"^epochs must be a whole number from 1 to 1000, not 0"):
        lun.retrain("healthy", photos["red"][:1], epochs=np.int64(0))


def test_waiting_for_a_task_that_was_never_started_says_so(lun, photos):
    """`UpdateTask(lun.retrain, ...)` without `.start()` (Core ML's `resume()`): `result()`
    and `wait()` waited forever, and the program hung without a word."""
    task = healthyluncher.UpdateTask(lun.retrain, "healthy", photos["red"][:1])
    outcome: list[object] = []

    def wait_for_it() -> None:
        for call in (task.result, task.wait):
            try:
                outcome.append(call())
            except LuncherError as error:
                outcome.append(str(error))

    waiter = threading.Thread(target=wait_for_it, daemon=True)
    waiter.start()
    waiter.join(10)
    assert outcome == ["this task has not been started: call start() first"] * 2
    assert task.start().result(60).examples_per_label == {"healthy": 1}
    assert task.wait() is True


def test_errors_survive_pickling_as_multiprocessing_sends_them(lun, photos):
    """A worker process's UnknownLabelError could not come back to its parent: unpickling
    it failed with "missing 1 required positional argument: 'known'" (a
    ProcessPoolExecutor raised that instead), and a LuncherError lost the parameters and
    commands its message names."""
    with pytest.raises(healthyluncher.UnknownLabelError) as refused:
        lun.retrain("heathy", photos["red"][:1])
    copy = pickle.loads(pickle.dumps(refused.value))
    assert type(copy) is healthyluncher.UnknownLabelError
    assert (copy.label, copy.known, str(copy)) == ("heathy", lun.labels, str(refused.value))
    with pytest.raises(LuncherError) as undo:
        lun.undo()
    error = LuncherError("cannot do this; run ", Command("luncher undo", "Luncher.undo()"))
    for original in (undo.value, error, StorageError("the disk is full")):
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is type(original) and copy.parts == original.parts
        assert copy.render(str) == original.render(str) and str(copy) == str(original)


def test_predict_each_reads_a_generator_as_it_goes(lun, photos, tmp_path):
    """`predict_each(frames())` read the whole generator and encoded every frame before the
    first result: a camera's endless generator never got one, and memory grew with every
    frame. Now it reads a window of frames ahead of the results, whatever their number."""
    pixels = np.asarray(Image.open(photos["green"][0]).convert("RGB"))
    produced = 0

    def frames(count: int) -> Iterator[np.ndarray]:
        nonlocal produced
        for _ in range(count):
            produced += 1
            yield pixels

    results = lun.predict_each(frames(200))
    first = next(results)
    assert isinstance(first, healthyluncher.Prediction) and str(first.path) == "<image 0>"
    assert produced < 40, f"{produced} frames read for the first result"
    assert sum(1 for _ in results) == 199 and produced == 200
    # A list is read the same; what comes out is the same as ever.
    expected = lun.predict(photos["red"] + [pixels])
    assert lun.predict(iter(photos["red"] + [pixels])) == expected
    assert lun.predict(p for p in photos["red"] + [pixels]) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    for nothing, named in (([], "(nothing)"), (iter([empty, empty]), f"{empty}, {empty}")):
        with pytest.raises(LuncherError, match=rf"^no image files found in {re.escape(named)}$"):
            lun.predict_each(nothing)


def test_photos_are_typed_as_any_iterable_of_photos():
    """mypy refused `lun.predict(folder.glob("*.jpg"))`, which runs: photos were typed as a
    Sequence, and the bytearray that runs too was not a photo."""
    for method in ("predict", "predict_each", "retrain", "forget"):
        annotation = (
            inspect.signature(getattr(healthyluncher.Luncher, method))
            .parameters["photos"]
            .annotation
        )
        assert annotation == "PhotoInput | Iterable[PhotoInput]", method
    assert bytearray in typing.get_args(healthyluncher.PhotoInput)


def test_the_photo_types_of_the_signatures_are_exported(lun, photos):
    """`Luncher.predict(photos: PhotoInput | Iterable[PhotoInput])`, and a prediction's
    `path`, a `MemoryPhoto` for pixels: a typed program could name neither without
    importing private modules (`PhotoInput` existed only for type checkers)."""
    assert {"MemoryPhoto", "PhotoInput"} <= set(healthyluncher.__all__)
    from healthyluncher import MemoryPhoto, PhotoInput

    pixels = np.asarray(Image.open(photos["red"][0]).convert("RGB"))
    given: list[PhotoInput] = [photos["red"][0], str(photos["red"][1]), pixels]
    given += [photos["red"][2].read_bytes(), Image.open(photos["green"][0])]
    predictions = lun.predict(given)
    memory = [p.path for p in predictions if isinstance(p.path, MemoryPhoto)]
    assert [str(path) for path in memory] == ["<image 2>", "<image 3>", "<image 4>"]
    kinds = set(typing.get_args(PhotoInput))
    assert {str, bytes, bytearray, memoryview, Image.Image, np.ndarray, os.PathLike[str]} | {
        MemoryPhoto
    } == kinds
    assert "PhotoInput" in (inspect.getdoc(healthyluncher) or "")
    assert "MemoryPhoto" in (inspect.getdoc(healthyluncher) or "")


def test_a_dict_of_photos_is_refused_not_read_as_its_keys(lun, photos):
    """`lun.retrain("healthy", {path: "fast_food", ...})` (photos with the labels a program
    meant) taught the keys as healthy, the labels silently dropped, and `predict` of a dict
    predicted its keys: a dict is now refused in one line that says what photos may be."""
    labelled = {photos["red"][0]: "fast_food", photos["green"][0]: "healthy"}
    calls = {
        "predict": lambda: lun.predict(labelled),
        "predict_each": lambda: lun.predict_each(labelled),
        "retrain": lambda: lun.retrain("healthy", labelled),
        "forget": lambda: lun.forget(labelled),
    }
    for name, call in calls.items():
        with pytest.raises(LuncherError) as error:
            call()
        assert str(error.value) == (
            "photos must be a path, an image or a list of them, not a dict: "
            "pass its keys or its values as a list"
        ), name
    assert lun.status().examples_per_label == {}
    assert len(lun.predict(list(labelled))) == 2  # as it says


def test_help_explains_every_exported_class_and_method():
    """`help(healthyluncher.RetrainResult)` showed only the signature dataclasses generate,
    and `Prediction`, `Status` and ten other results said nothing of what their fields
    mean; nor did `Luncher.models_dir` or `Hyperparameters.replace`."""
    undocumented = []
    for name in healthyluncher.__all__:
        item = getattr(healthyluncher, name)
        # A type alias is no class, though Python 3.10 says `Callable[...]` is one.
        if not inspect.isclass(item) or isinstance(item, types.GenericAlias):
            continue
        doc = inspect.getdoc(item) or ""
        if not doc or doc.startswith(f"{item.__name__}("):  # the generated signature
            undocumented.append(name)
        for member, value in vars(item).items():
            if not member.startswith("_") and (callable(value) or isinstance(value, property)):
                if not inspect.getdoc(value):
                    undocumented.append(f"{name}.{member}")
    assert undocumented == []


def test_results_as_json_are_the_clis_json_lines(lun, photos, run, tmp_path):
    """A program had no public way to the `--json` form: `json.dumps(asdict(prediction))`
    failed on its Path, and for an in-memory photo `asdict` copied out all its bytes."""

    def cli_json(method: str, *args: object) -> tuple[list[str], object]:
        """`luncher ARGS`'s lines, and what the API's `method` gave the CLI for them."""
        original, returned = getattr(healthyluncher.Luncher, method), []

        def recording(self: healthyluncher.Luncher, *a: object, **k: object) -> object:
            returned.append(original(self, *a, **k))
            return returned[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(healthyluncher.Luncher, method, recording)
            lines = run(*args).stdout.splitlines()
        return lines, returned[0]

    def as_printed(result: object) -> str:
        return json.dumps(healthyluncher.to_json(result), ensure_ascii=False, allow_nan=False)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    given = [*photos["red"], bad]
    lines = run("predict", "--json", *given).stdout.splitlines()
    assert lines == [as_printed(item) for item in lun.predict_each(given)]
    lines, result = cli_json("retrain", "retrain", "--json", "--label", "healthy", *given)
    assert lines == [as_printed(result)] and '"skipped": [{"path": ' in lines[0]
    lines, result = cli_json("status", "status", "--json")
    assert lines == [as_printed(result)] and f'"models_dir": "{lun.models_dir}"' in lines[0]
    # An in-memory photo is its name, as `luncher predict --json` printed its path.
    pixels = Image.open(photos["green"][0])
    prediction = lun.predict([pixels])[0]
    assert healthyluncher.to_json(prediction)["path"] == str(prediction.path) == "<image 0>"
    taught = healthyluncher.to_json(lun.retrain("fast_food", [pixels]))
    assert taught["photos"][0]["path"] == "<image 0>" and len(json.dumps(taught)) < 2000


def test_every_public_result_goes_to_json(lun, photos, pt_model, models_dir, tmp_path):
    """`json.dumps(healthyluncher.to_json(result))` works for every result the API returns."""
    backup = tmp_path / "backup.tar.gz"
    results: list[object] = [
        healthyluncher.make_updatable(pt_model, models_dir=models_dir, force=True),
        *lun.predict_each([photos["red"][0], tmp_path / "missing.jpg"]),
        lun.retrain("sweets", photos["red"] + photos["red"][:1], new_label=True),
        lun.status(),
        *lun.examples(),
        *lun.label_info(),
        lun.rename_label("sweets", "dessert"),
        lun.export_backup(backup),
        lun.undo(),
        lun.forget(photos["red"][:1]),
        lun.import_backup(backup),
        lun.reset(),
        lun.repair(),
        lun.predict([Image.open(photos["green"][0])])[0].path,  # a MemoryPhoto: its name
        healthyluncher.Progress("training", 1, 2, float("nan")),
    ]
    public = {
        name
        for name in healthyluncher.__all__
        if inspect.isclass(getattr(healthyluncher, name)) and name.endswith(("Result", "Photo"))
    }
    public |= {"Status", "Prediction", "ImageFailure", "TaughtExample", "LabelInfo"}
    shown = {type(r).__name__ for r in results} | {"TrainedPhoto", "DuplicatePhoto"}
    assert public <= shown, public - shown
    for result in results:
        text = json.dumps(healthyluncher.to_json(result), allow_nan=False)
        assert json.loads(text), result
    assert healthyluncher.to_json(results[-1])["loss"] is None  # NaN is null
    retrained = healthyluncher.to_json(results[3])
    assert retrained["duplicates"][0]["path"] == str(photos["red"][0])


def test_the_call_that_sets_up_a_base_names_the_models_directory(pt_model, photos, tmp_path):
    """`Luncher(models_dir=X)` on an empty X said to run `make_updatable(model)`, which,
    followed as written, set up the default models directory and left X without a base."""
    elsewhere = (tmp_path / "elsewhere").resolve()
    with pytest.raises(LuncherError) as error:
        healthyluncher.Luncher(elsewhere).predict(photos["red"][:1])
    call = re.fullmatch(r"there is no base model in .* yet: run `(.*)`", str(error.value))
    assert call, str(error.value)
    assert call[1] == f"healthyluncher.make_updatable(model, models_dir={str(elsewhere)!r})"
    eval(call[1], {"healthyluncher": healthyluncher, "model": pt_model})  # as written
    assert healthyluncher.Luncher(elsewhere).predict(photos["red"][:1])[0].label
    # The default one ($LUNCHER_MODELS_DIR here) is the bare call's.
    with pytest.raises(LuncherError, match=r"run `healthyluncher\.make_updatable\(model\)`$"):
        healthyluncher.open().predict(photos["red"][:1])


@pytest.mark.parametrize("fills_at", ["start", "middle", "last bytes"])
def test_an_export_that_fills_the_disk_leaves_nothing_behind(
    fills_at, lun, photos, run, models_dir, tmp_path, request
):
    """`luncher export` to a disk that fills up while the archive is written (the first
    bytes, the middle, or the gzip trailer written as it closes): one line, a non-zero exit,
    no partial archive or scratch directory beside it, an earlier backup of that name as it
    was, and the models directory untouched. (Checked when asked for, and found so: the
    same as on a real 4 to 12 KiB tmpfs.)"""
    from healthyluncher import exporting
    from tests.test_backup import tree

    lun.retrain("fast_food", photos["red"])
    lun.retrain("healthy", photos["green"])
    folder = tmp_path / "usb"
    folder.mkdir()
    # The archive's size changes with the clock (its times are compressed with the rest), so
    # the clock stands still here: every export below is as long as this one, and the last
    # bytes are the gzip trailer's (8 bytes). A clock that ticked made the trailer fit.
    frozen = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return frozen

    clock = pytest.MonkeyPatch()
    request.addfinalizer(clock.undo)
    clock.setattr(exporting, "datetime", Clock)
    clock.setattr(exporting, "time", types.SimpleNamespace(time=frozen.timestamp))
    size = lun.export_backup(folder / "sizing.tar.gz").size
    assert lun.export_backup(folder / "again.tar.gz").size == size
    (folder / "sizing.tar.gz").unlink()
    (folder / "again.tar.gz").unlink()
    room = {"start": 0, "middle": size // 2, "last bytes": size - 6}[fills_at]

    class FillingUp(io.FileIO):
        """A file on a disk with `room` bytes free: a short write, then ENOSPC."""

        left = room

        def write(self, data: Any) -> int:
            if FillingUp.left <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            written = super().write(bytes(data)[: FillingUp.left])
            FillingUp.left -= written
            return written

    real_fdopen = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode != "wb":
            return real_fdopen(fd, mode, *args, **kwargs)
        return io.BufferedWriter(FillingUp(fd, "wb"))

    older = folder / "older.tar.gz"
    older.write_bytes(b"last week's backup")
    before = tree(models_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporting.os, "fdopen", fdopen)
        for target, force in ((folder / "b.tar.gz", False), (older, True)):
            FillingUp.left = room
            with pytest.raises(LuncherError) as error:
                lun.export_backup(target, force=force)
            assert str(error.value) == f"cannot write {target}: No space left on device"
            FillingUp.left = room
            one_line_error(run("export", target, *["--force"] * force), "No space left")
    assert sorted(p.name for p in folder.iterdir()) == ["older.tar.gz"]
    assert older.read_bytes() == b"last week's backup"
    assert tree(models_dir) == before
    assert lun.export_backup(folder / "b.tar.gz").size > 0  # room again: it works
    assert lun.import_backup(folder / "b.tar.gz").examples_per_label == {
        "fast_food": 3,
        "healthy": 3,
    }


@pytest.mark.parametrize("name", ["lunch\0.jpg", "\0"])
def test_a_path_with_a_nul_byte_is_a_luncher_error_not_a_value_error(lun, photos, name):
    """A file name cannot hold a NUL byte: os.stat raised ValueError (embedded null byte)
    out of predict, predict_each and retrain, past callers that catch LuncherError."""
    with pytest.raises(LuncherError, match="NUL"):
        lun.predict([name])
    [failure] = list(lun.predict_each([photos["red"][0], name]))[1:]
    assert isinstance(failure, ImageFailure) and "NUL" in failure.error
    with pytest.raises(LuncherError, match="NUL"):
        lun.retrain("healthy", [name])
