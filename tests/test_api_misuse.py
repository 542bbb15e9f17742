"""What a program that imports healthyluncher gets when it uses the API in ways the CLI
never does: calls from its own callbacks, arguments of unexpected kinds, results kept in
sets. Each test failed before the fix it names."""

from __future__ import annotations

import concurrent.futures
import copy
import importlib
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import healthyluncher
from healthyluncher import LuncherError, Progress, store


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=models_dir)
    return healthyluncher.open(models_dir)


@pytest.fixture
def lock_taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each time this process tried a lock file's flock and found it held by another
    descriptor (a wait for the lock, however short): its descriptor. Whether a call waited
    is told by this, not by a clock, which a loaded machine makes slow."""
    fcntl = pytest.importorskip("fcntl")
    taken: list[int] = []
    real_flock = fcntl.flock

    def flock(fd: Any, operation: int) -> None:
        try:
            real_flock(fd, operation)
        except BlockingIOError:
            taken.append(fd)
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    return taken


@pytest.mark.parametrize("call", ["undo", "retrain", "reset", "export", "other_luncher"])
def test_a_change_from_a_progress_callback_is_refused_at_once(
    lun, photos, models_dir, tmp_path, monkeypatch, lock_taken, call
):
    """A progress callback that called `lun.undo()` (or retrained, reset or exported) waited
    for the lock its own retrain held: 120 s, telling `on_wait` that "another luncher
    process" was changing the directory, then failed with that false reason. It is refused
    at once now, in one line, and the retrain it interrupted goes on."""
    monkeypatch.setattr(store, "LOCK_TIMEOUT", 8.0)  # the old wait, shortened
    lun.retrain("healthy", photos["red"][:1])
    other = healthyluncher.open(models_dir)
    calls = {
        "undo": lun.undo,
        "retrain": lambda: lun.retrain("fast_food", photos["green"][1:2]),
        "reset": lun.reset,
        "export": lambda: lun.export_backup(tmp_path / "b.tar.gz"),
        "other_luncher": other.undo,  # the same directory, opened again
    }
    refused: list[tuple[str, int]] = []

    def on_progress(event: Progress) -> None:
        if refused:
            return
        before = len(lock_taken)
        try:
            calls[call]()
        except LuncherError as error:
            refused.append((str(error), len(lock_taken) - before))
        else:
            refused.append(("not refused", 0))

    result = lun.retrain("fast_food", photos["green"][:1], progress=on_progress)
    [(message, waits)] = refused
    assert "has not returned yet" in message and "\n" not in message, message
    assert "another luncher process" not in message
    assert waits == 0, f"it waited for the lock ({waits} tries) before it was refused"
    assert result.changed
    assert lun.status().examples_per_label == {"healthy": 1, "fast_food": 1}
    assert not (tmp_path / "b.tar.gz").exists()
    # The lock is free again once the call has returned.
    assert lun.undo().examples_per_label == {"healthy": 1}


NAMES, NUMBERS = (
    "labels must be a list of names in order",
    "mean must be a list of numbers in order",
)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"labels": {"healthy", "fast_food"}}, f"{NAMES}, not a set"),
        ({"labels": {"healthy": 0, "fast_food": 1}}, f"{NAMES}, not a dict"),
        ({"labels": 2}, f"{NAMES}, not int"),
        ({"mean": {120.0, 110.0, 100.0}, "std": [50, 50, 50]}, f"{NUMBERS}, not a set"),
        ({"mean": 5, "std": 5}, f"{NUMBERS}, not int"),
        # An empty dict (settings a program meant to fill) was taken for "not given".
        ({"hyperparameters": {}}, "hyperparameters must be a Hyperparameters, not {}"),
    ],
)
def test_make_updatable_refuses_labels_and_statistics_without_an_order(
    pt_model, models_dir, given, named
):
    """`make_updatable(model, labels={"healthy", "fast_food"})` made a base whose labels were
    in the set's order, which changes from one run of Python to the next (string hashes are
    salted): the model's first output could be named fast_food, and every prediction
    swapped, without a word. A dict gave its keys, a number or `mean=5` a TypeError from
    inside. Each is refused in one line, and nothing is set up."""
    with pytest.raises(LuncherError) as refused:
        healthyluncher.make_updatable(pt_model, models_dir=models_dir, **given)
    assert str(refused.value).startswith(named), refused.value
    assert "\n" not in str(refused.value)
    assert not list(models_dir.glob("base-*"))
    # In order, as a list, a tuple, a generator or a numpy array, they are taken.
    made = healthyluncher.make_updatable(
        pt_model, models_dir=models_dir, labels=(name for name in ["fast_food", "healthy"])
    )
    assert made.meta.labels == ("fast_food", "healthy")


@pytest.mark.parametrize("shipped_base", [False, True])
def test_a_deleted_state_file_loses_neither_the_base_nor_the_personalization(
    lun, photos, models_dir, monkeypatch, shipped_base
):
    """With state.json deleted (by hand, a sync tool, a restore of the folders alone), the
    next `lun.predict` took the directory for an empty one: it set up the shipped base and
    deleted the user's own base and personalized copy with its undo history; without a
    shipped model it said there was no base yet, to be made again with `force` (which
    drops the personalization). The newest complete state is recovered instead, as for a
    damaged state.json."""
    if shipped_base:
        monkeypatch.delenv("LUNCHER_BUNDLED_MODEL")
    lun.retrain("healthy", photos["red"][:1])
    lun.retrain("fast_food", photos["green"][:1])
    base = lun.status().base_sha256
    before = lun.predict(photos["green"][1:2])[0].probabilities
    (models_dir / "state.json").unlink()
    again = healthyluncher.open(models_dir)
    assert again.predict(photos["green"][1:2])[0].probabilities == pytest.approx(before)
    assert again.personalized and again.labels == ("healthy", "fast_food")
    assert lun.status().examples_per_label == {"healthy": 1, "fast_food": 1}
    assert lun.status().base_sha256 == base  # the user's base, not the shipped one
    assert lun.undo().examples_per_label == {"healthy": 1}  # the history is there too
    assert (models_dir / "state.json").is_file()


def test_a_strictly_typed_program_may_pass_what_the_readme_says_it_may(tmp_path, monkeypatch):
    """`mypy --strict` refused `lun.retrain(..., epochs=np.int64(5))`, which the README
    offers ("Numbers may be numpy's") and which runs, and `mean=np.array(...)`, and a list
    holding a memoryview of a photo file, which runs too: the signatures said `int`,
    `float`, `Sequence[float]` and no memoryview. A wrong type is still an error."""
    pytest.importorskip("mypy")
    program = tmp_path / "program.py"
    program.write_text(
        textwrap.dedent(
            """
            import numpy as np
            import healthyluncher

            lun = healthyluncher.open("models")
            lun.predict(["a.jpg", memoryview(b"...")])
            lun.retrain(
                "healthy",
                ["a.jpg"],
                epochs=np.int64(5),
                learning_rate=np.float32(0.01),
                views=np.int32(2),
                memory_strength=np.float64(30),
            )
            healthyluncher.make_updatable(
                "model.onnx",
                trainable_layers=np.int64(1),
                resize=np.int64(256),
                mean=np.array([120.0, 110.0, 100.0]),
                std=[np.float32(50), 50, 50.0],
            )
            lun.retrain("healthy", ["a.jpg"], epochs="5")  # the one error
            """
        )
    )
    package = Path(healthyluncher.__file__).parent.parent  # the one under test
    monkeypatch.setenv("MYPYPATH", str(package))
    (tmp_path / "mypy.ini").write_text("[mypy]\n")  # not the project's settings: a user's
    options = ["--config-file", str(tmp_path / "mypy.ini"), "--cache-dir", str(tmp_path / "c")]
    # In a Python of its own: mypy's main raises the recursion limit of its process.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", *options, "--strict", str(program)],
        capture_output=True,
        text=True,
        check=False,
    )
    out, err = done.stdout, done.stderr
    errors = [line for line in out.splitlines() if line.startswith(f"{program}:")]
    assert len(errors) == 1 and '"epochs"' in errors[0] and "str" in errors[0], out + err


def _changing_meanwhile(lun: healthyluncher.Luncher, photos: dict[str, list[Path]]):
    """A retrain in another thread (as an UpdateTask runs one), paused inside its
    transaction until the returned event is set; and that thread."""
    inside, release = threading.Event(), threading.Event()

    def pause(event: Progress) -> None:
        inside.set()
        release.wait(60)

    thread = threading.Thread(
        target=lun.retrain, args=("healthy", photos["red"][:1]), kwargs={"progress": pause}
    )
    thread.start()
    assert inside.wait(60)
    return release, thread


def _child_undoes(lun: healthyluncher.Luncher, done: Any) -> None:
    try:
        done.put(("undone", lun.undo().examples_per_label))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        done.put(("failed", repr(error)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_during_a_change_keeps_neither_its_lock_nor_its_thread_locks(
    lun, photos, monkeypatch, lock_taken
):
    """A program that started a multiprocessing worker (forked, Linux's default before
    Python 3.14) while an UpdateTask retrained: the worker inherited the lock file's
    descriptor, and an flock lasts while any copy is open, so every later change of the
    program waited 120 s for "another luncher process" and failed, for as long as the
    worker lived. A child that used the Luncher itself waited forever for the change lock
    of a thread it does not have. Both work now: the child drops what its parent's other
    threads held, and waits only while the parent really changes the directory."""
    # The old wait, shortened, but long enough for the child's rightful wait for the
    # parent's retrain on a loaded machine (8 s was not, with the parent stalled 9 s).
    monkeypatch.setattr(store, "LOCK_TIMEOUT", 60.0)
    fork = multiprocessing.get_context("fork")
    release, thread = _changing_meanwhile(lun, photos)
    idle = fork.Process(target=time.sleep, args=(300,))  # a pool's worker, say
    done = fork.Queue()
    child = fork.Process(target=_child_undoes, args=(lun, done))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
        idle.start()
        child.start()
    try:
        time.sleep(0.5)
        assert child.is_alive()  # it waits for the parent's retrain: processes take turns
        release.set()
        thread.join(60)
        assert done.get(timeout=30)[0] == "undone"
        child.join(30)
        assert child.exitcode == 0
        # Nobody changes the directory now: the worker holds no lock, so the retrain never
        # finds it taken (before, it waited for it, then failed).
        assert idle.is_alive()
        lock_taken.clear()
        result = lun.retrain("fast_food", photos["green"][:1])  # while the worker lives
        assert lock_taken == [] and result.changed
    finally:
        release.set()
        idle.kill()
        child.kill()


@pytest.mark.parametrize("callback", ["progress", "completion"])
def test_an_update_task_refuses_a_callback_that_is_no_function_before_it_starts(
    lun, photos, callback
):
    """`UpdateTask(lun.retrain, ..., progress=5)` started the retrain, which then failed in
    its thread with an internal "TypeError: 'int' object is not callable";
    `completion=5` let the retrain finish and the TypeError went to threading.excepthook,
    unseen by the caller. Both are refused where the task is made, as `lun.retrain`
    refuses `progress=5`, and nothing runs."""
    with pytest.raises(LuncherError, match=rf"^{callback} must be a function, not 5$"):
        healthyluncher.UpdateTask(lun.retrain, "healthy", photos["red"][:1], **{callback: 5})
    assert not lun.personalized


def test_results_are_frozen_all_through_and_hashable(lun, photos, tmp_path, pt_model, models_dir):
    """Results are frozen dataclasses, which promise a hash: `set(predictions)`, or a
    prediction as a cache key, raised "TypeError: unhashable type: 'dict'", and
    `prediction.probabilities["healthy"] = 1.0` changed a "frozen" result in place. Their
    dicts cannot change now, and they hash, pickle, copy and compare as before."""
    predictions = lun.predict([photos["red"][0], photos["red"][0], photos["green"][0]])
    assert len(set(predictions)) == 2
    retrained = lun.retrain("healthy", photos["red"][:2])
    results = [
        *predictions,
        retrained,
        lun.status(),
        lun.export_backup(tmp_path / "b.tar.gz"),
        lun.undo(),
        lun.import_backup(tmp_path / "b.tar.gz"),
        lun.forget(photos["red"][:1]),
        lun.reset(),
        healthyluncher.make_updatable(pt_model, models_dir=models_dir, force=True),
    ]
    for result in results:
        assert hash(result) == hash(copy.deepcopy(result))
        assert pickle.loads(pickle.dumps(result)) == result
        assert json.dumps(healthyluncher.to_json(result))
    probabilities = predictions[0].probabilities
    with pytest.raises(TypeError, match="cannot be changed"):
        probabilities["healthy"] = 1.0
    with pytest.raises(TypeError, match="cannot be changed"):
        retrained.examples_per_label.update(fast_food=9)
    assert probabilities == dict(probabilities) and isinstance(probabilities, dict)
    assert sum(probabilities.values()) == pytest.approx(1)


def test_make_updatable_refuses_resize_zero_rather_than_reading_it_as_not_given(
    pt_model, models_dir
):
    """`make_updatable(model, resize=0)` made a base with the default resize (18 for this
    16-pixel model), as if no resize were given, where `--resize 0` and `resize=8` are
    refused: a computed size that came out 0 went unnoticed."""
    with pytest.raises(LuncherError, match=r"^resize=0 is smaller than the model's input 16x16"):
        healthyluncher.make_updatable(pt_model, models_dir=models_dir, resize=0)
    assert not list(models_dir.glob("base-*"))


def test_a_path_like_object_that_gives_bytes_is_a_path(lun, photos, models_dir):
    """`lun.predict(os.scandir(b"photos"))` (os.DirEntry of a bytes path, os.PathLike like
    any other) raised pathlib's "TypeError: argument should be a str object or an
    os.PathLike object returning str", and `healthyluncher.open` of one did too. Such a
    path is the file it names now."""
    folder = os.fsencode(photos["red"][0].parent)
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    predictions = lun.predict(entries)
    assert [p.path for p in predictions] == sorted(photos["red"])
    assert predictions == lun.predict(sorted(photos["red"]))
    [models_entry] = [e for e in os.scandir(os.fsencode(models_dir.parent)) if e.name == b"models"]
    assert healthyluncher.open(models_entry).models_dir == models_dir


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])
def test_a_pil_image_whose_info_holds_a_profile_that_is_no_bytes_is_predicted(lun, photos, mode):
    """A PIL image a program made or edited with `info["icc_profile"] = "sRGB"` (text, where
    Pillow's writers want bytes) raised Pillow's internal "TypeError: a bytes-like object
    is required, not 'str'" from `lun.predict`. The profile is left out (decoding applies
    none), and the photo is predicted as the same image without it."""
    image = Image.open(photos["red"][0]).convert(mode)
    odd = image.copy()
    odd.info["icc_profile"] = "sRGB"
    [ours, plain] = lun.predict([odd, image])
    assert ours.probabilities == pytest.approx(plain.probabilities)


def test_a_luncher_goes_to_a_process_pool_as_its_directory(lun, photos, models_dir):
    """`ProcessPoolExecutor().map(lun.predict, batches)` with a spawned or forkserver
    worker (macOS's and Windows's default, Linux's from Python 3.14) pickles the bound
    method, and so the Luncher: "TypeError: cannot pickle '_thread.RLock' object". A
    Luncher pickles as the directory it opens (and its `on_wait`), opened again there."""
    again = pickle.loads(pickle.dumps(lun))
    assert again is not lun and again.models_dir == models_dir
    assert again.predict(photos["red"][:1]) == lun.predict(photos["red"][:1])
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        predicted = pool.submit(lun.predict, photos["green"][:1]).result(timeout=120)
    assert predicted == lun.predict(photos["green"][:1])


@pytest.fixture
def sessions_made(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Grows by one (its `use_base`) each time a Luncher loads an ONNX Runtime session."""
    from healthyluncher import predictor as predictor_module

    made: list[bool] = []
    original = predictor_module.Predictor.__init__

    def counted(self: Any, store: Any, *, use_base: bool = False) -> None:
        made.append(use_base)
        original(self, store, use_base=use_base)

    monkeypatch.setattr(predictor_module.Predictor, "__init__", counted)
    return made


def test_a_pickled_luncher_loads_its_session_once_per_process(lun, photos, sessions_made):
    """`pool.map(lun.predict, batches)` pickles the Luncher with every task: each was a new
    Luncher in the worker, which loaded its ONNX Runtime session again for every batch
    (shipped model: 39 ms a one-photo task instead of 23). A worker makes one Luncher per
    directory and keeps it, which still sees each change."""
    made = sessions_made
    tasks = [pickle.loads(pickle.dumps(lun.predict)) for _ in range(3)]  # as a worker does
    first = [task(photos["red"][:1])[0] for task in tasks]
    assert len(made) == 1 and first[0] == first[2]
    lun.retrain("healthy", photos["green"][:1])
    before = len(made)
    after = [pickle.loads(pickle.dumps(lun.predict))(photos["red"][:1])[0] for _ in range(2)]
    assert after[0] != first[0] and len(made) == before + 1  # loaded again once: a new state


@pytest.mark.parametrize("mode", ["I;16L", "I;16N"])
def test_a_16_bit_pil_image_of_either_byte_order_name_is_predicted(lun, mode):
    """A 16-bit greyscale PIL image in mode I;16L or I;16N (`Image.frombytes("I;16L", ...)`
    of a camera's raw buffer) was refused: "cannot use this image (cannot write mode I;16L
    as PNG)". Its pixels are I;16's, and it is predicted as that image is."""
    pixels = (np.arange(40 * 30, dtype="<u2").reshape(30, 40) * 50).astype("<u2")
    reference = Image.fromarray(pixels)
    assert reference.mode == "I;16"
    image = Image.frombytes(mode, (40, 30), pixels.tobytes())
    [ours, theirs] = lun.predict([image, reference])
    assert ours.probabilities == pytest.approx(theirs.probabilities)


def test_a_results_in_memory_photo_can_be_handed_back(lun, photos):
    """A program that predicts camera frames (numpy arrays) and retrains the ones it got
    wrong hands back `prediction.path`, a MemoryPhoto: `lun.retrain("healthy", [p.path for
    p in wrong])` and `lun.forget(taught.path)` said "expected a path, a photo file's bytes,
    a PIL image or a numpy uint8 array, not MemoryPhoto" (and "not a list" for one), where
    a file's `Path` is taken back as given. A MemoryPhoto is its photo now."""
    frames = [np.asarray(Image.open(path).convert("RGB")) for path in photos["green"]]
    predictions = lun.predict(frames)
    result = lun.retrain("healthy", [p.path for p in predictions])
    assert [str(t.path) for t in result.photos] == ["<image 0>", "<image 1>", "<image 2>"]
    assert [p.path for p in lun.predict(frames)] == [p.path for p in predictions]
    assert lun.predict(predictions[0].path)[0].label == "healthy"
    assert lun.forget(result.photos[1].path).forgotten == 1  # one, not a list of one
    assert lun.status().examples_per_label == {"healthy": 2}


def test_asking_for_the_base_and_the_personalization_in_turn_loads_each_once(
    lun, photos, sessions_made
):
    """A server that shows what the base says beside what the personalized model says
    (`predict(base=True)`, then `predict()`) loaded an ONNX Runtime session on every call:
    the Luncher kept one, and each call replaced the other's (44 ms a call instead of 16
    with the shipped model). Each stays loaded until the state changes."""
    lun.retrain("healthy", photos["green"][:1])
    made = sessions_made
    made.clear()  # the retrain's own
    for _ in range(3):
        personal = lun.predict(photos["green"][:1])[0]
        base = lun.predict(photos["green"][:1], base=True)[0]
    assert personal.probabilities != base.probabilities
    assert sorted(made) == [False, True]
    lun.undo()  # a new state: loaded again
    lun.predict(photos["green"][:1])
    assert len(made) == 3


def test_bytes_that_name_a_file_are_told_apart_from_a_photos_content(lun, photos):
    """`lun.predict(str(path).encode())` (a path as bytes, from os.fsencode or a byte-level
    protocol) is refused, since bytes are a photo file's content, with "not an image file
    Pillow can read", which does not say why a photo that opens everywhere else fails. The
    error says that the bytes name a file, and how to pass its name."""
    for name in (os.fsencode(photos["red"][0]), os.fsencode(photos["red"][0].parent)):
        with pytest.raises(LuncherError) as refused:
            lun.predict(name)
        assert str(refused.value) == (
            "<image 0>: cannot decode image: these bytes are a file's name, not its content: "
            "give the name as a str or Path"
        )
    with pytest.raises(LuncherError, match="not an image file Pillow can read$"):
        lun.predict(b"no such file, nor a photo")


def test_a_numpy_array_of_file_names_is_an_iterable_of_photos(lun, photos):
    """`lun.predict(np.array(paths))` (a file list a program loaded with numpy) was read as
    one photo's pixels: "a numpy photo must be uint8 with shape (H, W, 3)..., not <U..
    (3,)", though any iterable of photos is documented to do. An array of names (or of
    objects: arrays of pixels) is read as its items; a uint8 array stays one photo."""
    paths = [*photos["red"][:2], photos["green"][0]]
    expected = lun.predict(paths)
    assert lun.predict(np.array([str(path) for path in paths])) == expected
    assert lun.predict(np.array(paths, dtype=object)) == expected
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in paths[:2]]
    ragged = np.empty(2, dtype=object)
    ragged[:] = pixels  # frames of any sizes, kept in an object array
    assert [p.label for p in lun.predict(ragged)] == [p.label for p in expected[:2]]
    assert [str(p.path) for p in lun.predict(pixels[0])] == ["<image 0>"]


def _takes_module_lock(module_name: str, lock_name: str, done) -> None:
    module = importlib.import_module(module_name)
    lock = getattr(module, lock_name)
    done.put(lock.acquire(timeout=5))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
@pytest.mark.parametrize(
    ("module_name", "lock_name"),
    [("healthyluncher.runtime", "_TRAINING_LOCK"), ("healthyluncher.artifacts", "_ONE_AT_A_TIME")],
)
def test_a_process_forked_while_a_thread_holds_a_module_lock_gets_a_free_one(
    module_name, lock_name
):
    """The lock around importing the training API and the one around generating training
    files were inherited locked by a child forked while another thread held them (a
    multiprocessing worker started during a retrain): the child's first retrain, or its
    first import of ONNX Runtime, waited forever."""
    lock = getattr(importlib.import_module(module_name), lock_name)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    fork = multiprocessing.get_context("fork")
    done = fork.Queue()
    try:
        assert held.wait(10)
        child = fork.Process(target=_takes_module_lock, args=(module_name, lock_name, done))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
            child.start()
        assert done.get(timeout=30) is True
        child.join(30)
        assert child.exitcode == 0
    finally:
        release.set()
        holder.join(30)


def test_make_updatable_takes_the_keys_of_a_dict_in_their_order(pt_model, models_dir):
    """`labels=names.keys()` (a dict's keys: in insertion order since Python 3.7) was
    refused as "not a set, which has no order": a dict_keys view is a collections.abc.Set.
    It names the outputs in the order the program put the keys in."""
    names = {"fast_food": "Fast food", "healthy": "Healthy"}
    made = healthyluncher.make_updatable(pt_model, models_dir=models_dir, labels=names.keys())
    assert made.meta.labels == ("fast_food", "healthy")
    assert healthyluncher.open(models_dir).labels == ("fast_food", "healthy")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_from_a_changes_own_callback_keeps_neither_lock(
    lun, photos, monkeypatch, lock_taken
):
    """A progress callback that started a multiprocessing worker (forked) from the thread
    that held the lock: heldlocks closed only the locks of the parent's other threads, so
    the worker kept the lock file's descriptor, and every later change waited for
    "another luncher process" as long as the worker lived (120 s, then failed); the worker
    itself was refused its own changes as if it were inside the parent's retrain. The
    worker drops that lock too now, and both go on."""
    # The old wait, shortened, but long enough for the worker's rightful wait for the
    # parent's retrain on a loaded machine (8 s was not, with the parent stalled 9 s).
    monkeypatch.setattr(store, "LOCK_TIMEOUT", 60.0)
    fork = multiprocessing.get_context("fork")
    done = fork.Queue()
    children: list[Any] = []
    start_a_worker = _worker_starter(fork, _child_undoes, lun, done, children)

    idle = None
    try:
        lun.retrain("healthy", photos["red"][:1], progress=start_a_worker)
        state, _ = done.get(timeout=30)
        assert state == "undone", _  # the worker's own change, once the retrain ended
        idle = fork.Process(target=time.sleep, args=(300,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
            lun.retrain("healthy", photos["red"][1:2], progress=lambda _: idle.pid or idle.start())
        # The worker holds no lock: the retrain never finds it taken (it waited, then failed).
        assert idle.is_alive()
        lock_taken.clear()
        result = lun.retrain("fast_food", photos["green"][:1])  # while the worker lives
        assert lock_taken == [] and result.changed
    finally:
        for child in [*children, idle]:
            if child is not None and child.pid is not None:
                child.kill()


def _worker_starter(
    fork: Any, target: Any, lun: healthyluncher.Luncher, done: Any, children: list[Any]
) -> Any:
    """A progress callback that forks one worker running `target(lun, done)`, the first
    time it is called (into `children`)."""

    def start_a_worker(_: object) -> None:
        if not children:
            children.append(fork.Process(target=target, args=(lun, done)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
                children[0].start()

    return start_a_worker


def _undo_in_a_thread(lun: healthyluncher.Luncher, done: Any) -> None:
    thread = threading.Thread(target=_child_undoes, args=(lun, done), daemon=True)
    thread.start()
    thread.join(60)  # its rightful wait for the parent's retrain may be long on a loaded machine
    if thread.is_alive():
        done.put(("hung", "waited 60 s for the Luncher's lock"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_worker_forked_from_a_callback_may_use_the_luncher_from_its_threads(lun, photos):
    """A worker forked from a progress callback kept the Luncher's change lock held by the
    thread that forked it (its retrain never ends in the worker): a thread of the worker
    calling `lun.undo()` waited for it forever. The worker's locks are new ones."""
    fork = multiprocessing.get_context("fork")
    done = fork.Queue()
    children: list[Any] = []
    start_a_worker = _worker_starter(fork, _undo_in_a_thread, lun, done, children)

    try:
        lun.retrain("healthy", photos["red"][:1], progress=start_a_worker)
        assert done.get(timeout=90) == ("undone", {})
    finally:
        children[0].kill()


def _child_predicts(lun: healthyluncher.Luncher, photo: Path, done: Any) -> None:
    done.put(("started", ""))
    try:
        done.put(("predicted", lun.predict([photo])[0].label))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        done.put(("failed", repr(error)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_after_predictions_starts(lun, photos, pt_model, tmp_path):
    """A program that had predicted with two Lunchers (a server with two models directories)
    and then started a multiprocessing worker (forked): the child hung before running a line
    of its own. Its at-fork handler dropped the sessions the Lunchers had loaded, and an ONNX
    Runtime session's destructor waits for its threads, which a forked child does not have.
    The parent's sessions are never destroyed in the child now (its Lunchers load their own)."""
    healthyluncher.make_updatable(pt_model, models_dir=tmp_path / "second")
    second = healthyluncher.open(tmp_path / "second")
    lun.retrain("healthy", photos["red"][:1])
    for each in (lun, second):
        each.predict(photos["green"][:1])
        each.predict(photos["green"][:1], base=True)
    fork = multiprocessing.get_context("fork")
    done = fork.Queue()
    child = fork.Process(target=_child_predicts, args=(lun, photos["red"][1], done))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
        child.start()
    try:
        assert done.get(timeout=20) == ("started", "")
        assert done.get(timeout=30) == ("predicted", lun.predict(photos["red"][1:2])[0].label)
    finally:
        child.kill()
