"""A new base keeps the personalization: thumbnails are embedded again and the head retrained."""

from __future__ import annotations

import json
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from healthyluncher.store import STATE_FILE
from tests.conftest import needs_ort, one_line_error
from tests.models import keras_style, pytorch_style
from tests.test_cli import probabilities
from tests.test_conventions import luncher
from tests.test_shell_use import _stopped


def test_upgrade_keeps_the_users_labels(run, pt_model, tmp_path, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    red, green = photos["red"], photos["green"]
    assert run("retrain", "--label", "fast_food", "--epochs", "60", *red).code == 0
    assert run("retrain", "--label", "dessert", "--new-label", "--epochs", "60", *green).code == 0
    new_base = pytorch_style(tmp_path / "new_base.onnx", seed=7)

    one_line_error(run("make-updatable", new_base), "--keep-personalization")
    result = run("make-updatable", new_base, "--keep-personalization")
    assert result.code == 0, result
    assert "carried over" in result.stdout and "dessert: 3" in result.stdout

    status = run("status", "--json").json_lines()[0]
    assert status["base_name"] == "new_base"
    assert status["labels"] == ["healthy", "fast_food", "dessert"]
    assert status["examples_per_label"] == {"fast_food": 3, "dessert": 3}
    rows = run("predict", "--json", *red, *green).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3 + ["dessert"] * 3


@needs_ort
def test_upgrade_to_an_nhwc_base_with_another_cut(run, pt_model, tmp_path, photos):
    assert run("make-updatable", pt_model, "--trainable-layers", "2").code == 0
    assert run("retrain", "--label", "fast_food", "--epochs", "60", *photos["red"]).code == 0
    new_base = keras_style(tmp_path / "keras_base.onnx")
    assert run("make-updatable", new_base, "--keep-personalization").code == 0
    rows = run("predict", "--json", *photos["red"]).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3


def test_drop_personalization_flag_replaces_without_force(run, pt_model, tmp_path, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    result = run("make-updatable", keras_style(tmp_path / "k.onnx"), "--drop-personalization")
    assert result.code == 0 and "one `luncher undo` away" in result.stdout
    assert run("status", "--json").json_lines()[0]["predicting_with"] == "base"


def test_a_crash_during_upgrade_leaves_the_old_state_working(
    run, pt_model, tmp_path, photos, models_dir, monkeypatch
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", "--epochs", "60", *photos["red"]).code == 0
    before = probabilities(run, *photos["red"], *photos["green"])
    state = (models_dir / STATE_FILE).read_bytes()

    import healthyluncher.personal as training

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed while the head trains on the new base

    new_base = pytorch_style(tmp_path / "new_base.onnx", seed=3)
    with monkeypatch.context() as patch:
        patch.setattr(training, "fit", crash)
        result = run("make-updatable", new_base, "--keep-personalization")
    assert result.code == 130
    assert (models_dir / STATE_FILE).read_bytes() == state
    assert probabilities(run, *photos["red"], *photos["green"]) == before
    # The next writer cleans up the half-built base.
    assert run("retrain", "--label", "healthy", photos["green"][0]).code == 0
    assert len([p for p in models_dir.iterdir() if p.name.startswith("base-")]) == 1


@pytest.mark.parametrize("missing", [1, 3])
def test_upgrade_reports_examples_without_thumbnails(
    run, pt_model, tmp_path, photos, models_dir, missing
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    for thumb in sorted((models_dir / "thumbnails").iterdir())[:missing]:
        thumb.unlink()
    result = run(
        "make-updatable", pytorch_style(tmp_path / "n.onnx", seed=5), "--keep-personalization"
    )
    if missing == 3:
        one_line_error(result, "thumbnail")
    else:
        assert result.code == 0
        assert f"{missing} example(s) had no usable thumbnail" in result.stdout


@needs_ort
def test_upgrade_to_the_same_model_with_another_cut(run, pt_model, photos):
    """The cached head inputs belong to one cut: a new cut must embed the photos again."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", "--epochs", "60", *photos["red"]).code == 0
    result = run("make-updatable", pt_model, "--trainable-layers", "2", "--keep-personalization")
    assert result.code == 0, result
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    rows = run("predict", "--json", *photos["red"]).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3


def test_an_upgrade_reports_what_a_new_base_reports(run, pt_model, tmp_path, photos):
    """An upgrade builds a base as make-updatable does: its output says where the
    preprocessing came from and how the head trained on --examples did, as a fresh base's."""
    examples = tmp_path / "lunches"
    for label, colour in (("healthy", "green"), ("fast_food", "red")):
        for photo in photos[colour]:
            (examples / label).mkdir(parents=True, exist_ok=True)
            (examples / label / photo.name).write_bytes(photo.read_bytes())
    stock = pytorch_style(tmp_path / "stock.onnx", None, classes=10, seed=9)
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    result = run("make-updatable", stock, "--examples", examples, "--keep-personalization")
    assert result.code == 0, result
    assert "Preprocessing from the default" in result.stdout
    assert "A new final layer for your photos" in result.stdout
    assert "carried over" in result.stdout
    assert run("undo").code == 0
    form = run(
        "make-updatable", stock, "--examples", examples, "--keep-personalization", "--json"
    ).json_lines()[0]
    assert form["preprocessing_source"].startswith("the default")
    assert form["examples"]["photos"] == {"fast_food": 3, "healthy": 3}
    assert form["carried_over"] == {"fast_food": 3}


def test_a_label_the_new_base_writes_otherwise_is_the_new_bases(
    run, pt_model, tmp_path, photos, models_dir
):
    """A new base that writes the labels in another case or spacing ('Fast Food' for
    'fast_food') names the same classes: the examples were added beside them as labels of
    their own, so the model had 'Fast Food' and 'fast_food', splitting every photo's
    probability between two classes that mean one, without a word."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", "--epochs", "60", *photos["red"]).code == 0
    assert run("retrain", "--label", "dessert", "--new-label", *photos["green"]).code == 0
    assert run("export", tmp_path / "b.tar.gz").code == 0
    labels = ["Healthy", "Fast Food", "DESSERT"]
    new_base = pytorch_style(tmp_path / "new_base.onnx", labels, classes=3, seed=7)
    result = run("make-updatable", new_base, "--keep-personalization")
    assert result.code == 0, result
    assert "(DESSERT: 3, Fast Food: 3)" in result.stdout
    status = run("status", "--json").json_lines()[0]
    assert status["labels"] == labels
    assert status["examples_per_label"] == {"Fast Food": 3, "DESSERT": 3}
    rows = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert [r["label"] for r in rows] == ["Fast Food"] * 3 + ["DESSERT"] * 3
    # A backup of the old base, rebuilt on this one, the same.
    assert run("reset", "--purge").code == 0
    assert run("import", tmp_path / "b.tar.gz", "--rebuild").code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["labels"] == labels
    assert status["examples_per_label"] == {"Fast Food": 3, "DESSERT": 3}


def test_labels_of_yours_that_differ_only_in_case_stay_apart(run, pt_model, tmp_path, photos):
    """Two labels of yours that one base label could name ('dessert' and 'Dessert'): which
    is the base's is a guess, so both stay yours, as before."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "dessert", "--new-label", *photos["red"]).code == 0
    assert run("retrain", "--label", "Dessert", "--new-label", *photos["green"]).code == 0
    new_base = pytorch_style(tmp_path / "n.onnx", ["healthy", "DESSERT"], seed=7)
    assert run("make-updatable", new_base, "--keep-personalization").code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["labels"] == ["healthy", "DESSERT", "dessert", "Dessert"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_damaged_state_after_a_killed_upgrade_keeps_the_personalization(
    run, pt_model, tmp_path, photos, models_dir
):
    """An upgrade killed (kill -9, power lost) once its new base is written leaves that
    base unnamed; were state.json then damaged, the state rebuilt from the directories
    was the new base alone, and the first command that wrote removed the personalization
    of the old base, its examples and thumbnails: 'your examples none', nothing to undo.
    Copies of older bases are now undo steps of the rebuilt state."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", "--epochs", "60", *photos["red"]).code == 0
    before = probabilities(run, *photos["red"])
    new_base = pytorch_style(tmp_path / "new_base.onnx", seed=3)
    code, _, _ = _stopped(
        "healthyluncher.bases.publish_personal",
        tmp_path / "ready",
        signal.SIGKILL,
        "make-updatable",
        str(new_base),
        "--keep-personalization",
    )
    assert code == -signal.SIGKILL
    (models_dir / STATE_FILE).write_text("{")  # and then state.json is damaged

    result = run("repair", "--json")
    assert result.code == 0, result
    assert result.json_lines()[0]["undo_steps"] >= 1
    assert run("status", "--json").json_lines()[0]["base_name"] == "new_base"
    restored = run("undo")
    assert restored.code == 0 and "on the base model tiny_pt again" in restored.stdout
    assert probabilities(run, *photos["red"]) == before
    assert len(list((models_dir / "thumbnails").glob("*.jpg"))) == 3


def test_an_example_a_new_base_cannot_carry_is_said_truly_and_how_to_get_it_back(
    run, pt_model, tmp_path, photos, models_dir
):
    """A thumbnail damaged on disk: the upgrade said the example 'had no thumbnail' (it
    has one) and 'left behind', without saying that undo brings it back."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    sorted((models_dir / "thumbnails").iterdir())[0].write_bytes(b"not a jpeg")
    result = run(
        "make-updatable", pytorch_style(tmp_path / "n.onnx", seed=5), "--keep-personalization"
    )
    assert result.code == 0, result
    assert "1 example(s) had no usable thumbnail" in result.stdout
    assert "`luncher undo`" in result.stdout
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {"fast_food": 2}
    assert run("undo").code == 0
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {"fast_food": 3}


@pytest.mark.parametrize("personalized", [True, False], ids=["upgrade", "base-only"])
def test_making_the_base_in_use_updatable_again_changes_nothing(
    run, pt_model, tmp_path, photos, models_dir, personalized
):
    """The same model, set up the same way, again (a script run twice, an upgrade repeated
    to be sure): it built a second copy of the base, retrained, and added an undo step
    identical to the current state, pushing the oldest real one out of the history. (Each
    make-updatable is its own process, as a shell runs it: ONNX Runtime names the nodes
    of the training files it writes by a count kept per process.)"""
    assert run("make-updatable", pt_model).code == 0
    if personalized:
        assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
        assert run("retrain", "--label", "dessert", "--new-label", *photos["green"]).code == 0
    new_base = pytorch_style(tmp_path / "new_base.onnx", seed=3)
    assert luncher("make-updatable", str(new_base), "--keep-personalization").returncode == 0
    status = run("status", "--json").json_lines()[0]
    state = (models_dir / STATE_FILE).read_bytes()
    before = sorted(p.name for p in models_dir.iterdir())
    for as_json in (False, True):
        args = ["make-updatable", str(new_base), "--keep-personalization", *["--json"] * as_json]
        result = luncher(*args)
        assert result.returncode == 0, result
        if as_json:
            form = json.loads(result.stdout)
            assert form["changed"] is False and form["base"]["sha256"] == status["base_sha256"]
            assert form["directory"] == str(models_dir / json.loads(state)["base"])
        else:
            assert "Nothing changed (no new undo step)" in result.stdout, result
            assert "Base ready" not in result.stdout and "carried over" not in result.stdout
    assert (models_dir / STATE_FILE).read_bytes() == state
    assert sorted(p.name for p in models_dir.iterdir()) == before
    assert run("status", "--json").json_lines()[0] == status
    # Set up otherwise, it is a new base as before.
    other = luncher("make-updatable", str(new_base), "--keep-personalization", "--epochs", "7")
    assert other.returncode == 0 and "Base ready" in other.stdout
    assert run("status", "--json").json_lines()[0]["undo_steps"] == min(3, status["undo_steps"] + 1)


@pytest.mark.parametrize("where", ["base", "personal"])
def test_a_damaged_state_is_rebuilt_whatever_a_meta_file_holds_for_its_sha256(
    run, pt_model, photos, models_dir, where
):
    """Rebuilding a damaged state.json keyed bases by the sha256 their meta.json holds,
    unchecked: a list there (a hostile or mangled file) made every command fail with
    'error: unexpected TypeError: unhashable type: 'list''. A value that is no text now
    names no base; the rest of the directory is rebuilt as before."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    meta = next(models_dir.glob(f"{where}-*")) / "meta.json"
    form = json.loads(meta.read_text())
    form["sha256" if where == "base" else "base_sha256"] = ["x"]
    meta.write_text(json.dumps(form))
    (models_dir / STATE_FILE).write_text("{")
    result = run("repair", "--json")
    assert result.code == 0, result
    status = run("status", "--json")
    assert "unexpected" not in status.stdout + status.stderr, status
    if where == "base":  # that base is damaged, and says so
        assert "meta.json is damaged" in status.json_lines()[0]["error"]
    else:  # a copy of no known base is left out
        assert status.code == 0, status
        assert not status.json_lines()[0]["examples_per_label"]


def _deflate_damaged(path: Path) -> None:
    """Rewrite an .npz with its arrays deflated, each one's data damaged where it begins:
    a block type deflate does not have, so reading any of them fails in zlib."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    np.savez_compressed(path, **arrays)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    for info in infos:
        name_len, extra_len = struct.unpack(
            "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
        )
        raw[info.header_offset + 30 + name_len + extra_len] = 0x07  # final block, type 3
    path.write_bytes(bytes(raw))


def test_a_base_whose_arrays_do_not_inflate_is_mended_by_making_it_again(run, pt_model, models_dir):
    """make-updatable compares the new base with the one in use to tell 'nothing changed';
    an .npz of the base in use whose data does not inflate stopped it there with 'error:
    unexpected error: Error -3 while decompressing data: invalid block type', so setting
    the model up again (--force) could no longer mend the base. Such a base is not the
    same as the new one: a new base is made, as before. (Each make-updatable is its own
    process, as in test_making_the_base_in_use_updatable_again_changes_nothing.)"""
    assert luncher("make-updatable", str(pt_model)).returncode == 0
    _deflate_damaged(next(models_dir.glob("base-*")) / "head_weights.npz")
    result = luncher("make-updatable", str(pt_model), "--force")
    assert result.returncode == 0, result
    assert "Base ready" in result.stdout
    assert run("status").code == 0


def test_a_label_of_yours_beside_a_base_label_spelled_alike_stays_apart(
    run, pt_model, tmp_path, photos
):
    """A label you made as 'Fast Food' beside the base's own 'fast_food' is a class of its
    own; an upgrade to a base that has 'fast_food' too merged your photos into the base's
    class (status: 'examples fast_food: 3', your label gone), since only the labels of your
    examples were asked whether one spelling named two of them. The model's labels are
    asked now: the match is ambiguous, and your label stays yours."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "Fast Food", "--new-label", *photos["red"]).code == 0
    new_base = pytorch_style(tmp_path / "n.onnx", seed=7)
    result = run("make-updatable", new_base, "--keep-personalization")
    assert result.code == 0, result
    status = run("status", "--json").json_lines()[0]
    assert status["labels"] == ["healthy", "fast_food", "Fast Food"]
    assert status["examples_per_label"] == {"Fast Food": 3}
