"""The public API: what a program that imports healthyluncher gets, and the defects it fixed."""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

import healthyluncher
from healthyluncher import LuncherError, Progress
from healthyluncher.runtime import pad_batch, run_in_batches
from healthyluncher.settings import Hyperparameters, Preprocessing
from healthyluncher.store import STATE_FILE, ModelStore
from tests.conftest import needs_ort, one_line_error, solid
from tests.models import batch_one_head


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=str(models_dir))
    return healthyluncher.open(str(models_dir))


def test_open_takes_str_pathlike_or_nothing(models_dir, pt_model):
    healthyluncher.make_updatable(pt_model, models_dir=models_dir)
    for where in (str(models_dir), models_dir, None):  # None: $LUNCHER_MODELS_DIR
        assert healthyluncher.open(where).labels == ("healthy", "fast_food")
    with pytest.raises(LuncherError, match="models_dir must be a path"):
        healthyluncher.open(42)  # type: ignore[arg-type]


def test_predict_takes_paths_pil_images_and_arrays_in_one_list(lun, photos):
    path = photos["red"][0]
    image = Image.open(path)
    array = np.asarray(image.convert("RGB"))
    results = lun.predict([str(path), image, array, photos["green"][0]])
    assert [str(r.path) for r in results] == [
        str(path),
        "<image 1>",
        "<image 2>",
        str(photos["green"][0]),
    ]
    # The same photo gives the same probabilities however it is handed over.
    for other in results[1:3]:
        assert other.probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
    assert results[3].label != results[0].label  # red and green photos differ
    assert abs(sum(results[0].probabilities.values()) - 1) < 1e-6
    assert results[0].probability == max(results[0].probabilities.values())


@pytest.mark.parametrize(
    "mode", ["CMYK", "YCbCr", "LAB", "HSV", "I", "F", "PA", "La", "RGBa", "RGBX"]
)
def test_a_pil_image_in_any_mode_is_predicted_as_its_file_would_be(lun, photos, mode):
    """A CMYK PIL image (a print-ready JPEG the program opened itself), or one in mode I, F,
    LAB, PA, ...: `cannot use this image (cannot write mode CMYK as PNG)`, where the same
    photo as a file is read. It is predicted now, as its RGB copy is, near enough."""
    rgb = Image.open(photos["red"][0]).convert("RGB")
    image = rgb.convert(mode)
    copy = image.convert("LA" if mode == "La" else mode.replace("a", "A")).convert("RGB")
    [ours, reference] = lun.predict([image, copy])
    assert ours.label == reference.label
    assert ours.probabilities == pytest.approx(reference.probabilities, abs=0.05)


def test_api_predictions_equal_the_cli_json(lun, photos, run):
    paths = photos["red"] + photos["green"]
    cli = run("predict", "--json", *paths).json_lines()
    api = lun.predict(paths)
    for line, pred in zip(cli, api, strict=True):
        assert line["path"] == str(pred.path)
        assert line["label"] == pred.label
        assert line["probabilities"] == {k: round(v, 6) for k, v in pred.probabilities.items()}


def test_bad_inputs_are_luncher_errors(lun, tmp_path):
    with pytest.raises(LuncherError, match="uint8"):
        lun.predict([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(LuncherError, match="expected a path, a photo file's bytes, a PIL image"):
        lun.predict([{"not": "a photo"}])
    with pytest.raises(LuncherError, match="missing.jpg"):
        lun.predict([tmp_path / "missing.jpg"])
    failures = list(lun.predict_each([tmp_path / "missing.jpg"]))
    assert isinstance(failures[0], healthyluncher.ImageFailure)


def test_arguments_of_the_wrong_type_are_luncher_errors(lun, photos, pt_model):
    """None or a number where a path or photos belong: a TypeError from deep inside
    before ("'NoneType' object is not iterable", "expected str, bytes or os.PathLike")."""
    calls = {
        "photos must be": [
            lambda: lun.predict(None),  # type: ignore[arg-type]
            lambda: lun.retrain("healthy", 42),  # type: ignore[arg-type]
            lambda: lun.forget(None),  # type: ignore[arg-type]
        ],
        "path must be a path": [
            lambda: lun.export_backup(None),  # type: ignore[arg-type]
            lambda: lun.import_backup(3),  # type: ignore[arg-type]
        ],
        "model must be a path": [lambda: healthyluncher.make_updatable(None)],  # type: ignore[arg-type]
        "examples must be a path": [
            lambda: healthyluncher.make_updatable(pt_model, examples=3)  # type: ignore[arg-type]
        ],
    }
    for words, operations in calls.items():
        for operation in operations:
            with pytest.raises(LuncherError, match=words):
                operation()
    assert lun.predict(photos["red"][0])[0].label in lun.labels


def test_an_empty_path_is_refused_not_read_as_the_current_directory(run, tmp_path, monkeypatch):
    """open("") and --models-dir "" (an unset variable) opened the current directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LuncherError, match="models_dir is an empty path"):
        healthyluncher.open("")
    with pytest.raises(LuncherError, match="path is an empty path"):
        healthyluncher.open(tmp_path / "models").export_backup("")
    result = run("--models-dir", "", "status")
    assert result.code == 2 and "empty path" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", [None, "--examples", "--replay", "--calibration"])
def test_make_updatable_refuses_an_empty_path_for_the_model_and_its_folders(
    run, pt_model, photos, tmp_path, monkeypatch, models_dir, option
):
    """`luncher make-updatable "$MODEL"` (unset) was 'unexpected ValueError: PosixPath('.')
    has an empty name', and `--examples "$DIR"` took the current directory for the folder of
    labelled photos (its subfolders for labels)."""
    monkeypatch.chdir(photos["red"][0].parent.parent)  # holds red/ and green/: two "labels"
    args = ["make-updatable", "" if option is None else pt_model]
    if option is not None:
        args += [option, ""] + (["--int8"] if option == "--calibration" else [])
    result = run(*args)
    assert result.code == 2 and "an empty path" in result.stderr, result
    assert not models_dir.exists()


@pytest.mark.parametrize("model", [".", "/"])
def test_make_updatable_refuses_a_folder_for_a_model_in_one_line(run, model):
    """'unexpected ValueError: PosixPath('.') has an empty name'."""
    line = one_line_error(run("make-updatable", model))
    assert "unexpected" not in line
    with pytest.raises(LuncherError) as caught:
        healthyluncher.make_updatable(model)
    assert "unexpected" not in str(caught.value)


def test_empty_labels_are_refused_not_read_as_none_given(run, pt_model, models_dir):
    """make-updatable --labels "" (an unset variable) took the model's own labels."""
    result = run("make-updatable", pt_model, "--labels", "")
    assert result.code == 2 and "'--labels': no names given" in result.stderr, result
    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_no_photos_at_all_is_named(lun):
    """retrain with an empty list said "no image files found in " and stopped there."""
    for call in (lambda: lun.retrain("healthy", []), lambda: lun.predict([])):
        with pytest.raises(LuncherError, match=r"^no image files found in \(nothing\)$"):
            call()


def test_retrain_needs_new_label_for_an_unknown_label(lun, photos):
    with pytest.raises(LuncherError, match="new_label=True"):
        lun.retrain("dessert", photos["red"])
    assert not lun.personalized
    result = lun.retrain("dessert", photos["red"], new_label=True)
    assert result.new_label and lun.labels == ("healthy", "fast_food", "dessert")


def test_retrain_reports_typed_progress_and_returns_frozen_results(lun, photos):
    events: list[Progress] = []
    result = lun.retrain("fast_food", photos["green"][:2], progress=events.append)
    assert {e.stage for e in events} == {"embedding", "training"}
    assert all(isinstance(e, Progress) and 0 < e.done <= e.total for e in events)
    training = [e for e in events if e.stage == "training"]
    assert training[-1].done == training[-1].total == result.hyperparameters.epochs
    # Each epoch's loss, as Core ML's epoch-end events carry it; the last is the final loss.
    assert all(isinstance(e.loss, float) and e.loss > 0 for e in training)
    assert training[-1].loss == result.final_loss
    assert all(e.loss is None for e in events if e.stage == "embedding")
    with pytest.raises(AttributeError):
        result.label = "x"  # type: ignore[misc]
    assert all(p.after > p.before for p in result.photos)


def test_retrain_accepts_in_memory_photos_and_forget_finds_them_by_content(lun, photos):
    pixels = np.asarray(Image.open(photos["green"][0]).convert("RGB"))
    result = lun.retrain("fast_food", [pixels])
    assert result.examples_per_label == {"fast_food": 1}
    assert lun.forget([pixels.copy()]).forgotten == 1
    assert not lun.personalized


def test_the_whole_story_through_the_api(lun, photos, tmp_path):
    before = lun.predict(photos["green"][0])[0].probabilities
    lun.retrain("fast_food", photos["green"])
    assert lun.status().predicting_with == "personalized"
    backup = tmp_path / "b.tar.gz"
    assert lun.export_backup(backup).path == backup
    assert lun.undo().restored == "base"
    assert lun.import_backup(str(backup)).examples_per_label == {"fast_food": 3}
    assert lun.forget(photos["green"][:1]).examples_per_label == {"fast_food": 2}
    assert lun.reset().removed_model
    assert lun.predict(photos["green"][0])[0].probabilities == before


def test_one_luncher_is_safe_from_several_threads(lun, photos):
    expected = [p.probabilities for p in lun.predict(photos["red"] + photos["green"])]
    errors: list[BaseException] = []
    results: list[list[dict[str, float]]] = []

    def work() -> None:
        try:
            for _ in range(5):
                got = lun.predict(photos["red"] + photos["green"])
                results.append([p.probabilities for p in got])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    threads.append(threading.Thread(target=lambda: lun.retrain("healthy", photos["red"][:1])))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 20
    # Each prediction came whole from the base or the personalized model, never a mix.
    personalized = [p.probabilities for p in lun.predict(photos["red"] + photos["green"])]
    assert all(r in (expected, personalized) for r in results)


def test_help_documents_the_api():
    assert "models directory" in (healthyluncher.open.__doc__ or "")
    for name in ("predict", "retrain", "undo", "forget", "reset", "status"):
        assert getattr(healthyluncher.Luncher, name).__doc__
    assert "LuncherError" in (healthyluncher.__doc__ or "")
    assert (Path(healthyluncher.__file__).parent / "py.typed").is_file()


def test_the_readme_api_example_runs_as_written(tmp_path, monkeypatch, pt_model, photos):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"^( *)```python\n(.*?)^ *```", section, re.S | re.M)
    assert len(blocks) >= 2  # the tour, then UpdateTask; each runs after the one before
    code = "\n".join(textwrap.dedent(body) for _, body in blocks)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUNCHER_BUNDLED_MODEL", str(pt_model))  # what open() sets up
    Image.open(photos["red"][0]).save(tmp_path / "lunch.jpg")
    for i, source in enumerate(photos["green"]):
        Image.open(source).save(tmp_path / f"pancake{i + 1}.jpg")
    (tmp_path / "model.onnx").write_bytes(pt_model.read_bytes())
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example


# -- defects of the first shape, each with the test that failed before its fix ---------------


def test_settings_are_validated_where_they_are_made(run, pt_model):
    with pytest.raises(LuncherError, match="learning rate"):
        Hyperparameters(learning_rate=-1)
    with pytest.raises(LuncherError, match="epochs"):
        Hyperparameters(epochs=10**9)
    with pytest.raises(LuncherError, match="std"):
        Preprocessing(std=(0.0, 1.0, 1.0))
    result = run("make-updatable", pt_model, "--learning-rate", "-1")  # the CLI: a usage error
    assert result.code == 2 and "not in the range 0<x<=10" in result.stderr


def test_damaged_meta_values_are_refused_not_obeyed(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["green"][0]).code == 0
    state = json.loads((models_dir / STATE_FILE).read_text())
    meta_path = models_dir / state["personal"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["hyperparameters"]["epochs"] = 1e9
    meta_path.write_text(json.dumps(meta))
    result = run("retrain", "--label", "fast_food", photos["green"][1])
    assert result.code == 1 and "epochs must be a whole number" in result.stderr


# A JSON integer too large for a float (float() raises OverflowError, not ValueError).
HUGE = 10**400


@pytest.mark.parametrize(
    "place", ["final_loss", "learning_rate", "memory_strength", "personal_weight"]
)
def test_a_number_too_large_for_a_float_is_refused_in_one_line(
    run, pt_model, photos, models_dir, place
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["green"][0]).code == 0
    state = json.loads((models_dir / STATE_FILE).read_text())
    meta_path = models_dir / state["personal"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    (meta if place == "final_loss" else meta["hyperparameters"])[place] = HUGE
    meta_path.write_text(json.dumps(meta))
    for command in (("status",), ("predict", photos["red"][0])):
        one_line_error(run(*command), "number")
    assert run("undo").code == 0
    assert run("predict", photos["red"][0]).code == 0


def test_preprocessing_metadata_too_large_for_a_float_is_refused(run, pt_model):
    model = onnx.load(str(pt_model))
    helper.set_model_props(
        model, {"labels": '["healthy", "fast_food"]', "preprocessing": f'{{"mean": [{HUGE}]}}'}
    )
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), "mean")
    with pytest.raises(LuncherError, match="finite"):
        Hyperparameters.from_json({"learning_rate": HUGE})


@needs_ort
def test_a_head_that_takes_batch_1_scores_a_retrain_of_several_photos(run, tmp_path, photos):
    model = batch_one_head(tmp_path / "b1.onnx")
    assert run("make-updatable", model, "--trainable-layers", "2").code == 0
    assert json.loads(run("status", "--json").stdout)["trainable_layers"] == 2
    result = run("retrain", "--label", "fast_food", "--json", *photos["red"])
    assert result.code == 0, result
    assert len(result.json_lines()[0]["photos"]) == 3


def test_fixed_batch_padding_is_one_function():
    seen: list[int] = []

    def run(chunk: np.ndarray) -> np.ndarray:
        seen.append(len(chunk))
        return chunk * 2

    out = run_in_batches(run, np.arange(5.0)[:, None], step=2, fixed=4)
    assert seen == [4, 4] and out[:, 0].tolist() == [0, 2, 4, 6, 8]
    assert pad_batch(np.array([[1.0], [2.0]]), 3)[:, 0].tolist() == [1, 2, 2]


def test_forget_writes_state_once_and_deletes_files_only_after_the_switch(
    lun, photos, models_dir, monkeypatch
):
    lun.retrain("fast_food", photos["green"])
    lun.retrain("healthy", photos["red"][:1])
    thumbnails = sorted((models_dir / "thumbnails").iterdir())
    writes: list[dict[str, object]] = []
    original = ModelStore.write_state

    def counting(self: ModelStore, state: object) -> None:
        writes.append(state.to_json())  # type: ignore[attr-defined]
        original(self, state)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelStore, "write_state", counting)
    lun.forget(photos["green"][:1])
    assert len(writes) == 1 and writes[0]["history"] == []
    assert len(list((models_dir / "thumbnails").iterdir())) == len(thumbnails) - 1


def test_a_forget_that_fails_keeps_the_photo_its_files_and_the_history(
    lun, photos, models_dir, monkeypatch
):
    import healthyluncher.personal as personal

    lun.retrain("fast_food", photos["green"])
    lun.retrain("healthy", photos["red"][:1])
    state_before = (models_dir / STATE_FILE).read_text()
    thumbnails = sorted((models_dir / "thumbnails").iterdir())
    cache = sorted((models_dir / "cache").rglob("*.npy"))

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(personal, "save_examples", crash)
    with pytest.raises(KeyboardInterrupt):
        lun.forget(photos["green"][:1])
    assert (models_dir / STATE_FILE).read_text() == state_before
    assert sorted((models_dir / "thumbnails").iterdir()) == thumbnails
    assert sorted((models_dir / "cache").rglob("*.npy")) == cache
    assert lun.undo().examples_per_label == {"fast_food": 3}


def test_select_examples_keeps_views_in_the_order_asked():
    from healthyluncher.examples import select_examples
    from healthyluncher.records import Examples

    inputs = np.arange(7, dtype=np.float32)[:, None]
    owner = np.array([0, 1, 1, 2, 2, 2, 0])
    examples = Examples(inputs, owner, ("a", "b", "c"), ("x", "y", "z"))
    kept = select_examples(examples, [2, 0])
    assert kept.digests == ("c", "a")
    assert kept.inputs[:, 0].tolist() == [3, 4, 5, 0, 6]
    assert kept.owner.tolist() == [0, 0, 0, 1, 1]


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        check=False,
    )
    assert done.returncode == 0 and "retrain" in done.stdout


@pytest.mark.parametrize("with_replay", [False, True])
def test_the_retrain_summary_says_what_predict_says(
    pt_model, models_dir, photos, tmp_path, with_replay
):
    """The summary's "after" is computed beside the model (with numpy for a linear head):
    it equals what the published model then predicts, for a base's label and a new one,
    with and without a replay set (whose examples the memory also consults)."""
    examples = None
    if with_replay:
        examples = tmp_path / "examples"
        for label, colour in (("healthy", (40, 200, 60)), ("fast_food", (200, 50, 40))):
            for i in range(4):
                solid(examples / label / f"{i}.png", tuple(c + 9 * i for c in colour))
    healthyluncher.make_updatable(pt_model, models_dir=str(models_dir), examples=examples)
    lun = healthyluncher.open(str(models_dir))
    assert lun.status().replay_examples == (8 if with_replay else 0)
    for label, new, shots in (
        ("healthy", False, photos["red"][:2]),
        ("dessert", True, photos["green"]),
    ):
        result = lun.retrain(label, shots, new_label=new)
        predicted = lun.predict(shots)
        for photo, pred in zip(result.photos, predicted, strict=True):
            assert photo.after == pytest.approx(pred.probabilities[label], abs=1e-5)


def test_a_cached_retrain_with_the_numpy_trainer_never_starts_onnx_runtime(lun, photos):
    """Where the numpy trainer trains (Python 3.13 and later), retraining photos already in
    the cache needs neither ONNX Runtime nor onnx: it costs no more than with ORT (bench)."""
    import subprocess
    import sys

    lun.retrain("healthy", photos["red"])
    code = (
        "import sys, healthyluncher\n"
        f"lun = healthyluncher.open({str(lun.models_dir)!r})\n"
        f"result = lun.retrain('fast_food', {[str(p) for p in photos['red']]!r})\n"
        "assert result.cached == 3 and result.embedded == 0, result\n"
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'PIL.Image') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "LUNCHER_TRAINER": "numpy"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_copy_scores_its_newest_photos_and_those_just_taught(lun, photos, monkeypatch):
    """Every retrain scored every example photo for the summary (5,000 photos: 0.5 s of a
    1.4 s retrain). Past MAX_SCORED it scores the newest and those just taught; an older
    photo taught again gets its "before" from the model, the same as predict says."""
    import numpy as np

    from healthyluncher import personal
    from healthyluncher.store import Files, ModelStore

    monkeypatch.setattr(personal, "MAX_SCORED", 2)

    def scored() -> list[str]:
        store = ModelStore(lun.models_dir)
        folder = store.root / store.read_state().personal
        with np.load(folder / Files.SCORES) as data:
            return [str(d) for d in data["digests"]]

    first = lun.retrain("healthy", photos["red"])  # 3 photos: all taught now
    assert scored() == [p.digest for p in first.photos]
    second = lun.retrain("fast_food", photos["green"][:1])
    assert len(scored()) == 2 and second.photos[0].digest in scored()
    oldest = photos["red"][0]
    assert first.photos[0].digest not in scored()
    before = lun.predict([oldest])[0].probabilities["fast_food"]
    again = lun.retrain("fast_food", [oldest])
    assert again.photos[0].before == pytest.approx(before, abs=1e-5)
    after = lun.predict([oldest])[0].probabilities["fast_food"]
    assert again.photos[0].after == pytest.approx(after, abs=1e-5)


def test_memory_strength_is_a_retrain_option_kept_with_the_model(lun, photos, run):
    """Issue 16: the memory's strength is the design's one knob. It was not an option;
    now a retrain sets it, and it stays with the copy (its model and its later "before")."""
    lun.retrain("healthy", photos["red"])
    assert lun.status().hyperparameters["memory_strength"] == 40.0
    lun.retrain("healthy", photos["green"][:1], memory_strength=0)
    assert lun.status().hyperparameters["memory_strength"] == 0.0
    lun.retrain("healthy", photos["green"][1:2])  # no option: the copy's setting stays
    assert lun.status().hyperparameters["memory_strength"] == 0.0
    before = lun.predict([photos["green"][2]])[0].probabilities["healthy"]
    again = lun.retrain("healthy", [photos["green"][2]])
    assert again.photos[0].before == pytest.approx(before, abs=1e-5)
    result = run("retrain", "--label", "fast_food", "--memory-strength", "80", photos["red"][0])
    assert result.code == 0, result
    assert run("status", "--json").json_lines()[0]["hyperparameters"]["memory_strength"] == 80
    huge = run("retrain", "--label", "healthy", "--memory-strength", "1e9", photos["red"][0])
    assert huge.code == 2 and "'--memory-strength'" in huge.stderr  # a usage error
    with pytest.raises(LuncherError, match="memory strength"):
        lun.retrain("healthy", photos["red"][:1], memory_strength=1e9)
    assert lun.status().hyperparameters["memory_strength"] == 80.0


@pytest.mark.parametrize("preset", [None, "2"])
def test_the_luncher_process_starts_numpy_with_one_blas_thread(lun, preset):
    """Set before numpy loads, so its threads are never started (about 0.08 s of CPU time
    per command); a value the user set is kept."""
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: OpenBLAS starts one thread whatever is asked")
    probe = (
        "import sys\n"
        "from healthyluncher.__main__ import run\n"
        "sys.argv = ['luncher', 'status']\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "from threadpoolctl import threadpool_info\n"
        "print(sorted({lib['num_threads'] for lib in threadpool_info() "
        "if lib['user_api'] == 'blas'}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["LUNCHER_MODELS_DIR"] = str(lun.models_dir)
    if preset:
        env["OPENBLAS_NUM_THREADS"] = preset
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"[{preset or 1}]"


# -- what a program that imports healthyluncher found (the API review) -----------------------


def test_the_library_leaves_the_programs_logging_configuration_alone(pt_model, models_dir):
    """ONNX Runtime's artifact generator calls logging.basicConfig when it is imported: the
    program's root logger got a stderr handler, and its own basicConfig then did nothing."""
    import subprocess
    import sys

    probe = (
        "import logging, sys\n"
        "import healthyluncher\n"
        "healthyluncher.make_updatable(sys.argv[1], models_dir=sys.argv[2])\n"
        "print(logging.getLogger().handlers)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(pt_model), str(models_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout.strip(), done.stderr) == ("[]", "")


def test_predict_goes_on_while_another_thread_retrains(lun, photos):
    """A retrain in another process never held predict up, but one in another thread of the
    same Luncher held every predict until it ended: a web server stopped answering while it
    retrained in the background."""
    expected = lun.predict(photos["green"][0])[0].probabilities
    training, release = threading.Event(), threading.Event()

    def progress(event: Progress) -> None:
        if event.stage == "training":
            training.set()
            release.wait(30)

    worker = threading.Thread(
        target=lambda: lun.retrain("healthy", photos["red"][:1], progress=progress)
    )
    worker.start()
    try:
        assert training.wait(30)
        answers: list[dict[str, float]] = []
        client = threading.Thread(
            target=lambda: answers.append(lun.predict(photos["green"][0])[0].probabilities)
        )
        client.start()
        client.join(10)
        assert answers == [expected], "predict waited for the retrain"
    finally:
        release.set()
        worker.join()
    assert lun.personalized


def test_a_result_for_an_in_memory_photo_has_a_short_repr(lun, photos):
    """Its path's repr held the whole photo as PNG bytes: a logged or printed Prediction of a
    phone photo was megabytes long."""
    pixels = np.asarray(Image.open(photos["green"][0]).convert("RGB"))
    prediction = lun.predict([pixels])[0]
    assert len(repr(prediction)) < 300 and "'<image 0>'" in repr(prediction)
    assert len(repr(lun.retrain("fast_food", [pixels]))) < 2000


def test_the_bytes_of_a_photo_file_are_a_photo(lun, photos):
    """What a web server receives from an upload: bytes were refused ('not int', or 'not
    bytes'), and a file object was read line by line as a list of photos."""
    path = photos["green"][0]
    from_bytes, from_file = lun.predict([path.read_bytes(), path])
    assert str(from_bytes.path) == "<image 0>"
    assert from_bytes.probabilities == from_file.probabilities
    assert lun.predict(path.read_bytes())[0].probabilities == from_file.probabilities
    assert lun.retrain("fast_food", [bytearray(path.read_bytes())]).photos[0].after > 0.5
    assert lun.forget([path]).forgotten == 1  # the same content as the file
    with pytest.raises(LuncherError, match="<image 0>: cannot decode image"):
        lun.predict(b"not a photo")
    with pytest.raises(LuncherError, match="not BytesIO"):
        lun.predict(io.BytesIO(path.read_bytes()))  # type: ignore[arg-type]


def test_an_exception_raised_by_progress_cancels_and_changes_nothing(lun, photos):
    """How a program cancels (Core ML's MLUpdateTask.cancel() from a progress handler): the
    exception comes out of the call unchanged, and nothing was saved."""

    class Cancelled(Exception):
        pass

    lun.retrain("fast_food", photos["green"][:2])
    before = lun.status()
    for stage in ("embedding", "training"):

        def cancel(event: Progress, stage: str = stage) -> None:
            if event.stage == stage:
                raise Cancelled

        with pytest.raises(Cancelled):
            lun.retrain("healthy", photos["red"], progress=cancel)
    with pytest.raises(Cancelled):
        lun.forget(photos["green"][:1], progress=cancel)  # the training stage's
    after = lun.status()
    assert (after.examples_per_label, after.retrains, after.undo_steps) == (
        before.examples_per_label,
        before.retrains,
        before.undo_steps,
    )
    assert lun.retrain("healthy", photos["red"]).examples_per_label["healthy"] == 3


def test_the_exported_luncher_class_takes_a_models_directory_as_open_does(lun, tmp_path):
    """`Luncher("models")` failed with "unsupported operand type(s) for /: 'str' and 'str'",
    and a relative Path moved with the program's working directory."""
    assert healthyluncher.Luncher(str(lun.models_dir)).labels == lun.labels
    relative = healthyluncher.Luncher(Path(os.path.relpath(lun.models_dir)))
    assert relative.models_dir == lun.models_dir and relative.models_dir.is_absolute()
    with pytest.raises(LuncherError, match="models_dir must be a path"):
        healthyluncher.Luncher(None)  # type: ignore[arg-type]


def test_an_unknown_label_is_an_exported_error_naming_it(lun, photos):
    """A program offering 'add "heathy" as a new label?' had to parse the message: the
    error's class and its `label` and `known` were private."""
    with pytest.raises(healthyluncher.UnknownLabelError) as refused:
        lun.retrain("heathy", photos["red"])
    assert (refused.value.label, refused.value.known) == ("heathy", lun.labels)
    assert "UnknownLabelError" in healthyluncher.__all__
    assert issubclass(healthyluncher.UnknownLabelError, LuncherError)


def test_a_long_running_luncher_predicts_with_what_another_process_saved(lun, photos, run):
    """A web server's Luncher, while `luncher retrain` and `luncher undo` change its models
    directory: each predict uses the model saved last."""
    before = lun.predict(photos["green"][0])[0].probabilities
    assert run("retrain", "--label", "healthy", *photos["green"]).code == 0
    assert lun.predict(photos["green"][0])[0].label == "healthy" and lun.personalized
    assert run("undo").code == 0
    assert lun.predict(photos["green"][0])[0].probabilities == before


# make_updatable's keyword arguments, the same as options, and what each side's refusal says.
NAMED_PARAMETERS = {
    "trainable_layers": (
        {"trainable_layers": 4},
        ["--trainable-layers", "4"],
        ("trainable_layers=4 is more than the 3", "choose trainable_layers from 1, 2, 3"),
        ("--trainable-layers 4 is more than the 3", "choose --trainable-layers from 1, 2, 3"),
    ),
    "int8 alone": (
        {"int8": True},
        ["--int8"],
        ("int8=True needs calibration=..., photos",),
        ("--int8 needs --calibration DIR, photos",),
    ),
    "calibration alone": (
        {"calibration": "photos"},
        ["--calibration", "photos"],
        ("calibration is only used with int8=True",),
        ("--calibration is only used with --int8",),
    ),
    "balance_subfolders alone": (
        {"balance_subfolders": True},
        ["--balance-subfolders"],
        ("balance_subfolders=True is only used with examples",),
        ("--balance-subfolders is only used with --examples",),
    ),
    "labels": (
        {"labels": ["healthy"]},
        ["--labels", "healthy"],
        ("use examples=... (one subfolder of photos per label)",),
        ("use --examples DIR (one subfolder of photos per label)",),
    ),
    "mean alone": (
        {"mean": (1, 2, 3)},
        ["--mean", "1,2,3"],
        ("mean and std go together",),
        ("--mean and --std go together",),
    ),
    "resize": (
        {"resize": 10},
        ["--resize", "10"],
        ("resize=10 is smaller than the model's input",),
        ("--resize 10 is smaller than the model's input",),
    ),
    "examples": (
        {"examples": "missing"},
        ["--examples", "missing"],
        ("examples='missing': not a directory",),
        ("--examples missing: not a directory",),
    ),
}


@pytest.mark.parametrize(
    ("kwargs", "options", "api_says", "cli_says"),
    NAMED_PARAMETERS.values(),
    ids=NAMED_PARAMETERS.keys(),
)
def test_make_updatable_refusals_name_its_parameters_and_the_cli_its_options(
    kwargs, options, api_says, cli_says, run, pt_model
):
    """make_updatable's refusals named the command's options (`--trainable-layers 4`) to
    Python callers. Now they name the API's parameters (`trainable_layers=4`), and the
    command still names its options."""
    with pytest.raises(LuncherError) as refused:
        healthyluncher.make_updatable(pt_model, **kwargs)
    assert all(said in str(refused.value) for said in api_says), str(refused.value)
    assert "--" not in str(refused.value)
    one_line_error(run("make-updatable", pt_model, *options), *cli_says)


def test_refusals_after_a_base_name_the_api_parameters_too(lun, photos, pt_model, tmp_path, run):
    """The same for a second base over a personalization, an unnamed model's classes and
    an export over an existing file."""
    from tests.models import pytorch_style

    lun.retrain("fast_food", photos["green"][:1])
    with pytest.raises(LuncherError) as replacing:
        healthyluncher.make_updatable(pt_model)
    assert "use keep_personalization=True to move" in str(replacing.value)
    assert "or force=True to replace it" in str(replacing.value)
    one_line_error(run("make-updatable", pt_model), "--keep-personalization to", "--force to")
    unnamed = pytorch_style(tmp_path / "unnamed.onnx", labels=None)
    with pytest.raises(LuncherError, match=r"give them with labels=\.\.\., or .* examples=\.\.\."):
        healthyluncher.make_updatable(unnamed, force=True)
    one_line_error(run("make-updatable", unnamed, "--force"), "--labels a,b,...", "--examples DIR")
    taken = tmp_path / "taken.tar.gz"
    taken.write_bytes(b"someone's file")
    with pytest.raises(LuncherError, match=r"already exists; use force=True to replace it"):
        lun.export_backup(taken)
    one_line_error(run("export", taken), "already exists; use --force to replace it")


def test_library_refusals_never_name_a_command_line_option():
    """An error the library raises names an API parameter (errors.Param), which the command
    line spells as its option; `--` appears only in a whole `luncher ...` command line."""
    import ast
    import re
    from pathlib import Path

    package = Path(healthyluncher.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        if path.stem.startswith("cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if not name.endswith(("Error", "_Refused")):
                continue
            text = "".join(
                part.value
                for arg in node.args
                for part in ast.walk(arg)
                if isinstance(part, ast.Constant) and isinstance(part.value, str)
            )
            if re.search(r"--[a-z]", text):
                found.append(f"{path.name}:{node.lineno}: {text}")
    assert found == []


def test_library_messages_suggest_commands_in_the_callers_words():
    """Messages suggested whole commands (`luncher undo`, `luncher reset --purge`) to
    Python callers. A suggestion is now an errors.Command, which a Python caller reads as
    the API's call and the command line as its command: no string of the library spells a
    `luncher` command line."""
    import ast
    import re
    from pathlib import Path

    package = Path(healthyluncher.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        if path.stem.startswith("cli") or path.stem == "errors":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and re.search(r"[`']luncher [a-z]", node.value)
            ):
                found.append(f"{path.name}:{node.lineno}: {node.value}")
    assert found == []


def test_a_suggested_command_is_a_call_to_python_callers_and_a_command_line_to_the_cli(
    lun, photos, run
):
    """A damaged personalized model said "run `luncher undo` ... (`luncher predict --base`
    still works)" to a program too; it now reads `Luncher.undo()` there."""
    from healthyluncher.store import Files, ModelStore

    lun.retrain("fast_food", photos["red"][:1])
    personal = ModelStore(lun.models_dir).personal_dir()
    assert personal is not None
    (personal / Files.MODEL).write_bytes(b"not an ONNX model")
    with pytest.raises(LuncherError) as damaged:
        healthyluncher.open(lun.models_dir).predict(photos["green"][:1])
    message = str(damaged.value)
    assert "run `Luncher.undo()` to go back one step" in message, message
    assert "`Luncher.predict(photos, base=True)` still works" in message, message
    assert "luncher " not in message.replace(str(lun.models_dir), "")
    one_line_error(
        run("predict", photos["green"][0]), "run `luncher undo`", "`luncher predict --base`"
    )


def test_flags_and_numbers_of_the_wrong_type_are_refused_not_guessed(
    lun, photos, pt_model, tmp_path
):
    """make_updatable(trainable_layers="2") raised a bare TypeError and hyperparameters={}
    an AttributeError; a string flag was read as True, so reset(purge="no") purged and
    int8="no" asked for calibration photos. Each is now one LuncherError, nothing changed."""
    lun.retrain("healthy", photos["red"][:1])
    before = lun.status()
    wrong_for_make_updatable = {
        "trainable_layers must be a whole number, not '2'": {"trainable_layers": "2"},
        "hyperparameters must be a Hyperparameters": {"hyperparameters": {"epochs": 3}},
        "int8 must be True or False, not 'no'": {"int8": "no"},
        "force must be True or False, not 'yes'": {"force": "yes"},
    }
    for words, options in wrong_for_make_updatable.items():
        with pytest.raises(LuncherError, match=re.escape(words)):
            healthyluncher.make_updatable(pt_model, **{"force": True, **options})
    refusals = {
        "purge must be True or False, not 'no'": lambda: lun.reset(purge="no"),  # type: ignore[arg-type]
        "save must be True or False": lambda: lun.retrain("healthy", photos["red"], save=1),  # type: ignore[arg-type]
        "new_label must be True or False": lambda: lun.retrain(
            "pie",
            photos["red"],
            new_label="yes",  # type: ignore[arg-type]
        ),
        "base must be True or False": lambda: lun.predict(photos["red"], base="no"),  # type: ignore[arg-type]
        "force must be True or False": lambda: lun.export_backup(tmp_path / "b.tar.gz", force=0),  # type: ignore[arg-type]
        "progress must be a function, not 5": lambda: lun.forget(photos["red"], progress=5),  # type: ignore[arg-type]
        "on_wait must be a function": lambda: healthyluncher.open(lun.models_dir, on_wait=3),  # type: ignore[arg-type]
        "a label must be text, not 3": lambda: lun.examples(label=3),  # type: ignore[arg-type]
        "a label must be text, not 5": lambda: lun.remove_label(5),  # type: ignore[arg-type]
    }
    for words, operation in refusals.items():
        with pytest.raises(LuncherError, match=re.escape(words)):
            operation()
    after = lun.status()
    assert (after.examples_per_label, after.retrains, after.undo_steps) == (
        before.examples_per_label,
        before.retrains,
        before.undo_steps,
    )
    assert not (tmp_path / "b.tar.gz").exists()


def test_a_retrain_returns_its_duplicates_and_whether_it_changed_anything(lun, photos):
    red = photos["red"]
    state = lun.models_dir / STATE_FILE
    first = lun.retrain("healthy", [red[0], red[0].read_bytes(), red[1]])
    assert isinstance(first.duplicates[0], healthyluncher.DuplicatePhoto)
    assert [(str(d.path), d.reason) for d in first.duplicates] == [
        ("<image 1>", f"the same photo as {red[0]}")
    ]
    assert [p.path for p in first.photos] == [red[0], red[1]] and first.changed
    written = state.read_bytes()
    again = lun.retrain("healthy", red[:2])
    assert not again.changed and again.photos == () and again.failures == ()
    assert [d.reason for d in again.duplicates] == ["already taught as 'healthy'"] * 2
    assert again.examples_per_label == {"healthy": 2} == first.examples_per_label
    assert again.final_loss == first.final_loss
    assert state.read_bytes() == written and lun.status().undo_steps == 1
    third = lun.retrain("healthy", red)
    assert third.changed and [p.path for p in third.photos] == [red[2]]
    assert len(third.duplicates) == 2 and lun.status().undo_steps == 2
