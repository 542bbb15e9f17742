"""What the history commands mean: after each sequence of changes, `status`, `examples`,
`labels` and predictions say what the models directory really holds (audit 3)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import healthyluncher
from healthyluncher import LuncherError
from tests.conftest import Result, one_line_error
from tests.models import keras_style, pytorch_style
from tests.test_conventions import luncher


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=models_dir)
    return healthyluncher.open(models_dir)


def cli(*args: object) -> Result:
    """The real command in a subprocess, as the `run` fixture's Result."""
    done = luncher(*map(str, args))
    return Result(done.returncode, done.stdout, done.stderr)


def names(lun: healthyluncher.Luncher) -> dict[str, tuple[str | None, str | None]]:
    return {item.digest: (item.name, item.taught) for item in lun.examples()}


def test_undo_does_not_claim_to_undo_a_forget(lun, photos):
    """`forget` clears the undo history (so a forgotten photo cannot come back): the help of
    `undo` named it among what undo reverses, and undo after it said "nothing to undo"."""
    lun.retrain("healthy", photos["red"])
    lun.forget([photos["red"][0]])
    with pytest.raises(LuncherError, match="nothing to undo"):
        lun.undo()
    summary = luncher("undo", "--help").stdout.splitlines()[2]  # what it goes back over
    assert "forget" not in summary and "import" in summary, summary
    assert "never brings forgotten photos back" in luncher("undo", "--help").stdout
    for command in ("forget", ("labels", "remove")):
        text = luncher(*([command] if isinstance(command, str) else command), "--help").stdout
        assert "undo" in text, text  # they say that undo cannot bring the photos back


def test_renaming_a_label_keeps_what_the_last_retrain_used(lun, photos):
    """A rename published a copy whose meta lost `trained_with`: after `retrain --epochs 7`
    and a rename, status said the last retrain used the saved 5 epochs."""
    lun.retrain("dessert", photos["red"], new_label=True, epochs=7)
    before = lun.status()
    assert before.last_retrain_hyperparameters["epochs"] == 7
    lun.rename_label("dessert", "sweets")
    after = lun.status()
    assert after.last_retrain_hyperparameters == before.last_retrain_hyperparameters
    assert after.hyperparameters == before.hyperparameters
    assert (after.last_retrain, after.retrains) == (before.last_retrain, before.retrains)


def test_upgrading_a_personalization_with_a_label_of_its_own_to_another_head(lun, photos):
    """The upgraded copy reused the grown head and training files of the copy of the OLD
    base whenever the class counts matched: ONNX Runtime then trained the old base's head
    (a head of another width failed with its own RuntimeError)."""
    lun.retrain("dessert", photos["red"], new_label=True)
    new = keras_style(lun.models_dir.parent / "keras.onnx")
    result = healthyluncher.make_updatable(
        new, models_dir=lun.models_dir, keep_personalization=True
    )
    assert result.carried_over == {"dessert": 3}
    assert lun.labels == ("healthy", "fast_food", "dessert")
    assert lun.predict(photos["red"][0])[0].label == "dessert"
    state = json.loads((lun.models_dir / "state.json").read_text())
    head = onnx.load(str(lun.models_dir / state["personal"] / "head.onnx"))
    assert "dense/kernel" in {t.name for t in head.graph.initializer}  # the new base's
    undone = luncher("undo")  # it says that the base changed back too
    assert "(dessert: 3), on the base model tiny_pt again." in undone.stdout, undone


def test_keep_personalization_with_nothing_to_keep_replaces_the_base(lun, photos, tmp_path):
    """`make-updatable NEW --keep-personalization` without a personalization was refused
    with a message that said to use --keep-personalization."""
    new = pytorch_style(tmp_path / "second.onnx", seed=4)
    result = healthyluncher.make_updatable(
        new, models_dir=lun.models_dir, keep_personalization=True
    )
    assert result.meta.name == "second" and not result.dropped_personalization
    assert lun.status().base_name == "second"
    assert lun.undo().base_changed == "tiny_pt"
    assert lun.status().base_name == "tiny_pt"
    lun.retrain("healthy", photos["red"])
    assert lun.undo().base_changed is None


def test_forget_reaches_a_photo_only_an_undo_step_holds(lun, photos, tmp_path):
    """An import (or an upgrade that could not carry a photo) leaves the earlier examples
    in an undo step: `forget` refused such a photo ("none of these photos are among your
    examples") and `undo` brought it back. It now clears the undo history, as any forget."""
    lun.retrain("healthy", photos["red"])
    elsewhere = healthyluncher.open(tmp_path / "elsewhere")
    healthyluncher.make_updatable(tmp_path / "tiny_pt.onnx", models_dir=elsewhere.models_dir)
    elsewhere.retrain("fast_food", photos["green"])
    elsewhere.export_backup(tmp_path / "green.tar.gz")
    lun.import_backup(tmp_path / "green.tar.gz")
    current = lun.status().examples_per_label
    probabilities = [p.probabilities for p in lun.predict(photos["green"])]

    result = lun.forget([photos["red"][0]])
    assert (result.forgotten, result.retrained) == (1, False)
    assert result.examples_per_label == current
    assert lun.status().undo_steps == 0
    with pytest.raises(LuncherError, match="nothing to undo"):
        lun.undo()
    assert [p.probabilities for p in lun.predict(photos["green"])] == probabilities
    thumbnails = {p.stem for p in (lun.models_dir / "thumbnails").iterdir()}
    assert thumbnails == {item.digest for item in lun.examples()}
    out = luncher("forget", photos["red"][1])
    assert out.returncode == 1 and "none of these photos" in out.stderr  # gone for good


def test_forget_after_a_reset_says_how_to_reach_the_photo(lun, photos):
    """After `reset`, the personalization is one undo away: forget said "the model is not
    personalized", as if the photo were gone, and did nothing. It names the way now (and
    forgetting would drop the whole personalization the reset promised to keep)."""
    lun.retrain("healthy", photos["red"])
    lun.reset()
    with pytest.raises(LuncherError, match=r"undo step.*Luncher\.undo\(\).*purge=True"):
        lun.forget([photos["red"][0]])
    one_line_error(cli("forget", photos["red"][0]), "`luncher undo`", "--purge`")
    assert lun.undo().examples_per_label == {"healthy": 3}  # nothing was lost


def test_a_label_left_without_examples_can_be_removed(lun, photos):
    """Teaching a label's photos as another label leaves the label without examples;
    `labels remove` then refused it ("there are no examples of ..."), so the empty class
    stayed in every prediction for good. Removing it forgets no photo: undo brings it back."""
    lun.retrain("dessert", photos["red"], new_label=True)
    lun.retrain("healthy", photos["red"])
    assert [(i.label, i.examples) for i in lun.label_info()][-1] == ("dessert", 0)
    result = lun.remove_label("dessert")
    assert (result.forgotten, result.retrained) == (0, True)
    assert lun.labels == ("healthy", "fast_food")
    assert lun.status().examples_per_label == {"healthy": 3}
    assert lun.undo().examples_per_label == {"healthy": 3}
    assert lun.labels == ("healthy", "fast_food", "dessert")
    with pytest.raises(LuncherError, match="no examples of 'fast_food'"):
        lun.remove_label("fast_food")  # a label of the base stays


def test_a_purge_after_a_reset_says_what_it_removed(lun, photos):
    """`reset` says the personalization is one undo away and that `reset --purge` removes
    it; the purge then said "Nothing to reset" and reported nothing removed."""
    lun.retrain("healthy", photos["red"])
    lun.reset()
    assert lun.status().undo_steps == 2
    result = luncher("reset", "--purge", "--json")
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["removed_undo_steps"] == 2 and report["removed_thumbnails"] == 3
    with pytest.raises(LuncherError, match="nothing to undo"):
        lun.undo()

    lun.retrain("healthy", photos["red"])
    lun.reset()
    text = luncher("reset", "--purge").stdout
    assert "Nothing to reset" not in text and "2 undo step(s)" in text, text


def test_import_keeps_the_file_names_and_dates_of_the_examples(lun, photos, tmp_path):
    """`luncher examples` after an import listed every photo as "?" (no file name, no
    date): the archive did not carry them."""
    lun.retrain("healthy", photos["red"])
    lun.retrain("fast_food", photos["green"])
    taught = names(lun)
    assert all(name and when for name, when in taught.values())
    archive = tmp_path / "backup.tar.gz"
    lun.export_backup(archive)

    fresh = healthyluncher.open(tmp_path / "fresh")
    healthyluncher.make_updatable(tmp_path / "tiny_pt.onnx", models_dir=fresh.models_dir)
    fresh.import_backup(archive)
    assert names(fresh) == taught

    other = healthyluncher.open(tmp_path / "other")  # another base: embedded again
    healthyluncher.make_updatable(
        pytorch_style(tmp_path / "other.onnx", seed=3), models_dir=other.models_dir
    )
    other.import_backup(archive, rebuild=True)
    assert names(other) == taught


def test_labels_that_look_like_markup_are_printed_as_they_are(pt_model, photos, tmp_path):
    """A label is the user's text: printed through rich unescaped, `[/]` in it made `undo`,
    `forget` and `make-updatable --keep-personalization` end in "unexpected MarkupError"
    after the change was saved, and `[bold]` vanished from the retrain summary."""
    label = "[bold]x[/]"
    made = luncher("make-updatable", str(pt_model), "--labels", f"{label},b")
    assert made.returncode == 0 and f"labels {label}, b;" in made.stdout, made
    taught = luncher("retrain", "--label", label, *map(str, photos["green"]))
    assert taught.returncode == 0 and f"({label}: 3)" in taught.stdout, taught
    lun = healthyluncher.open()
    lun.retrain("pancakes", photos["red"], new_label=True)
    undone = luncher("undo")
    assert undone.returncode == 0 and f"({label}: 3)" in undone.stdout, undone
    lun.retrain("pancakes", photos["red"], new_label=True)
    forgot = luncher("forget", str(photos["red"][0]))
    assert forgot.returncode == 0 and f"{label}: 3" in forgot.stdout, forgot
    other = pytorch_style(tmp_path / "other.onnx", ["b", label], seed=2)
    moved = luncher("make-updatable", str(other), "--keep-personalization")
    assert moved.returncode == 0 and f"{label}: 3" in moved.stdout, moved


def test_an_upgrade_meets_a_label_of_yours_in_another_unicode_form(lun, photos, tmp_path):
    """A label taught from a macOS folder name (an e and a combining accent) and a new
    base's label typed as one composed é are one label, as retrain treats them; an
    upgrade compared them as text and made the new base's label a twin of the user's."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "café")
    composed = unicodedata.normalize("NFC", "café")
    lun.retrain(decomposed, photos["red"], new_label=True)
    new = pytorch_style(tmp_path / "with_cafe.onnx", labels=[composed, "fast_food"], seed=4)
    result = healthyluncher.make_updatable(
        new, models_dir=lun.models_dir, keep_personalization=True
    )
    assert result.carried_over == {composed: 3}
    assert healthyluncher.open(lun.models_dir).labels == (composed, "fast_food")


def test_status_after_a_reset_says_the_examples_are_one_undo_away(lun, photos, run):
    """After `reset`, status said `your examples none`, as if they were gone, although
    `luncher undo` brings them all back; --json had no word of them either."""
    lun.retrain("healthy", photos["red"])
    lun.retrain("fast_food", photos["green"][:2])
    lun.reset()
    status = lun.status()
    assert status.predicting_with == "base"
    assert status.examples_per_label == {}
    assert status.undo_examples_per_label == {"healthy": 3, "fast_food": 2}
    shown = run("status")
    assert shown.code == 0, shown
    line = next(x for x in shown.stdout.splitlines() if x.startswith("your examples"))
    assert line.split(None, 2)[2] == (
        "none in use; `luncher undo` brings back fast_food: 2, healthy: 3"
    )
    data = run("status", "--json").json_lines()[0]
    assert data["examples_per_label"] == {}
    assert data["undo_examples_per_label"] == {"healthy": 3, "fast_food": 2}

    assert lun.undo().examples_per_label == {"healthy": 3, "fast_food": 2}  # it was true
    assert lun.status().undo_examples_per_label == {"healthy": 3}  # the retrain before
    lun.reset(purge=True)  # gone for good: status says none, and nothing to bring back
    assert (lun.status().examples_per_label, lun.status().undo_examples_per_label) == ({}, {})
    line = next(x for x in run("status").stdout.splitlines() if x.startswith("your examples"))
    assert line.split(None, 2)[2] == "none"
