"""What kept copies share on disk: the examples' views (segments) and the frozen weights."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import healthyluncher
from healthyluncher import segments
from healthyluncher.records import load_examples, load_personal
from healthyluncher.store import Files, ModelStore
from tests.conftest import one_line_error, solid


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=str(models_dir))
    return healthyluncher.open(str(models_dir))


def _copies(models_dir: Path) -> tuple[ModelStore, list[Path]]:
    """The store and its personal directories, current first, then the undo steps."""
    store = ModelStore(models_dir)
    state = store.read_state()
    names = [state.personal, *(step.personal for step in state.history)]
    return store, [models_dir / name for name in names if name]


def _views(store: ModelStore, folder: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    state = store.read_state()
    personal = load_personal(store, state)
    assert personal is not None and personal.path == folder
    examples = load_examples(personal, ())
    return examples.inputs, examples.digests


def test_kept_copies_share_their_examples_views(lun, photos, models_dir, tmp_path, pt_model):
    """Each kept copy held its own examples.npz with every view (5,000 photos: 25 MB per
    undo step), and each retrain wrote them all again. A change now writes only its new
    photos' views into one shared segment, and a copy's file indexes them."""
    lun.retrain("healthy", photos["red"])
    store, _ = _copies(models_dir)
    first_views, first_digests = _views(store, _copies(models_dir)[1][0])
    lun.retrain("fast_food", photos["green"][:1])
    lun.retrain("fast_food", photos["green"][1:])
    store, folders = _copies(models_dir)
    assert len(folders) == 3
    for folder in folders:
        with np.load(folder / Files.EXAMPLES) as data:
            assert "inputs" not in data.files and set(segments.INDEX_KEYS) <= set(data.files)
    stored = sorted((models_dir / segments.FOLDER).glob("*.npy"))
    assert len(stored) == 3  # one per change, each holding that change's new photos
    views, digests = _views(store, folders[0])
    assert sum(len(np.load(path)) for path in stored) == len(views)
    # Undo brings back exactly the first copy's views, read from the shared segments.
    lun.undo()
    lun.undo()
    store, folders = _copies(models_dir)
    again, again_digests = _views(store, folders[0])
    np.testing.assert_array_equal(again, first_views)
    assert again_digests == first_digests
    # A backup holds its views itself: another machine has none of these segments.
    archive = tmp_path / "backup.tar.gz"
    lun.export_backup(archive)
    with tarfile.open(archive) as tar:
        member = tar.extractfile(Files.EXAMPLES)
        assert member is not None
        (tmp_path / "unpacked.npz").write_bytes(member.read())
    with np.load(tmp_path / "unpacked.npz") as data:
        np.testing.assert_array_equal(data["inputs"], first_views)
    healthyluncher.make_updatable(pt_model, models_dir=str(tmp_path / "other"))
    other = healthyluncher.open(str(tmp_path / "other"))
    other.import_backup(archive)
    assert other.predict(photos["red"]) == lun.predict(photos["red"])


def test_segments_no_kept_copy_names_are_removed(lun, photos, models_dir):
    lun.retrain("healthy", photos["red"])
    lun.retrain("fast_food", photos["green"])
    assert len(list((models_dir / segments.FOLDER).glob("*.npy"))) == 2
    lun.forget(photos["red"])  # no undo step keeps the red photos' views
    (left,) = (models_dir / segments.FOLDER).glob("*.npy")
    store, (current,) = _copies(models_dir)
    views, digests = _views(store, current)
    assert len(digests) == len(photos["green"]) and len(np.load(left)) == len(views)
    with np.load(current / Files.EXAMPLES) as data:
        assert [str(s) for s in data["segments"]] == [left.name]
    lun.reset(purge=True)
    assert list((models_dir / segments.FOLDER).glob("*")) == []


def test_past_max_segments_the_small_ones_merge(lun, photos, models_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "MAX_SEGMENTS", 2)
    more = [solid(tmp_path / "more" / f"m{i}.png", (40, 40, 120 + 30 * i)) for i in range(4)]
    lun.retrain("healthy", photos["red"])
    expected = None
    for photo in more:
        lun.retrain("fast_food", [photo])
        store, folders = _copies(models_dir)
        with np.load(folders[0] / Files.EXAMPLES) as data:
            assert len(data["segments"]) <= 2
        views, digests = _views(store, folders[0])
        assert len(digests) == len(photos["red"]) + more.index(photo) + 1
        expected = views
    # The merged views are the same views: a fresh copy trained on them predicts alike.
    assert expected is not None and np.isfinite(expected).all()
    assert lun.status().examples_per_label == {"healthy": 3, "fast_food": 4}


@pytest.mark.parametrize(
    "damage", ["row past the end", "segment not listed", "segment name", "missing segment"]
)
def test_a_damaged_examples_index_is_refused_in_one_line(run, lun, photos, models_dir, damage):
    """Every value of the index is checked before it is used: a name that leaves the
    folder, a row or segment out of range, a segment that is gone."""
    lun.retrain("healthy", photos["red"])
    lun.retrain("fast_food", photos["green"])
    _, folders = _copies(models_dir)
    path = folders[0] / Files.EXAMPLES
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    if damage == "row past the end":
        arrays["origin"][0, 1] = 10**6
    elif damage == "segment not listed":
        arrays["origin"][0, 0] = len(arrays["segments"])
    elif damage == "segment name":
        arrays["segments"] = np.array(["../../../etc/passwd"] * len(arrays["segments"]))
    else:
        (models_dir / segments.FOLDER / str(arrays["segments"][-1])).unlink()
    if damage != "missing segment":
        np.savez(path, **arrays)
    result = run("retrain", "--label", "healthy", photos["green"][0])
    if damage == "missing segment":  # the undo steps share it: repair embeds them again
        one_line_error(result, "cannot be read", "luncher repair", "thumbnails")
    else:
        one_line_error(result, str(path), "damaged", "undo")
    assert run("undo").code == 0
    assert run("retrain", "--label", "healthy", photos["green"][0]).code == 0


@pytest.mark.parametrize(
    "damage", ["junk", "missing", "wrong dtype", "a named pipe", "NaN", "infinite", "huge"]
)
def test_a_damaged_segment_is_repaired_from_the_thumbnails(run, lun, photos, models_dir, damage):
    """A segment is shared by the undo steps, and its damage said "examples.npz is
    damaged; run `luncher undo`", which only reached steps damaged the same way. Values that
    are not numbers trained to NaN weights, and the advice was a smaller --learning-rate."""
    lun.retrain("healthy", photos["red"])
    (segment,) = (models_dir / segments.FOLDER).glob("*.npy")
    if damage == "junk":
        segment.write_bytes(b"not a numpy file")
    elif damage == "missing":
        segment.unlink()
    elif damage == "a named pipe":  # retrain, export and repair blocked forever opening it
        segment.unlink()
        os.mkfifo(segment)
    elif damage in ("NaN", "infinite", "huge"):  # huge: its square overflows, as inf trains
        rows = np.load(segment)
        rows[1, 0] = {"NaN": np.nan, "infinite": -np.inf, "huge": 1e30}[damage]
        np.save(segment, rows)
    else:
        np.save(segment, np.zeros((3, 2), np.int64))
    line = one_line_error(
        run("retrain", "--label", "healthy", photos["green"][0]), "luncher repair"
    )
    # numpy's own words told the user to load the file "unsafely" (with pickle)
    assert "pickle" not in line and "unsafe" not in line and "mmap" not in line, line
    if damage == "junk":
        assert "not a numpy file" in line, line
    repaired = run("repair", "--json")
    assert repaired.code == 0, repaired
    assert repaired.json_lines()[0]["reembedded"] == 3
    assert lun.status().examples_per_label == {"healthy": 3}
    assert run("retrain", "--label", "fast_food", photos["green"][0]).code == 0
    assert lun.status().examples_per_label == {"healthy": 3, "fast_food": 1}
    assert run("repair", "--json").json_lines()[0]["reembedded"] == 0  # nothing to do now


@pytest.mark.parametrize("where", ["personal model.onnx", "personal examples.npz", "base frozen"])
def test_a_named_pipe_in_a_copy_is_one_line_that_leads_back(run, lun, photos, models_dir, where):
    """A named pipe (or a device) in place of a file of the current copy or its base:
    predict or retrain blocked forever opening it. Now one line, whose command works."""
    lun.retrain("healthy", photos["red"][:1])
    lun.retrain("fast_food", photos["green"][:1])
    store = ModelStore(models_dir)
    state = store.read_state()
    folder = store.base_dir(state) if where.startswith("base") else store.personal_dir(state)
    assert folder is not None
    path = folder / {"base frozen": Files.FROZEN}.get(where, where.split()[-1])
    path.unlink()
    os.mkfifo(path)
    command = "undo" if where.startswith("personal") else "make-updatable"
    line = one_line_error(run("retrain", "--label", "healthy", photos["red"][1]), command)
    assert "not a regular file" in line, line
    if command == "undo":
        assert run("undo").code == 0
        assert lun.status().examples_per_label == {"healthy": 1}
    else:
        model = models_dir.parent / "tiny_pt.onnx"
        assert run("make-updatable", model, "--keep-personalization").code == 0
        assert lun.status().examples_per_label == {"healthy": 1, "fast_food": 1}
    assert run("predict", photos["red"][1]).code == 0


@pytest.mark.parametrize(
    "damage",
    ["digest out of the folder", "digests not a list", "labels a table", "unknown label", "owner"],
)
def test_damaged_examples_arrays_are_refused_in_one_line(
    run, lun, photos, models_dir, tmp_path, damage
):
    """The digests, labels and owners of examples.npz are checked as the index is: a
    digest is a thumbnail's file name (a forget deletes it), a label picks a class."""
    lun.retrain("healthy", photos["red"])
    victim = models_dir.parent / "victim.jpg"
    victim.write_bytes(b"not luncher's")
    path = _copies(models_dir)[1][0] / Files.EXAMPLES
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    if damage == "digest out of the folder":  # thumbnails/../../victim.jpg
        arrays["digests"] = arrays["digests"].astype("<U80")
        arrays["digests"][:] = "../../victim"
    elif damage == "digests not a list":
        arrays["digests"] = np.array(arrays["digests"][0])
    elif damage == "labels a table":
        arrays["labels"] = arrays["labels"].reshape(-1, 1)
    elif damage == "unknown label":
        arrays["labels"][:] = "zzz"
    else:
        arrays["owner"] = arrays["owner"] + 0.5
    np.savez(path, **arrays)
    for command in (("labels", "remove", "healthy"), ("retrain", "--label", "healthy")):
        args = (*command, photos["green"][0]) if command[0] == "retrain" else command
        one_line_error(run(*args), str(path), "damaged", "undo")
    assert victim.exists()
    assert run("undo").code == 0
    assert run("retrain", "--label", "healthy", photos["green"][0]).code == 0


def test_undo_steps_share_the_bases_weights_file_and_the_current_copy_owns_one(
    lun, photos, models_dir
):
    """Each kept copy held its own 13.5 MB copy of the base's frozen weights. An undo step
    now links the base's file; the current copy keeps a file of its own, which onnx.load
    accepts (it refuses external data with several links), also after `undo`."""
    lun.retrain("healthy", photos["red"])
    before = lun.predict(photos["red"] + photos["green"])
    lun.retrain("fast_food", photos["green"])
    store, (current, step) = _copies(models_dir)
    base = models_dir / store.read_state().base
    assert os.path.samefile(step / Files.MODEL_DATA, base / Files.MODEL_DATA)
    assert (current / Files.MODEL_DATA).stat().st_nlink == 1
    onnx.load(str(current / Files.MODEL))
    # status counts the linked file once, as du does.
    sizes = {}
    for path in models_dir.rglob("*"):
        if path.is_file():
            sizes[path.stat().st_ino] = path.stat().st_size
    assert lun.status().disk_bytes == sum(sizes.values())
    lun.undo()
    _, (now,) = _copies(models_dir)
    assert now == step and (now / Files.MODEL_DATA).stat().st_nlink == 1
    assert (base / Files.MODEL_DATA).stat().st_nlink == 1
    onnx.load(str(now / Files.MODEL))
    assert lun.predict(photos["red"] + photos["green"]) == before


def test_a_models_directory_from_before_segments_keeps_working(lun, photos, models_dir):
    """Earlier versions wrote each copy's views into its examples.npz: such copies load,
    undo to them works, and the next change stores their views in segments."""
    lun.retrain("healthy", photos["red"])
    lun.retrain("fast_food", photos["green"][:1])
    store, folders = _copies(models_dir)
    expected = {}
    for folder in folders:
        personal = load_personal(store, store.read_state())
        assert personal is not None
        examples = load_examples(type(personal)(folder, personal.meta), ())
        expected[folder.name] = examples.inputs
        np.savez(
            folder / Files.EXAMPLES,
            inputs=examples.inputs,
            owner=examples.owner,
            digests=np.array(examples.digests),
            labels=np.array(examples.labels),
        )
    for path in (models_dir / segments.FOLDER).iterdir():
        path.unlink()
    before = lun.predict(photos["red"] + photos["green"])
    lun.retrain("fast_food", photos["green"][1:])
    _, (current, *_) = _copies(models_dir)
    with np.load(current / Files.EXAMPLES) as data:
        assert "inputs" not in data.files
    lun.undo()
    assert lun.predict(photos["red"] + photos["green"]) == before
    views, _ = _views(store, folders[0])
    np.testing.assert_array_equal(views, expected[folders[0].name])


def test_a_new_copy_is_durable_file_by_file_before_state_json_names_it(lun, photos, models_dir):
    """The staged meta.json and taught.json are no longer fsynced one by one as they are
    written: publishing fsyncs the staged directory whole. Every file and directory of the
    new copy must still be fsynced, after its last write and before state.json names it."""
    lun.retrain("healthy", photos["red"][:1])
    synced: list[tuple[int, int]] = []
    named_at: list[int] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))

    def replace(source: object, target: object) -> None:
        real_replace(source, target)  # type: ignore[arg-type]
        if Path(str(target)).name == "state.json":
            named_at.append(len(synced))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        patch.setattr(os, "replace", replace)
        lun.retrain("fast_food", photos["green"][:1])
    _, (current, *_) = _copies(models_dir)
    before_switch = set(synced[: named_at[-1]])
    paths = [current, *current.rglob("*")]
    missing = [p.name for p in paths if (p.stat().st_dev, p.stat().st_ino) not in before_switch]
    assert missing == []
    state = (models_dir / "state.json").stat()
    assert (state.st_dev, state.st_ino) in before_switch  # its temporary file, then renamed
    assert len(paths) >= 9


def test_publishing_fsyncs_the_staged_files_at_once_and_reports_a_failure(tmp_path):
    """One after another, each fsync waited for a journal commit of its own (35 ms for a
    retrain's copy on ext4); at once, the filesystem commits them together. Each must still
    succeed."""
    import threading

    from healthyluncher import fileio

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc to name a descriptor's file")
    folder = tmp_path / "staged"
    (folder / "inner").mkdir(parents=True)
    for name in ("a", "b", "c", "inner/d"):
        (folder / name).write_bytes(b"x")
    together = threading.Barrier(2, timeout=10)  # fsyncs one at a time never get past it
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            together.wait()
        real_fsync(fd)

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/c"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        fileio.fsync_tree(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", failing)
        with pytest.raises(OSError, match="Input/output error"):
            fileio.fsync_tree(folder)


def test_an_undo_step_links_the_bases_weights_file_only_when_the_bytes_are_the_same(tmp_path):
    """The comparison reads 64 KiB at a time now (filecmp read 8 KiB: 12 ms per change for
    the shipped base's weights file); a copy that differs anywhere keeps its own file."""
    from healthyluncher import weightsfile

    base, step = tmp_path / "base", tmp_path / "step"
    base.mkdir()
    step.mkdir()
    data = np.random.default_rng(0).bytes(3 * weightsfile.COMPARE_CHUNK + 5)
    (base / Files.MODEL_DATA).write_bytes(data)
    for changed in (data[:-1] + b"\0", data[:-1], data + b"\0", data[:100] + b"!" + data[101:]):
        if changed == data:  # the random byte happened to be the one written
            continue
        (step / Files.MODEL_DATA).write_bytes(changed)
        assert not weightsfile.same_bytes(step / Files.MODEL_DATA, base / Files.MODEL_DATA)
        weightsfile.share(step, base)
        assert (step / Files.MODEL_DATA).read_bytes() == changed
        assert (step / Files.MODEL_DATA).stat().st_nlink == 1
    (step / Files.MODEL_DATA).write_bytes(data)
    weightsfile.share(step, base)
    assert os.path.samefile(step / Files.MODEL_DATA, base / Files.MODEL_DATA)
    assert list(step.iterdir()) == [step / Files.MODEL_DATA]  # no temporary file left


def _empty_cache_folders(models_dir: Path) -> list[str]:
    cache = models_dir / "cache"
    folders = [cache, *cache.glob("*")] if cache.is_dir() else []
    return [f.name for f in folders if f.is_dir() and not any(f.iterdir())]


def test_no_empty_cache_folder_outlives_its_base(run, pt_model, photos, models_dir, tmp_path):
    """Replacing a base (an upgrade, --force, a forget that drops the undo steps holding the
    old one, reset --purge) left its empty `cache/<base>` folder behind for good."""
    from tests.models import keras_style, pytorch_style

    others = [keras_style(tmp_path / "k.onnx")]
    others += [pytorch_style(tmp_path / f"p{seed}.onnx", seed=seed) for seed in (3, 4, 5)]
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    steps = [
        ("make-updatable", others[0], "--keep-personalization"),
        ("forget", photos["red"][0]),  # clears the undo steps: the first base goes
        *(("make-updatable", model, "--force") for model in others[1:]),  # the oldest drops off
        ("retrain", "--label", "healthy", photos["green"][0]),
        ("reset", "--purge", "--yes"),
    ]
    for step in steps:
        assert run(*step).code == 0, step
        assert _empty_cache_folders(models_dir) == [], step
    assert not (models_dir / "cache").exists()


def test_only_empty_folders_are_removed_from_the_cache(tmp_path):
    from healthyluncher.fileio import remove_empty_folders

    cache = tmp_path / "cache"
    (cache / "gone").mkdir(parents=True)
    (cache / "kept").mkdir()
    (cache / "kept" / "photo.v2x8.npy").write_bytes(b"views")
    remove_empty_folders(cache)
    assert [p.name for p in cache.iterdir()] == ["kept"]
    (cache / "kept" / "photo.v2x8.npy").unlink()
    remove_empty_folders(cache)
    assert not cache.exists()


@pytest.mark.parametrize("damage", ["intact", "NaN", "int64", "another width", "one dimension"])
def test_a_damaged_cache_file_is_embedded_again_not_trained_on(lun, photos, models_dir, damage):
    """The cache of head inputs was taken as it was whenever it held as many rows as views:
    NaN trained to NaN weights ('a smaller --learning-rate may help'), another width or
    type failed further on. It is only a speed-up: a damaged file means embed again."""
    from healthyluncher.embedder import Embedder
    from healthyluncher.photos import digest_of
    from healthyluncher.records import load_base

    first = lun.retrain("healthy", [photos["green"][0]])
    (segment,) = (models_dir / segments.FOLDER).glob("*.npy")
    width = np.load(segment).shape[1:]
    store = ModelStore(models_dir)
    digest = digest_of(photos["green"][0].read_bytes())
    thumbnail = store.thumbnail(digest).read_bytes()
    lun.undo()
    # As a retrain that failed after embedding leaves it: the thumbnail and the cache file.
    store.thumbnail(digest).write_bytes(thumbnail)
    base = load_base(store, store.read_state())
    path = Embedder(store, base, first.views)._cache_file(digest)
    rows = np.ones((first.views, *width), np.float32)
    damaged = {
        "intact": rows,
        "NaN": np.full_like(rows, np.nan),
        "int64": rows.astype(np.int64),
        "another width": np.ones((first.views, width[0] + 1), np.float32),
        "one dimension": np.ones(first.views, np.float32),
    }[damage]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, damaged)
    again = lun.retrain("healthy", [photos["green"][0]])
    if damage == "intact":  # the test writes the file a retrain reads
        assert again.cached == 1 and again.embedded == 0
        return
    assert again.cached == 0 and again.embedded == 1
    assert again.photos[0].after == pytest.approx(first.photos[0].after, abs=1e-5)


def test_repair_keeps_a_label_of_yours_spelled_like_one_of_the_bases(run, lun, photos, models_dir):
    """Repair embeds your photos again with the same base when their saved views are
    damaged; it went through what maps your labels onto a *new* base's spellings, so a
    label you added as 'Fast Food' beside the base's 'fast_food' was merged into it:
    status then said 'examples fast_food: 3' and the label 'Fast Food' was gone. The same
    base names the same labels: repair keeps them as they were."""
    assert run("retrain", "--label", "Fast Food", "--new-label", *photos["red"]).code == 0
    before = lun.status()
    assert before.examples_per_label == {"Fast Food": 3}
    (segment,) = (models_dir / segments.FOLDER).glob("*.npy")
    segment.write_bytes(b"not a numpy file")
    repaired = run("repair", "--json")
    assert repaired.code == 0, repaired
    assert repaired.json_lines()[0]["reembedded"] == 3
    after = lun.status()
    assert after.examples_per_label == {"Fast Food": 3}
    assert after.labels == before.labels
