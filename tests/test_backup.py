"""export and import: a round trip restores predictions exactly; hostile archives change nothing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import tarfile
import threading
import warnings
import zipfile as zipfile_module
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import healthyluncher
from healthyluncher import archive as archive_format
from healthyluncher import backup, exporting
from healthyluncher.runtime import training_api
from healthyluncher.store import STATE_FILE, Files, ModelStore
from tests.conftest import (
    TRAINER,
    assert_unwritable,
    needs_ort,
    one_line_error,
    read_only,
    unprivileged,
)
from tests.models import keras_style, pytorch_style

Member = tuple[tarfile.TarInfo, bytes]


def tree(root: Path) -> dict[str, str]:
    """Every path under root with the sha256 of its contents: equal trees are byte-identical."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "directory"
        )
        for path in sorted(root.rglob("*"))
    }


def predict_json(run, *paths: Path) -> str:
    result = run("predict", "--json", *paths)
    assert result.code == 0, result
    return str(result.stdout)


@pytest.fixture
def personalized(run, pt_model, photos) -> None:
    """A personalization with a label the base lacks (the head grew) and six thumbnails."""
    assert run("make-updatable", pt_model).code == 0
    assert (
        run("retrain", "--label", "fast_food", "--epochs", "60", "--save", *photos["red"]).code == 0
    )
    assert (
        run("retrain", "--label", "dessert", "--new-label", "--epochs", "60", *photos["green"]).code
        == 0
    )


@pytest.fixture
def archive(run, personalized, tmp_path) -> Path:
    path = tmp_path / "backup.tar.gz"
    result = run("export", path)
    assert result.code == 0, result
    return path


def members(path: Path) -> list[Member]:
    with tarfile.open(path, "r:gz") as tar:
        found = []
        for info in tar.getmembers():
            source = tar.extractfile(info)
            found.append((info, source.read() if source else b""))
        return found


def pack(path: Path, content: list[Member]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in content:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def regular(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def edited(source: Path, target: Path, edit: Callable[[list[Member]], list[Member]]) -> Path:
    return pack(target, edit(members(source)))


def with_manifest(content: list[Member], change: Callable[[dict[str, object]], None]) -> Member:
    manifest = json.loads(content[0][1])
    change(manifest)
    return regular("manifest.json", json.dumps(manifest).encode())


def with_examples(data: bytes) -> Callable[[list[Member]], list[Member]]:
    """An edit that puts `data` in place of examples.npz, with a manifest that agrees."""
    return with_file("examples.npz", data)


def with_file(
    name: str | Callable[[str], bool], data: bytes
) -> Callable[[list[Member]], list[Member]]:
    """An edit that puts `data` in place of the file `name` (or the first whose name the
    callable accepts), with a manifest that agrees."""

    def edit(content: list[Member]) -> list[Member]:
        names = [info.name for info, _ in content[1:]]
        target = name if isinstance(name, str) else next(n for n in names if name(n))

        def change(manifest: dict[str, object]) -> None:
            files = manifest["files"]
            assert isinstance(files, dict)
            files[target] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

        rest = [
            regular(target, data) if info.name == target else (info, body)
            for info, body in content[1:]
        ]
        return [with_manifest(content, change), *rest]

    return edit


def refused(run, path: Path, models_dir: Path, *fragments: str) -> None:
    """The import fails with one line naming the problem, and nothing changed."""
    before = tree(models_dir)
    one_line_error(run("import", path), *fragments)
    assert tree(models_dir) == before


# -- the round trip ----------------------------------------------------------------------


@pytest.mark.parametrize("factory", [pytorch_style, keras_style], ids=["pytorch", "keras"])
def test_export_reset_import_predicts_byte_identically(run, factory, tmp_path, photos, models_dir):
    assert run("make-updatable", factory(tmp_path / "model.onnx")).code == 0
    red, green = photos["red"], photos["green"]
    base = predict_json(run, *red, *green)
    assert run("retrain", "--label", "fast_food", "--epochs", "30", *red).code == 0
    assert run("retrain", "--label", "dessert", "--new-label", "--epochs", "30", *green).code == 0
    personal = predict_json(run, *red, *green)
    status = run("status", "--json").json_lines()[0]

    exported = run("export", tmp_path / "backup.tar.gz")
    assert exported.code == 0, exported
    assert "6 thumbnail(s)" in exported.stdout and "dessert: 3" in exported.stdout
    assert run("reset", "--purge").code == 0
    assert predict_json(run, *red, *green) == base

    result = run("import", tmp_path / "backup.tar.gz")
    assert result.code == 0, result
    assert "Restored" in result.stdout and "1 undo step(s)" in result.stdout
    assert predict_json(run, *red, *green) == personal
    after = run("status", "--json").json_lines()[0]
    for key in ("labels", "examples_per_label", "last_retrain", "retrains", "hyperparameters"):
        assert after[key] == status[key], key
    assert len(list((models_dir / Files.THUMBNAILS).iterdir())) == 6

    # The ORT checkpoint holds the restored weights, so training can go on from them.
    store = ModelStore(models_dir)
    folder = store.personal_dir()
    if TRAINER == "onnxruntime":
        check_checkpoint(folder)

    # A retrain goes on from the restored examples, and undo goes back before the import.
    assert run("retrain", "--label", "healthy", "--epochs", "2", red[0]).code == 0
    counts = run("status", "--json").json_lines()[0]["examples_per_label"]
    assert counts == {"fast_food": 2, "dessert": 3, "healthy": 1}
    assert run("undo").code == 0 and run("undo").code == 0
    assert predict_json(run, *red, *green) == base


def check_checkpoint(folder: Path | None) -> None:
    assert folder is not None and (folder / Files.ARTIFACTS).is_dir()  # the grown head's
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(folder / Files.CHECKPOINT))
    artifacts = folder / Files.ARTIFACTS
    module = api.Module(
        str(artifacts / "training_model.onnx"), state, str(artifacts / "eval_model.onnx")
    )
    with np.load(folder / Files.WEIGHTS) as weights:
        restored = {name: np.array(p.data) for name, p in state.parameters}
        assert set(restored) == set(weights.files)
        for name in weights.files:
            np.testing.assert_array_equal(restored[name], weights[name])
    del module


def test_import_over_another_personalization_can_be_undone(run, archive, photos):
    everything = [*photos["red"], *photos["green"]]
    exported = predict_json(run, *everything)
    assert run("retrain", "--label", "healthy", "--epochs", "60", *photos["red"]).code == 0
    later = predict_json(run, *everything)
    assert later != exported

    assert run("import", archive).code == 0
    assert predict_json(run, *everything) == exported
    assert run("undo").code == 0
    assert predict_json(run, *everything) == later


def test_importing_the_personalization_in_use_changes_nothing(run, archive, photos, models_dir):
    """A backup of the very personalization in use (imported twice, or right after export)
    is no change: it adds no undo step, which would push a real one out of the history."""
    everything = [*photos["red"], *photos["green"]]
    exported = predict_json(run, *everything)
    steps = run("status", "--json").json_lines()[0]["undo_steps"]
    before = tree(models_dir)
    for _ in range(2):
        result = run("import", archive)
        assert result.code == 0, result
        assert result.stdout.startswith("Nothing changed (no new undo step)"), result.stdout
        assert "replaced" not in result.stdout
    form = run("import", archive, "--json").json_lines()[0]
    assert form["changed"] is False and form["replaced"] == {} and form["undo_steps"] == steps
    assert tree(models_dir) == before
    assert predict_json(run, *everything) == exported
    assert run("status", "--json").json_lines()[0]["undo_steps"] == steps
    assert run("undo").code == 0 and "Back to the base" in run("undo").stdout
    # Over another personalization it is a change, as before.
    assert run("import", archive, "--json").json_lines()[0]["changed"] is True


def test_the_archive_describes_itself(run, archive, models_dir):
    content = members(archive)
    names = [info.name for info, _ in content]
    assert names[:4] == ["manifest.json", "meta.json", "weights.npz", "examples.npz"]
    assert len(names) == 10 and all(n.startswith("thumbnails/") for n in names[4:])
    assert all(info.isreg() and info.mode == 0o644 for info, _ in content)
    manifest = json.loads(content[0][1])
    status = run("status", "--json").json_lines()[0]
    assert manifest["kind"] == "healthyluncher-backup" and manifest["format"] == 1
    assert manifest["base"]["sha256"] == status["base_sha256"]
    assert manifest["labels"] == ["healthy", "fast_food", "dessert"]
    assert manifest["hyperparameters"]["epochs"] == 60
    assert manifest["examples_per_label"] == {"fast_food": 3, "dessert": 3}
    for info, data in content[1:]:
        entry = manifest["files"][info.name]
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    # Thumbnails are kept at the model's resize short side, so they can be embedded again.
    from PIL import Image

    with Image.open(io.BytesIO(content[4][1])) as image:
        assert image.format == "JPEG" and min(image.size) == 18
    # Written atomically, and readable by its owner only: the thumbnails are their photos.
    assert archive.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in archive.parent.glob("*backup*")) == ["backup.tar.gz"]


def test_export_without_personalization_is_refused(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    one_line_error(run("export", tmp_path / "b.tar.gz"), "nothing to export", "retrain")
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.mark.parametrize("damage", ["NaN", "missing"])
def test_damaged_personal_weights_are_neither_exported_nor_renamed_into_a_model(
    run, personalized, photos, models_dir, tmp_path, damage
):
    """weights.npz is read by export and by a rename, which publishes it as the model: a
    NaN there became a model that predicted null, a missing one a backup import refused."""
    path = ModelStore(models_dir).personal_dir() / Files.WEIGHTS  # type: ignore[operator]
    with np.load(path) as data:
        weights = {name: data[name] for name in data.files}
    if damage == "NaN":
        weights["fc.weight"] = weights["fc.weight"] * np.nan
    else:
        del weights["fc.bias"]
    np.savez(path, **weights)
    one_line_error(run("export", tmp_path / "b.tar.gz"), str(path), "damaged", "undo")
    assert not (tmp_path / "b.tar.gz").exists()
    if damage == "NaN":
        one_line_error(run("labels", "rename", "dessert", "sweets"), "damaged", "undo")
    predicted = run("predict", "--json", photos["red"][0]).json_lines()[0]
    assert predicted["probability"] is not None
    assert run("undo").code == 0
    assert run("export", tmp_path / "b.tar.gz").code == 0


def test_export_into_a_missing_directory(run, personalized, tmp_path):
    one_line_error(run("export", tmp_path / "nope" / "b.tar.gz"), "cannot write")


def test_export_keeps_a_dangling_link_without_force(run, personalized, tmp_path):
    """A link whose file is gone (a backup on an unmounted disk) was replaced unasked:
    os.path.exists is False for it."""
    link = tmp_path / "b.tar.gz"
    link.symlink_to(tmp_path / "unmounted" / "b.tar.gz")
    one_line_error(run("export", link), "already exists", "--force")
    assert link.is_symlink()
    assert run("export", link, "--force").code == 0
    assert link.is_file() and not link.is_symlink()


@pytest.mark.parametrize("where", ["export examples", "export scratch", "import scratch"])
def test_a_full_or_read_only_scratch_directory_is_one_line(
    run, archive, tmp_path, models_dir, where
):
    """Import unpacks in a scratch directory of the models directory, export packs in one
    beside the archive: a full disk there (or a read-only one) was 'unexpected OSError:
    [Errno 28]'."""
    before = tree(models_dir)
    mkdir = Path.mkdir
    target = tmp_path / "b.tar.gz"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def scratch_full(path: Path, *args: object, **kwargs: object) -> None:
        if path.name.startswith((".scratch-", exporting.SCRATCH_PREFIX)):
            raise OSError(errno.EROFS, "Read-only file system")
        mkdir(path, *args, **kwargs)

    command = ["import", archive] if where == "import scratch" else ["export", target]
    says = [f"cannot write to {models_dir}", "not changed"]
    with pytest.MonkeyPatch.context() as patch:
        if where == "export examples":
            patch.setattr(exporting, "save_examples", full)
            says = [f"cannot write {target}", "No space left"]
        elif where == "export scratch":
            patch.setattr(Path, "mkdir", scratch_full)
            says = [f"cannot write {target}", "Read-only file system"]
        else:
            patch.setattr(Path, "mkdir", scratch_full)
        one_line_error(run(*command), *says)
    assert tree(models_dir) == before
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
    assert not target.exists()
    assert run(*command).code == 0


def test_export_and_import_have_help(run):
    for command in ("export", "import"):
        assert "Example: luncher" in run(command, "-h").stdout
    assert "--rebuild" in run("import", "-h").stdout


# -- another base ------------------------------------------------------------------------


def test_a_backup_of_another_base_needs_rebuild(run, archive, tmp_path, photos, models_dir):
    new_base = pytorch_style(tmp_path / "new_base.onnx", seed=7)
    assert run("make-updatable", new_base, "--force").code == 0  # personalization set aside
    assert run("reset", "--purge").code == 0  # and gone, with the photos' thumbnails
    assert not list((models_dir / Files.THUMBNAILS).glob("*.jpg"))

    refused(run, archive, models_dir, "another base model", "--rebuild")
    with pytest.raises(healthyluncher.LuncherError, match=r"; use rebuild=True to embed"):
        healthyluncher.open().import_backup(archive)

    result = run("import", archive, "--rebuild")
    assert result.code == 0, result
    assert "Embedded your photos" in result.stdout
    status = run("status", "--json").json_lines()[0]
    assert status["base_name"] == "new_base"
    assert status["labels"] == ["healthy", "fast_food", "dessert"]
    assert status["examples_per_label"] == {"fast_food": 3, "dessert": 3}
    assert status["hyperparameters"]["epochs"] == 60  # the backup's settings
    rows = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3 + ["dessert"] * 3
    assert len(list((models_dir / Files.THUMBNAILS).iterdir())) == 6
    assert "Back to the base" in run("undo").stdout


@needs_ort
def test_the_same_model_set_up_differently_needs_rebuild(run, archive, pt_model, models_dir):
    assert run("make-updatable", pt_model, "--trainable-layers", "2", "--force").code == 0
    refused(run, archive, models_dir, "set up differently", "--rebuild")
    result = run("import", archive, "--rebuild")
    assert result.code == 0, result
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"fast_food": 3, "dessert": 3}


def test_rebuild_with_the_same_base_restores_exactly(run, archive, photos):
    everything = [*photos["red"], *photos["green"]]
    exported = predict_json(run, *everything)
    assert run("reset", "--purge").code == 0
    result = run("import", archive, "--rebuild")
    assert result.code == 0 and "Restored" in result.stdout
    assert predict_json(run, *everything) == exported


# -- a crash -----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["interrupt", "disk full", "thumbnails"])
def test_a_crash_during_import_leaves_the_old_state(
    run, archive, photos, models_dir, monkeypatch, failure
):
    everything = [*photos["red"], *photos["green"]]
    exported = predict_json(run, *everything)
    assert run("reset", "--purge").code == 0
    base = predict_json(run, *everything)
    before = tree(models_dir)
    state = (models_dir / STATE_FILE).read_bytes()

    import healthyluncher.personal as personal_module

    def crash(examples: object, target: Path) -> None:
        target.write_bytes(b"half an examples file")
        if failure == "interrupt":
            raise KeyboardInterrupt  # Ctrl-C while the personal directory is staged
        raise OSError(errno.ENOSPC, "No space left on device")

    written: list[Path] = []

    def full_after_two(path: Path, data: bytes) -> None:
        if len(written) == 2:  # the personal directory is published, thumbnails half done
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(data)
        written.append(path)

    with monkeypatch.context() as patch:
        if failure == "thumbnails":
            patch.setattr(backup, "atomic_write_bytes", full_after_two)
        else:
            patch.setattr(personal_module, "save_examples", crash)
        result = run("import", archive)
    if failure == "interrupt":
        assert result.code == 130 and "not changed" in result.stderr
    else:
        one_line_error(result, "No space left on device", "not changed")
    assert (models_dir / STATE_FILE).read_bytes() == state
    assert tree(models_dir) == before
    assert predict_json(run, *everything) == base

    assert run("import", archive).code == 0
    assert predict_json(run, *everything) == exported


# -- hostile and damaged archives --------------------------------------------------------


def test_path_traversal_is_refused(run, archive, tmp_path, models_dir):
    hostile = edited(
        archive, tmp_path / "h.tar.gz", lambda m: [m[0], regular("../escaped.txt", b"x"), *m[1:]]
    )
    refused(run, hostile, models_dir, "'../escaped.txt'", "climbs out")
    assert not (tmp_path / "escaped.txt").exists()


def test_traversal_inside_an_allowed_folder_is_refused(run, archive, tmp_path, models_dir):
    name = "thumbnails/../../" + "a" * 64 + ".jpg"
    hostile = edited(archive, tmp_path / "h.tar.gz", lambda m: [m[0], regular(name, b"x"), *m[1:]])
    refused(run, hostile, models_dir, "climbs out")


def test_an_absolute_path_is_refused(run, archive, tmp_path, models_dir):
    target = tmp_path / "absolute.txt"
    hostile = edited(
        archive, tmp_path / "h.tar.gz", lambda m: [m[0], regular(str(target), b"x"), *m[1:]]
    )
    refused(run, hostile, models_dir, "absolute path")
    assert not target.exists()


def test_a_symlink_out_of_the_directory_is_refused(run, archive, tmp_path, models_dir):
    link = tarfile.TarInfo("thumbnails/" + "b" * 64 + ".jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../../../etc/passwd"
    hostile = edited(archive, tmp_path / "h.tar.gz", lambda m: [m[0], (link, b""), *m[1:]])
    refused(run, hostile, models_dir, "symbolic link", "/etc/passwd")


def test_a_hardlink_is_refused(run, archive, tmp_path, models_dir):
    def edit(content: list[Member]) -> list[Member]:
        link = tarfile.TarInfo("weights.npz")
        link.type = tarfile.LNKTYPE
        link.linkname = "meta.json"
        return [item if item[0].name != "weights.npz" else (link, b"") for item in content]

    refused(run, edited(archive, tmp_path / "h.tar.gz", edit), models_dir, "hard link")


@pytest.mark.parametrize(
    ("kind", "named"), [(tarfile.CHRTYPE, "a device"), (tarfile.FIFOTYPE, "a named pipe")]
)
def test_a_device_is_refused(run, archive, tmp_path, models_dir, kind, named):
    """A named pipe is named as one (it was called 'a device', as tarfile's isdev says)."""
    device = tarfile.TarInfo("examples.npz")
    device.type = kind
    device.devmajor, device.devminor = 1, 3
    hostile = edited(archive, tmp_path / "h.tar.gz", lambda m: [m[0], (device, b""), *m[1:]])
    refused(run, hostile, models_dir, named)


def test_an_unexpected_file_is_refused(run, archive, tmp_path, models_dir):
    hostile = edited(
        archive, tmp_path / "h.tar.gz", lambda m: [*m, regular("run-me.sh", b"rm -rf ~\n")]
    )
    refused(run, hostile, models_dir, "'run-me.sh'", "not a file a luncher backup holds")


@pytest.mark.parametrize("limit", ["MAX_MEMBER_BYTES", "MAX_TOTAL_BYTES"])
def test_a_gzip_bomb_is_refused(run, archive, tmp_path, models_dir, monkeypatch, limit):
    monkeypatch.setattr(archive_format, limit, 2**20)
    zeros = regular("examples.npz", bytes(8 * 2**20))  # 8 MiB that compress to a few KiB

    def edit(content: list[Member]) -> list[Member]:
        return [zeros if info.name == "examples.npz" else (info, d) for info, d in content]

    hostile = edited(archive, tmp_path / "bomb.tar.gz", edit)
    assert hostile.stat().st_size < 2**20
    refused(run, hostile, models_dir, "1.0 MiB", "decompression bomb")


@pytest.mark.parametrize("position", [0, 1], ids=["first", "later"])
def test_a_huge_tar_header_is_stopped_while_reading(run, archive, tmp_path, models_dir, position):
    # tarfile reads a pax header whole into memory: the bounded reader must stop it early,
    # also for the first header, which tarfile.open reads by itself.
    def edit(content: list[Member]) -> list[Member]:
        content[position][0].pax_headers = {"comment": "x" * (4 * 2**20)}
        return content

    refused(run, edited(archive, tmp_path / "h.tar.gz", edit), models_dir, "oversized tar header")


def test_too_many_files_are_refused(run, archive, models_dir, monkeypatch):
    monkeypatch.setattr(archive_format, "MAX_MEMBERS", 5)
    refused(run, archive, models_dir, "more than 5 files")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("truncated", "truncated or corrupt"),
        ("garbled", ""),
        ("not gzip", "not a luncher backup"),
        ("empty", "not a luncher backup"),
    ],
)
def test_a_truncated_or_corrupt_archive_is_refused(
    run, archive, tmp_path, models_dir, damage, fragment
):
    data = archive.read_bytes()
    damaged = tmp_path / "damaged.tar.gz"
    if damage == "truncated":
        damaged.write_bytes(data[: len(data) // 2])
    elif damage == "garbled":
        middle = len(data) // 2
        damaged.write_bytes(data[:middle] + bytes(range(256)) * 4 + data[middle + 1024 :])
    elif damage == "not gzip":
        damaged.write_bytes(b"PK\x03\x04 a zip file, say" + data)
    else:
        damaged.write_bytes(b"")
    refused(run, damaged, models_dir, fragment)


def test_a_missing_archive(run, tmp_path, models_dir, personalized):
    refused(run, tmp_path / "nope.tar.gz", models_dir, "no such file")


def test_a_checksum_mismatch_is_refused(run, archive, tmp_path, models_dir):
    def edit(content: list[Member]) -> list[Member]:
        result = []
        for info, data in content:
            if info.name == "weights.npz":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])  # one flipped byte, same size
            result.append((info, data))
        return result

    hostile = edited(archive, tmp_path / "h.tar.gz", edit)
    refused(run, hostile, models_dir, "weights.npz does not match its checksum")


def test_a_missing_file_is_refused(run, archive, tmp_path, models_dir):
    hostile = edited(
        archive, tmp_path / "h.tar.gz", lambda m: [x for x in m if x[0].name != "examples.npz"]
    )
    refused(run, hostile, models_dir, "incomplete", "examples.npz")


def test_an_unknown_format_version_is_refused(run, archive, tmp_path, models_dir):
    def edit(content: list[Member]) -> list[Member]:
        return [with_manifest(content, lambda m: m.update(format=99)), *content[1:]]

    hostile = edited(archive, tmp_path / "h.tar.gz", edit)
    refused(run, hostile, models_dir, "unknown backup format 99", "newer luncher")


def test_an_archive_without_a_leading_manifest_is_refused(run, archive, tmp_path, models_dir):
    hostile = edited(archive, tmp_path / "h.tar.gz", lambda m: [*m[1:], m[0]])
    refused(run, hostile, models_dir, "manifest.json is not its first file")


def test_a_compressed_array_bomb_inside_the_npz_is_refused(run, archive, tmp_path, models_dir):
    """A consistent manifest proves no good intent: examples.npz may itself be a bomb."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, inputs=np.zeros((4096, 8), np.float32), owner=np.zeros(4096, np.int64)
    )
    hostile = edited(archive, tmp_path / "h.tar.gz", with_examples(buffer.getvalue()))
    refused(run, hostile, models_dir, "examples.npz holds a compressed array")


def test_head_inputs_too_large_to_train_on_are_refused(run, archive, tmp_path, models_dir):
    """Finite but huge (1e30) views were imported, and then every retrain ended in NaN
    with advice to lower the learning rate."""
    with tarfile.open(archive, "r:gz") as tar:
        source = tar.extractfile("examples.npz")
        assert source is not None
        with np.load(io.BytesIO(source.read())) as data:
            arrays = {name: data[name] for name in data.files}
    arrays["inputs"] = (arrays["inputs"] * np.float32(1e30)).astype(np.float32)
    assert np.isfinite(arrays["inputs"]).all()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    hostile = edited(archive, tmp_path / "h.tar.gz", with_examples(buffer.getvalue()))
    refused(run, hostile, models_dir, "examples.npz is damaged")


def test_an_archive_of_an_index_into_segments_is_refused(run, archive, tmp_path, models_dir):
    """A backup's examples.npz must hold its views: an index that names segments of the
    models directory (which another machine does not have, and which an archive must not
    reach) is refused, whatever it names."""
    existing = sorted((models_dir / "examples").glob("*.npy"))[0].name  # this machine's
    buffer = io.BytesIO()
    np.savez(
        buffer,
        owner=np.zeros(1, np.int64),
        digests=np.array(["0" * 64]),
        labels=np.array(["healthy"]),
        origin=np.zeros((1, 2), np.int64),
        segments=np.array([existing]),
    )
    hostile = edited(archive, tmp_path / "h.tar.gz", with_examples(buffer.getvalue()))
    refused(run, hostile, models_dir, "examples.npz")


def test_export_never_imports_onnx(personalized, models_dir, tmp_path):
    """backup.py imported onnx at the top for the import's checks: every export paid for
    it (0.3 to 0.9 s of a 5,000-photo export that takes 3 to 4 s)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, healthyluncher\n"
        f"healthyluncher.open({str(models_dir)!r}).export_backup({str(tmp_path / 'b.tar.gz')!r})\n"
        "print('onnx' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _jpeg(size: tuple[int, int] = (16, 12)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 30)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header declares another size (a decompression bomb)."""
    data = bytearray(_jpeg())
    at = data.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), height, width
    data[at : at + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(
    ("thumbnail", "says"),
    [
        (b"\xff\xd8\xff" + b"not the rest of a JPEG" * 8, "cannot decode image"),
        (_jpeg()[:-40], "cannot decode image"),  # truncated
        (_declaring(20_000, 20_000), "too large"),
    ],
    ids=["garbage", "truncated", "too large"],
)
def test_a_thumbnail_that_does_not_decode_is_refused(
    run, archive, tmp_path, models_dir, photos, thumbnail, says
):
    """A same-base import checked a thumbnail's first three bytes only: one that does not
    decode was installed, and `repair` could not embed that photo again when it needed to."""
    is_thumbnail = lambda name: name.startswith("thumbnails/")  # noqa: E731
    hostile = edited(archive, tmp_path / "h.tar.gz", with_file(is_thumbnail, thumbnail))
    refused(run, hostile, models_dir, "thumbnails/", says, "nothing was imported")
    assert run("import", "--rebuild", hostile).code == 1
    # The same archive with a thumbnail that decodes is imported.
    fine = edited(archive, tmp_path / "fine.tar.gz", with_file(is_thumbnail, _jpeg()))
    assert run("import", fine).code == 0


def test_a_thumbnail_larger_than_a_photo_is_refused_while_unpacking(
    run, archive, models_dir, monkeypatch
):
    """Any member could unpack to 2 GiB; a thumbnail stops at the size of a photo."""
    monkeypatch.setattr(archive_format, "MAX_THUMBNAIL_BYTES", 100)
    refused(run, archive, models_dir, "thumbnails/", "more than the 0.0 MiB allowed")


@pytest.mark.parametrize("lock_file", [True, False], ids=["lock file", "no lock file"])
def test_export_reads_a_read_only_models_directory(
    run, personalized, models_dir, tmp_path, photos, lock_file
):
    """export opened the writers' lock file for writing and packed in a scratch directory
    of the models directory, so it failed on a copy mounted read-only or a folder the user
    cannot write. It writes nothing there now; predict, status and the lists never did."""
    if not lock_file:  # a copy made without hidden files: no lock to take, none made
        (models_dir / ".lock").unlink()
    expected = predict_json(run, *photos["red"], *photos["green"])
    before = tree(models_dir)
    out = tmp_path / "out"
    out.mkdir()
    with read_only(models_dir):
        assert_unwritable(models_dir)
        done = unprivileged("export", out / "b.tar.gz")
        assert done.returncode == 0 and done.stdout.startswith("Wrote "), done
        for command in (["predict", photos["red"][0]], ["status"], ["examples"], ["labels"]):
            done = unprivileged(*command)
            assert done.returncode == 0 and done.stderr == "", done
        done = unprivileged("retrain", "--label", "healthy", photos["red"][0])
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done
        assert f"cannot change {models_dir}: Permission denied; nothing was changed" in done.stderr
        assert "Traceback" not in done.stderr
    assert tree(models_dir) == before
    assert [path.name for path in out.iterdir()] == ["b.tar.gz"]  # no scratch left behind
    assert run("reset", "--purge").code == 0
    assert run("import", out / "b.tar.gz").code == 0
    assert predict_json(run, *photos["red"], *photos["green"]) == expected


@contextlib.contextmanager
def held_elsewhere(lock: Callable[[], contextlib.AbstractContextManager[None]]) -> Iterator[None]:
    """`lock()` held by another thread while the block runs, as another process holds it."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock():
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(30)
        yield
    finally:
        release.set()
        holder.join(30)


def test_export_and_writers_keep_each_other_out_but_exports_share(
    run, personalized, models_dir, tmp_path, photos, monkeypatch
):
    """export reads under a shared lock: it waits for a writer, a writer waits for it, and
    two exports read at once."""
    from healthyluncher import store as store_module

    monkeypatch.setattr(store_module, "LOCK_TIMEOUT", 0.2)
    store = ModelStore(models_dir)
    with held_elsewhere(store.lock):  # another holder: not this thread, whose own is refused
        one_line_error(run("export", tmp_path / "a.tar.gz"), "another luncher process")
    with held_elsewhere(store.read_lock):
        assert run("export", tmp_path / "b.tar.gz").code == 0
        busy = run("retrain", "--label", "healthy", photos["red"][0])
        one_line_error(busy, "another luncher process is changing")
    assert not (tmp_path / "a.tar.gz").exists() and (tmp_path / "b.tar.gz").is_file()


def test_weights_too_large_to_score_with_are_refused(run, archive, tmp_path, models_dir):
    """Finite but huge weights (3e38) were imported: `predict` then said 0.333 for every
    label, until the next retrain or undo."""
    with tarfile.open(archive, "r:gz") as tar:
        source = tar.extractfile("weights.npz")
        assert source is not None
        with np.load(io.BytesIO(source.read())) as data:
            arrays = {name: data[name] for name in data.files}
    arrays = {name: np.full_like(value, np.float32(3e38)) for name, value in arrays.items()}
    assert all(np.isfinite(value).all() for value in arrays.values())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    hostile = edited(archive, tmp_path / "h.tar.gz", with_file("weights.npz", buffer.getvalue()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's about the overflow stays in the library
        refused(run, hostile, models_dir, "weights")


def _examples_of(archive: Path) -> dict[str, np.ndarray]:
    with tarfile.open(archive, "r:gz") as tar:
        source = tar.extractfile("examples.npz")
        assert source is not None
        with np.load(io.BytesIO(source.read())) as data:
            return {name: data[name] for name in data.files}


@pytest.mark.parametrize("dtype", [np.complex64, np.int8], ids=["complex", "int8"])
def test_head_inputs_that_are_not_floating_point_are_refused(
    run, archive, tmp_path, models_dir, dtype
):
    """Complex head inputs were imported with their imaginary part dropped, and numpy's
    ComplexWarning printed in the middle of the output; integers were imported as if
    they were features."""
    arrays = _examples_of(archive)
    arrays["inputs"] = arrays["inputs"].astype(dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    hostile = edited(archive, tmp_path / "h.tar.gz", with_examples(buffer.getvalue()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused(run, hostile, models_dir, "examples.npz is damaged")


@pytest.mark.parametrize("which", ["manifest.json", "meta.json"])
def test_json_nested_too_deeply_is_refused_in_one_line(run, archive, tmp_path, models_dir, which):
    """100,000 nested brackets gave 'unexpected RecursionError' from the JSON decoder."""
    deep = b"[" * 100_000 + b"]" * 100_000
    if which == "manifest.json":
        hostile = edited(archive, tmp_path / "h.tar.gz", lambda m: [regular(which, deep), *m[1:]])
    else:
        hostile = edited(archive, tmp_path / "h.tar.gz", with_file(which, deep))
    refused(run, hostile, models_dir, which, "damaged", "nested too deeply")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainable_params", 5),
        ("labels", 7),
        ("labels", [["healthy"]]),
        ("split_tensor", {"a": 1}),
        ("preprocessing", "imagenet"),
        ("name", ["x"]),
    ],
)
def test_a_base_description_of_the_wrong_type_is_refused(
    run, archive, tmp_path, models_dir, key, value
):
    """A manifest whose base had trainable_params 5 gave 'unexpected TypeError: 'int'
    object is not iterable'."""

    def edit(content: list[Member]) -> list[Member]:
        return [with_manifest(content, lambda m: m["base"].update({key: value})), *content[1:]]

    hostile = edited(archive, tmp_path / "h.tar.gz", edit)
    refused(run, hostile, models_dir, "manifest.json", "base", key)


@pytest.mark.parametrize("kind", ["fifo", "pipe", "device"])
def test_an_archive_that_is_not_a_regular_file_is_refused_without_waiting(
    archive, tmp_path, models_dir, kind
):
    """A named pipe with no writer made `luncher import` wait forever (in open), and a pipe
    (`import <(cat backup.tar.gz)`) was called 'cannot write to the models directory: File
    or stream is not seekable'."""
    import os
    import subprocess
    import sys

    before = tree(models_dir)
    if kind == "fifo":
        path = tmp_path / "backup.fifo"
        os.mkfifo(path)
        command = [sys.executable, "-m", "healthyluncher", "import", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    elif kind == "pipe":
        feed = subprocess.Popen(["cat", str(archive)], stdout=subprocess.PIPE)
        assert feed.stdout is not None
        number = feed.stdout.fileno()
        command = [sys.executable, "-m", "healthyluncher", "import", f"/dev/fd/{number}"]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False, pass_fds=[number]
        )
        feed.stdout.close()
        feed.wait()
    else:
        command = [sys.executable, "-m", "healthyluncher", "import", "/dev/zero"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done
    assert "not a regular file, not a backup" in lines[0], lines
    assert tree(models_dir) == before


def test_two_labels_that_differ_only_in_unicode_form_are_refused(
    run, archive, tmp_path, models_dir
):
    """A composed 'café' and 'cafe' with a combining accent are one label everywhere
    (`retrain --label`, `labels rename`), but meta.json's check compared the text: an
    archive with both was imported, and the second could be neither named nor removed."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"

    def edit(content: list[Member]) -> list[Member]:
        files = {info.name: data for info, data in content}
        meta = json.loads(files["meta.json"])
        meta["labels"] = [*meta["labels"][:-1], composed, decomposed]
        meta["examples_per_label"] = {composed: 1, decomposed: 1}
        arrays = _examples_of(archive)
        arrays["labels"] = np.array(
            [composed if i % 2 else decomposed for i in range(len(arrays["labels"]))]
        )
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with np.load(io.BytesIO(files["weights.npz"])) as data:  # a row for the fourth
            weights = {name: np.concatenate([data[name], data[name][-1:]]) for name in data}
        grown = io.BytesIO()
        np.savez(grown, **weights)
        content = with_file("meta.json", json.dumps(meta).encode())(content)
        content = with_file("weights.npz", grown.getvalue())(content)
        return with_examples(buffer.getvalue())(content)

    hostile = edited(archive, tmp_path / "h.tar.gz", edit)
    refused(run, hostile, models_dir, "meta.json is damaged", "unique")


@pytest.mark.parametrize("hostile", ["fifo", "deep manifest", "base of the wrong type"])
def test_the_api_refuses_hostile_archives_with_its_own_error(
    archive, tmp_path, models_dir, hostile
):
    """`Luncher.import_backup` raised RecursionError and TypeError, and waited forever on a
    named pipe, where the command line now says one line: the API raises LuncherError."""
    import os

    if hostile == "fifo":
        path = tmp_path / "backup.fifo"
        os.mkfifo(path)
    elif hostile == "deep manifest":
        deep = regular("manifest.json", b"[" * 100_000 + b"]" * 100_000)
        path = edited(archive, tmp_path / "h.tar.gz", lambda m: [deep, *m[1:]])
    else:

        def edit(content: list[Member]) -> list[Member]:
            change = lambda m: m["base"].update(trainable_params=5)  # noqa: E731
            return [with_manifest(content, change), *content[1:]]

        path = edited(archive, tmp_path / "h.tar.gz", edit)
    before = tree(models_dir)
    with pytest.raises(healthyluncher.LuncherError, match="nothing was imported|not a backup"):
        healthyluncher.open(str(models_dir)).import_backup(path)
    assert tree(models_dir) == before


def _overlapping_entries(npz: bytes, extra: int) -> bytes:
    """The .npz with `extra` more central-directory entries, each naming its first file
    again: a few bytes each, and a few KiB once gzip has them."""
    import struct

    end = npz.rindex(b"PK\x05\x06")
    (start,) = struct.unpack("<I", npz[end + 16 : end + 20])
    directory = npz[start:end]
    first = zipfile_module.ZipFile(io.BytesIO(npz)).infolist()[0]
    one = directory[: 46 + len(first.filename.encode()) + len(first.extra) + len(first.comment)]
    count = min(len(zipfile_module.ZipFile(io.BytesIO(npz)).infolist()) + extra, 0xFFFF)
    directory += one * extra
    record = struct.pack("<HHHHIIH", 0, 0, count, count, len(directory), start, 0)
    return npz[:start] + directory + b"PK\x05\x06" + record


def test_an_npz_whose_directory_repeats_an_entry_is_refused_before_it_is_read(
    run, archive, tmp_path, models_dir
):
    """An examples.npz whose zip directory named its first array 200,000 times more came
    from a 38 KB archive, cost 22 s and 200 MB (zipfile reads the directory whole, and each
    entry was checked), and was imported; the 2 GiB a member may hold makes that hours and
    tens of GB. The directory's size is now checked from its end record first."""
    arrays = _examples_of(archive)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    hostile_npz = _overlapping_entries(buffer.getvalue(), 5000)
    hostile = edited(archive, tmp_path / "h.tar.gz", with_examples(hostile_npz))
    refused(run, hostile, models_dir, "examples.npz", "more entries")


@needs_ort
def test_an_import_onto_damaged_training_files_is_one_line(
    run, pt_model, photos, tmp_path, models_dir
):
    """Restoring weights writes ONNX Runtime's checkpoint of them from the base's training
    files; damaged, it was 'unexpected RuntimeError' with ORT's C++ text."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    path = tmp_path / "backup.tar.gz"
    assert run("export", path).code == 0
    assert run("reset").code == 0  # so that the import restores (the backup is not in use)
    (checkpoint,) = models_dir.glob(f"base-*/{Files.ARTIFACTS}/checkpoint")
    checkpoint.write_bytes(b"not a checkpoint")
    before = tree(models_dir)

    result = run("import", path)

    one_line_error(result, "is damaged (ONNX Runtime cannot load its training files)")
    assert "make-updatable" in result.stderr
    assert tree(models_dir) == before


@pytest.mark.parametrize("damage", ["segment", "thumbnail", "weights"])
def test_importing_the_backup_in_use_mends_what_is_damaged(
    run, archive, photos, models_dir, damage
):
    """Importing your backup is how you mend a damaged personalization; telling whether
    the backup is the one in use read the current copy first, so a damaged example segment
    stopped the import ('error: a segment in ... cannot be read (not a numpy file); run
    `luncher repair` ...', exit 1), as did damaged weights; and with a thumbnail gone, the
    import said 'Nothing changed' and left it gone. A damaged or incomplete copy is not
    the backup: the import restores it, as before."""
    everything = [*photos["red"], *photos["green"]]
    exported = predict_json(run, *everything)
    if damage == "segment":
        next((models_dir / "examples").glob("*.npy")).write_bytes(b"junk")
    elif damage == "weights":
        current = json.loads((models_dir / STATE_FILE).read_text())["personal"]
        (models_dir / current / Files.WEIGHTS).write_bytes(b"junk")
    else:
        next((models_dir / "thumbnails").glob("*.jpg")).unlink()
    result = run("import", archive)
    assert result.code == 0, result
    assert "Nothing changed" not in result.stdout
    assert predict_json(run, *everything) == exported
    assert len(list((models_dir / "thumbnails").glob("*.jpg"))) == 6
    repaired = run("repair", "--json")
    assert repaired.code == 0 and repaired.json_lines()[0]["reembedded"] == 0, repaired
