"""The luncher CLI end to end on tiny real ONNX models and the real training API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from healthyluncher.runtime import training_api
from healthyluncher.store import STATE_FILE, Files, ModelStore
from tests.conftest import needs_ort, one_line_error, solid
from tests.models import keras_style, pytorch_style


def probabilities(run, *paths: Path, base: bool = False) -> dict[str, dict[str, float]]:
    args = ["predict", "--json", *paths] + (["--base"] if base else [])
    result = run(*args)
    assert result.code == 0, result
    return {str(row["path"]): row["probabilities"] for row in result.json_lines()}


@needs_ort
def test_make_updatable_writes_artifacts_that_load(run, pt_model, models_dir):
    result = run("make-updatable", pt_model, "--trainable-layers", "2")
    assert result.code == 0, result
    assert "conv2" in result.stdout and "trainable" in result.stdout and "frozen" in result.stdout
    store = ModelStore(models_dir)
    base = store.base_dir()
    assert base is not None
    meta = json.loads((base / Files.META).read_text())
    assert meta["labels"] == ["healthy", "fast_food"]
    assert meta["trainable_params"] == ["conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]
    assert [layer["trainable"] for layer in meta["layers"]] == [False, True, True]
    api = training_api()
    artifacts = base / Files.ARTIFACTS
    state = api.CheckpointState.load_checkpoint(str(artifacts / "checkpoint"))
    module = api.Module(
        str(artifacts / "training_model.onnx"), state, str(artifacts / "eval_model.onnx")
    )
    api.Optimizer(str(artifacts / "optimizer_model.onnx"), module)
    assert sorted(name for name, _ in state.parameters) == sorted(meta["trainable_params"])


def test_predict_json_is_well_formed(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    result = run("predict", "--json", photos["red"][0].parent)
    assert result.code == 0, result
    rows = result.json_lines()
    assert [Path(str(r["path"])).name for r in rows] == ["r0.png", "r1.png", "r2.png"]
    for row in rows:
        assert set(row) == {"path", "label", "probability", "probabilities"}
        probs = row["probabilities"]
        assert isinstance(probs, dict) and set(probs) == {"healthy", "fast_food"}
        assert abs(sum(probs.values()) - 1) < 1e-5
        assert row["probability"] == max(probs.values())
        assert row["label"] == max(probs, key=probs.get)


def test_predict_table_for_people(run, pt_model, photos, tmp_path, monkeypatch):
    assert run("make-updatable", pt_model).code == 0
    monkeypatch.chdir(tmp_path)
    result = run("predict", "red/r0.png", "green/g0.jpg")
    assert result.code == 0, result
    assert "r0.png" in result.stdout and "base model" in result.stdout
    assert "healthy" in result.stdout and "%" in result.stdout
    # Not a terminal: plain columns, one photo per line, that awk can read.
    title, header, *rows = result.stdout.splitlines()
    assert title == "Predictions (base model)"
    assert header.split() == ["photo", "label", "probability", "healthy", "fast_food"]
    json_rows = run("predict", "--json", "red/r0.png", "green/g0.jpg").json_lines()
    for line, row in zip(rows, json_rows, strict=True):
        path, label, probability, *_ = line.split()
        assert (path, label) == (row["path"], row["label"])
        assert probability == f"{row['probability']:.1%}"
    assert not any(ch in result.stdout for ch in "│┃━─")


@pytest.mark.parametrize("factory", [pytorch_style, keras_style], ids=["pytorch", "keras"])
def test_retrain_flips_the_trained_photos_and_reset_restores_the_base(
    run, factory, tmp_path, photos
):
    model = factory(tmp_path / "model.onnx")
    assert run("make-updatable", model).code == 0
    red = photos["red"]
    before = probabilities(run, *red)
    label = min(("healthy", "fast_food"), key=lambda k: before[str(red[0])][k])
    assert all(before[str(p)][label] < 0.5 for p in red)

    short = run("retrain", "--label", label, "--epochs", "2", "--views", "1", "--json", *red)
    assert short.code == 0, short
    summary = short.json_lines()[0]
    assert all(p["after"] > p["before"] for p in summary["photos"])

    result = run("retrain", "--label", label, "--epochs", "60", "--json", *red)
    assert result.code == 0, result
    after = probabilities(run, *red)
    assert all(after[str(p)][label] > 0.5 for p in red), after
    summary = result.json_lines()[0]
    assert summary["examples_per_label"] == {label: 3}
    assert all(p["after"] > 0.5 for p in summary["photos"])
    # The summary's "after" is what predict now says.
    for photo in summary["photos"]:
        assert abs(photo["after"] - after[photo["path"]][label]) < 1e-4

    # --base ignores the personalization.
    assert probabilities(run, *red, base=True) == before

    reset = run("reset")
    assert reset.code == 0 and "one `luncher undo` away" in reset.stdout
    assert probabilities(run, *red) == before
    # A reset can be undone: the personalization comes back exactly.
    assert run("undo").code == 0
    assert probabilities(run, *red) == after
    purge = run("reset", "--purge")
    assert purge.code == 0 and "Removed" in purge.stdout
    assert probabilities(run, *red) == before
    assert run("undo").code == 1  # nothing left to bring back


def test_second_retrain_reuses_cached_inputs(run, pt_model, photos, monkeypatch):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    from healthyluncher.embedder import Embedder

    def no_backbone(self, batch):
        raise AssertionError("the frozen part ran again")

    monkeypatch.setattr(Embedder, "_run_frozen", no_backbone)
    # Taught again with another label (with the same one, nothing would change).
    result = run("retrain", "--label", "fast_food", "--json", *photos["red"])
    assert result.code == 0, result
    said = run("retrain", "--label", "healthy", *photos["red"]).stdout
    assert "3 photo(s) came from the cache" in said
    # No photo was new: "8 view(s) per new photo" spoke of views none of them got
    assert "per new photo" not in said, said


def test_examples_accumulate_and_relabel(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"healthy": 3, "fast_food": 3}
    assert status["predicting_with"] == "personalized"
    # The same photo taught again with another label moves, it is not counted twice.
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"healthy": 2, "fast_food": 4}
    assert status["retrains"] == 3


def test_status_tells_the_truth_before_and_after(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["predicting_with"] == "base" and status["examples_per_label"] == {}
    assert status["models_dir"] == str(models_dir)
    assert run("retrain", "--label", "healthy", "--epochs", "3", "--save", *photos["red"]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["predicting_with"] == "personalized"
    assert status["hyperparameters"]["epochs"] == 3 and status["last_retrain"]
    assert run("reset").code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["predicting_with"] == "base" and status["examples_per_label"] == {}
    human = run("status")
    assert "the base model" in human.stdout


# -- errors ------------------------------------------------------------------------------


def test_refuses_a_file_that_is_not_onnx(run, tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    one_line_error(run("make-updatable", bogus), "not an ONNX model")


@pytest.mark.parametrize("location", ["weights.data", "../outside.data"])
def test_external_weights_that_cannot_be_read_are_named_not_called_not_onnx(
    run, pt_model, tmp_path, location
):
    """A model copied without its external data file was "not an ONNX model (ValidationError)"."""
    model = onnx.load(str(pt_model))
    onnx.save(model, str(pt_model), save_as_external_data=True, size_threshold=0)
    model = onnx.load(str(pt_model), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(pt_model))
    line = one_line_error(run("make-updatable", pt_model), location)
    assert "not an ONNX model" not in line


def test_refuses_a_missing_file(run, tmp_path):
    one_line_error(run("make-updatable", tmp_path / "nope.onnx"), "no such file")


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_refuses_a_model_without_image_input(run, tmp_path):
    w = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "tabular",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    one_line_error(
        run("make-updatable", _save(model, tmp_path / "t.onnx"), "--labels", "a,b"),
        "not an image",
    )


@pytest.mark.parametrize("side", [0, -5])
def test_refuses_an_image_input_with_a_side_of_zero_or_less(run, pt_model, side):
    model = onnx.load(str(pt_model))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = side
    onnx.save(model, str(pt_model))
    # It was ONNX Runtime's "Got invalid dimensions" (0) or "--resize -6 is smaller" (-5).
    line = one_line_error(run("make-updatable", pt_model), "not an image", f"{side}")
    assert "resize" not in line


@pytest.mark.parametrize("change", ["custom domain", "opset 1"])
def test_an_op_onnx_cannot_infer_is_one_line(run, pt_model, change):
    model = onnx.load(str(pt_model))
    if change == "custom domain":
        model.opset_import.add(domain="com.example", version=1)
        model.graph.node[1].domain = "com.example"  # relu1: an op only its vendor knows
    else:
        model.opset_import[0].version = 1
    onnx.save(model, str(pt_model))
    # It was "unexpected ValueError: The following names were not found in value_infos".
    one_line_error(run("make-updatable", pt_model), "cannot cut the model", "infer")


@pytest.mark.parametrize(
    ("tensor", "value"), [("fc.weight", np.nan), ("conv1.weight", np.inf), ("conv2.bias", 3e38)]
)
def test_a_model_whose_output_is_not_finite_is_refused(run, pt_model, photos, tensor, value):
    model = onnx.load(str(pt_model))
    for init in model.graph.initializer:
        if init.name == tensor:
            weights = numpy_helper.to_array(init).copy()
            weights.flat[0] = value  # 3e38 is finite, but the logits overflow float32
            init.CopyFrom(numpy_helper.from_array(weights, tensor))
    onnx.save(model, str(pt_model))
    # It became a base that predicted null probabilities with exit code 0.
    one_line_error(run("make-updatable", pt_model), "NaN or infinity")


@pytest.mark.parametrize("oddity", ["node name", "input name", "file name", "batch 5000"])
def test_a_model_whose_meta_json_would_be_refused_is_refused_first(
    run, pt_model, photos, tmp_path, oddity
):
    """make-updatable wrote meta.json values its own reader refuses: every later command,
    predict included, then failed on the new base."""
    if oddity == "batch 5000":
        pt_model = pytorch_style(tmp_path / "batch.onnx", batch=5000)
    model = onnx.load(str(pt_model))
    if oddity == "node name":
        model.graph.node[0].name = "conv\n1"
    elif oddity == "input name":
        model.graph.input[0].name = model.graph.node[0].input[0] = "im\x07age"
    elif oddity == "file name":
        pt_model = tmp_path / "tiny\x1b.onnx"
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), "cannot be a base")
    assert run("predict", photos["red"][0]).code == 1  # still no base, not a damaged one
    assert run("make-updatable", pytorch_style(tmp_path / "plain.onnx")).code == 0


def test_refuses_several_inputs(run, tmp_path):
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
            helper.make_node("Add", ["g", "extra"], ["y"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    one_line_error(
        run("make-updatable", _save(model, tmp_path / "t.onnx"), "--labels", "a,b"),
        "2 inputs",
    )


def test_refuses_a_label_count_that_does_not_match(run, pt_model):
    one_line_error(run("make-updatable", pt_model, "--labels", "a,b,c"), "3 labels", "2 outputs")


@pytest.mark.parametrize("labels", ["a\x1b[31m,b", "x" * 65 + ",b", "a, a"])
def test_labels_given_are_checked_before_they_become_a_base(run, pt_model, photos, labels):
    """A label that every later read of meta.json refuses must not be written there: it
    left a models directory where no command, make-updatable --force included, worked."""
    one_line_error(run("make-updatable", pt_model, "--labels", labels), "label")
    assert run("make-updatable", pt_model).code == 0
    assert run("predict", photos["red"][0]).code == 0


# "café" as macOS writes folder names (e + a combining accent) and as a keyboard types it.
CAFE_NFD, CAFE_NFC = "cafe\u0301", "caf\u00e9"


@pytest.mark.parametrize("twin", [("healthy", "healthy "), (CAFE_NFD, CAFE_NFC)])
def test_example_folders_that_name_one_label_twice_are_refused(
    run, pt_model, photos, tmp_path, twin
):
    examples = tmp_path / "examples"
    for name, kind in zip(twin, ("red", "green"), strict=True):
        for photo in photos[kind]:
            solid(examples / name / photo.name, (200, 40, 40) if kind == "red" else (40, 200, 40))
    # It became a base labelled (healthy, healthy) that no command could load again.
    one_line_error(run("make-updatable", pt_model, "--examples", examples), "same label")
    assert run("make-updatable", pt_model).code == 0


def test_a_label_typed_in_another_unicode_form_is_the_same_label(run, pt_model, photos, tmp_path):
    """A café folder made on macOS and "café" typed in a terminal are one label: the
    typed one was "not a label ... did you mean 'café'?", and a twin with --new-label."""
    examples = tmp_path / "examples"
    for name, kind in ((CAFE_NFD, "red"), ("other", "green")):
        for photo in photos[kind]:
            solid(examples / name / photo.name, (200, 40, 40) if kind == "red" else (40, 200, 40))
    assert run("make-updatable", pt_model, "--examples", examples).code == 0
    for extra in ((), ("--new-label",)):
        result = run("retrain", "--label", CAFE_NFC, *extra, photos["red"][0])
        assert result.code == 0, result
    assert len(json.loads(run("status", "--json").stdout)["labels"]) == 2
    assert run("retrain", "--label", "dessert", "--new-label", photos["green"][0]).code == 0
    one_line_error(run("labels", "rename", "dessert", CAFE_NFC), "already a label")
    twins = run("make-updatable", pt_model, "--force", "--labels", f"{CAFE_NFD},{CAFE_NFC}")
    one_line_error(twins, "unique")


def test_every_command_that_names_a_label_takes_it_in_either_unicode_form(run, pt_model, photos):
    """`examples --label`, `labels rename` and `labels remove` compared labels exactly: a
    label taught from a macOS folder name (NFD) was "not a label" when typed (NFC)."""
    assert run("make-updatable", pt_model).code == 0
    taught = run("retrain", "--label", CAFE_NFD, "--new-label", *photos["red"])
    assert taught.code == 0, taught
    listed = run("examples", "--label", CAFE_NFC, "--json")
    assert listed.code == 0, listed
    assert [row["label"] for row in listed.json_lines()] == [CAFE_NFD] * 3
    assert run("labels", "rename", CAFE_NFC, "coffee").code == 0
    assert run("labels", "rename", "coffee", CAFE_NFD).code == 0
    removed = run("labels", "remove", CAFE_NFC)
    assert removed.code == 0, removed
    assert json.loads(run("status", "--json").stdout)["labels"] == ["healthy", "fast_food"]


def test_the_api_checks_the_labels_it_is_given(pt_model, models_dir):
    import healthyluncher

    for labels, words in ((["a", 2], "must be text"), ("healthy,fast_food", "list")):
        with pytest.raises(healthyluncher.LuncherError, match=words):
            healthyluncher.make_updatable(pt_model, labels=labels, force=True)  # type: ignore[arg-type]
    assert healthyluncher.make_updatable(pt_model, force=True).meta.labels == (
        "healthy",
        "fast_food",
    )


def test_refuses_a_model_without_labels(run, tmp_path):
    model = pytorch_style(tmp_path / "nolabels.onnx", labels=None)
    one_line_error(run("make-updatable", model), "--labels")


def test_refuses_more_trainable_layers_than_the_model_has(run, pt_model):
    one_line_error(
        run("make-updatable", pt_model, "--trainable-layers", "4"), "more than the 3 layers"
    )


@needs_ort
def test_refuses_an_op_without_gradient_in_the_trainable_part(run, tmp_path):
    model = onnx.load(str(pytorch_style(tmp_path / "m.onnx")))
    gemm = model.graph.node[-1]
    gemm.output[0] = "pre"
    model.graph.node.append(helper.make_node("Floor", ["pre"], ["logits"], name="floor"))
    one_line_error(
        run("make-updatable", _save(model, tmp_path / "floor.onnx")), "Floor", "no gradient"
    )


def test_refuses_to_replace_a_base_without_force(run, pt_model, tmp_path, photos):
    assert run("make-updatable", pt_model).code == 0
    other = keras_style(tmp_path / "other.onnx")
    one_line_error(run("make-updatable", other), "--force")
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    replaced = run("make-updatable", other, "--force")
    assert replaced.code == 0, replaced
    assert "one `luncher undo` away" in replaced.stdout
    assert run("status", "--json").json_lines()[0]["base_name"] == "other"


@pytest.mark.parametrize("factory", [pytorch_style, keras_style], ids=["pytorch", "keras"])
def test_a_new_label_grows_the_head_and_keeps_the_old_rows(run, factory, tmp_path, photos):
    model_path = factory(tmp_path / "model.onnx")
    assert run("make-updatable", model_path).code == 0
    result = run(
        "retrain", "--label", "dessert", "--new-label", "--epochs", "40", "--json", *photos["red"]
    )
    assert result.code == 0, result
    summary = result.json_lines()[0]
    assert all(p["before"] == 0 and p["after"] > 0.5 for p in summary["photos"])

    rows = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert all(set(r["probabilities"]) == {"healthy", "fast_food", "dessert"} for r in rows)
    assert [r["label"] for r in rows[:3]] == ["dessert"] * 3
    assert run("status", "--json").json_lines()[0]["labels"] == ["healthy", "fast_food", "dessert"]

    # The grown model holds the base's rows for the old classes untouched by the growth:
    # its weights are (C+1) rows whose first C rows were trained from the base's.
    store = ModelStore(Path(run("status", "--json").json_lines()[0]["models_dir"]))
    personal = store.personal_dir()
    assert personal is not None and (personal / Files.HEAD).is_file()
    grown = onnx.load(str(personal / Files.MODEL))
    shapes = {t.name: tuple(t.dims) for t in grown.graph.initializer}
    if factory is pytorch_style:
        assert shapes["fc.weight"] == (3, 8) and shapes["fc.bias"] == (3,)
    else:
        assert shapes["dense/kernel"] == (6, 3) and shapes["dense/bias"] == (3,)

    # After reset the model is the base again, with its two labels.
    assert run("reset").code == 0
    rows = run("predict", "--json", photos["red"][0]).json_lines()
    assert set(rows[0]["probabilities"]) == {"healthy", "fast_food"}


def test_growing_keeps_old_class_weights_exactly(tmp_path):
    from healthyluncher import heads

    model = onnx.load(str(pytorch_style(tmp_path / "m.onnx")))
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    axes = heads.class_axes(model, 2)
    assert axes == {"fc.weight": 0, "fc.bias": 0}
    heads.grow_classes(model, axes, 2)
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(after["fc.weight"][:2], before["fc.weight"])
    np.testing.assert_array_equal(after["fc.weight"][2:], 0)
    np.testing.assert_array_equal(after["fc.bias"][:2], before["fc.bias"])
    np.testing.assert_array_equal(after["conv2.weight"], before["conv2.weight"])
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4


def test_retrain_with_no_images_found(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("retrain", "--label", "healthy", empty), "no image files")


def test_retrain_skips_a_bad_photo_trains_the_rest_and_exits_1(run, pt_model, photos, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    bad = tmp_path / "red" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    result = run("retrain", "--label", "healthy", "--json", bad.parent)
    assert result.code == 1
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    summary = result.json_lines()[0]
    assert len(summary["photos"]) == 3 and summary["skipped"][0]["path"].endswith("broken.jpg")


def test_no_base_yet_is_a_clear_error(run, photos):
    one_line_error(run("predict", photos["red"][0]), "make-updatable")


def test_usage_errors_exit_2(run):
    assert run("predict").code == 2
    assert run("retrain", "x.jpg").code == 2  # --label is required
    assert run("make-updatable", "m.onnx", "--trainable-layers", "0").code == 2


def test_an_empty_photo_argument_is_refused_not_read_as_the_current_directory(
    run, pt_model, photos, tmp_path, monkeypatch
):
    """`luncher forget "$PHOTO"` with PHOTO unset forgot every photo under the current
    directory, and with them the undo history."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    monkeypatch.chdir(tmp_path)  # where the taught photos are
    for command in (("forget",), ("predict",), ("retrain", "--label", "healthy")):
        result = run(*command, "")
        assert result.code == 2 and "an empty path" in result.stderr, result
    import healthyluncher

    with pytest.raises(healthyluncher.LuncherError, match="empty path"):
        healthyluncher.open().forget("")
    assert json.loads(run("status", "--json").stdout)["examples_per_label"] == {"fast_food": 3}


def test_a_name_too_long_for_the_file_system_is_one_line(run, pt_model, photos):
    assert run("make-updatable", pt_model).code == 0
    result = run("predict", "x" * 300, photos["red"][0])
    one_line_error(result, "cannot read", "too long")  # was "unexpected OSError"
    assert "fast_food" in result.stdout


@pytest.mark.parametrize("command", ["make-updatable", "predict", "retrain", "reset", "status"])
def test_every_command_has_help_with_an_example(run, command):
    for flag in ("--help", "-h"):
        result = run(command, flag)
        assert result.code == 0
        assert "Example: luncher" in result.stdout


def test_unexpected_errors_are_one_line_unless_debug(run, pt_model, photos, monkeypatch):
    assert run("make-updatable", pt_model).code == 0
    import healthyluncher.predictor as predicting

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(predicting.Predictor, "predict", boom)
    one_line_error(run("predict", photos["red"][0]), "disk on fire", "--debug")
    with pytest.raises(RuntimeError):
        run("--debug", "predict", photos["red"][0])


# -- atomicity ---------------------------------------------------------------------------


def test_interrupted_publish_leaves_the_previous_model(
    run, pt_model, photos, models_dir, monkeypatch
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    good = probabilities(run, *photos["red"], *photos["green"])
    state_before = (models_dir / STATE_FILE).read_bytes()

    import healthyluncher.personal as personalize

    original = personalize.save_examples

    def interrupted(examples, path):
        original(examples, path)
        raise KeyboardInterrupt  # Ctrl-C after half the personal files are written

    monkeypatch.setattr(personalize, "save_examples", interrupted)
    result = run("retrain", "--label", "fast_food", *photos["green"])
    assert result.code == 130 and "not changed" in result.stderr
    assert (models_dir / STATE_FILE).read_bytes() == state_before
    assert probabilities(run, *photos["red"], *photos["green"]) == good
    leftovers = [p.name for p in models_dir.iterdir() if p.name.startswith(".staging")]
    assert leftovers == []


def test_a_killed_writer_leaves_only_complete_directories(run, pt_model, photos, models_dir):
    """Simulate a crash after a staged directory was renamed but before state.json moved."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    good = probabilities(run, *photos["red"])
    store = ModelStore(models_dir)
    orphan = models_dir / "personal-deadbeef0000"
    orphan.mkdir()
    (orphan / Files.MODEL).write_bytes(b"half a model")
    stale = models_dir / ".staging-123"
    stale.mkdir()
    assert probabilities(run, *photos["red"]) == good
    # The next writer removes what no state names.
    assert run("retrain", "--label", "healthy", *photos["green"]).code == 0
    assert not orphan.exists() and not stale.exists()
    assert store.personal_dir() is not None


def test_models_dir_option_beats_the_environment(run, pt_model, tmp_path, models_dir):
    elsewhere = tmp_path / "elsewhere"
    assert run("--models-dir", elsewhere, "make-updatable", pt_model).code == 0
    assert (elsewhere / STATE_FILE).is_file()
    assert not (models_dir / STATE_FILE).exists()


def test_models_dir_defaults_to_the_user_data_dir(monkeypatch, tmp_path):
    from healthyluncher.store import resolve_models_dir

    monkeypatch.delenv("LUNCHER_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert resolve_models_dir() == tmp_path / "data" / "healthyluncher" / "models"
    monkeypatch.setenv("LUNCHER_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_models_dir() == tmp_path / "env"
    assert resolve_models_dir(tmp_path / "opt") == tmp_path / "opt"


def test_a_models_directory_named_only_spaces_is_refused_not_made(
    run, monkeypatch, tmp_path, pt_model
):
    """`LUNCHER_MODELS_DIR=" "` (a slip) or `--models-dir "  "` set up the shipped base in a
    new folder named by the spaces in the current directory, without a word."""
    import healthyluncher

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUNCHER_BUNDLED_MODEL", str(pt_model))  # what a new folder gets
    one_line_error(run("--models-dir", "  ", "status"), "--models-dir '  ' is only spaces")
    with pytest.raises(healthyluncher.LuncherError, match="models_dir ' ' is only spaces"):
        healthyluncher.open(" ")
    monkeypatch.setenv("LUNCHER_MODELS_DIR", "   ")
    one_line_error(run("predict", solid(tmp_path / "p" / "a.png", (10, 200, 30))), "only spaces")
    with pytest.raises(healthyluncher.LuncherError, match="LUNCHER_MODELS_DIR='   ' is only"):
        healthyluncher.open()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p", "tiny_pt.onnx"]


def test_a_full_disk_keeps_the_personalization(run, pt_model, photos, models_dir, monkeypatch):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    good = probabilities(run, *photos["red"])

    import errno

    import healthyluncher.personal as personalize

    def disk_full(examples, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(personalize, "save_examples", disk_full)
    one_line_error(
        run("retrain", "--label", "fast_food", *photos["green"]),
        "No space left on device",
        "not changed",
    )
    assert probabilities(run, *photos["red"]) == good


@needs_ort
@pytest.mark.parametrize("where", ["checkpoint", "artifacts"])
def test_a_full_disk_under_onnx_runtime_is_the_disk(run, pt_model, photos, where):
    """ONNX Runtime reports a file it cannot write in C++ text ending 'errno:28': a forget
    was 'unexpected RuntimeError: /onnxruntime_src/...', and a new label's artifacts were
    'ONNX Runtime training fails on the trainable part', as if the model could not train."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0

    def status() -> dict[str, object]:
        shown = run("status", "--json").json_lines()[0]
        return {key: value for key, value in shown.items() if key != "disk_bytes"}

    before = status()
    api = training_api()
    from healthyluncher import artifacts

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "/onnxruntime_src/orttraining/training_api/checkpoint.cc:231 ToFile Failed to "
            "save checkpoint to file: x/checkpoint. error:No space left on device errno:28"
        )

    with pytest.MonkeyPatch.context() as patch:
        if where == "checkpoint":
            patch.setattr(api.CheckpointState, "save_checkpoint", full)
            result = run("forget", photos["red"][0])
        else:
            patch.setattr(artifacts, "write", full)
            result = run("retrain", "--label", "dessert", "--new-label", *photos["green"])
    one_line_error(result, "cannot write to", "No space left on device", "not changed")
    assert status() == before  # the photos' cached inputs may stay until the next change


def test_two_writers_never_overlap(pt_model, photos, models_dir):
    """A second luncher process waits for the lock instead of writing at the same time."""
    import subprocess
    import sys

    from filelock import FileLock

    assert ModelStore(models_dir).read_state().base is None
    code = (
        "import sys; from healthyluncher.cli import main; "
        f"sys.argv = ['luncher', 'make-updatable', {str(pt_model)!r}]; main()"
    )
    lock = FileLock(str(models_dir / ".lock"))
    models_dir.mkdir(parents=True, exist_ok=True)
    with lock:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # blocked on the lock
        assert ModelStore(models_dir).read_state().base is None
    assert proc.wait(timeout=60) == 0
    assert ModelStore(models_dir).read_state().base is not None


@needs_ort
def test_a_model_exported_for_batch_1_trains_and_predicts(run, tmp_path, photos):
    model = pytorch_style(tmp_path / "fixed.onnx", batch=1)
    result = run("make-updatable", model, "--trainable-layers", "2")
    assert result.code == 0, result
    rows = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert len(rows) == 6 and all("label" in r for r in rows)
    label = "healthy" if rows[0]["label"] == "fast_food" else "fast_food"
    assert run("retrain", "--label", label, *photos["red"]).code == 0
    after = run("predict", "--json", *photos["red"]).json_lines()
    assert [r["label"] for r in after] == [label] * 3


def test_sgd_optimizer_as_in_the_core_ml_example(run, pt_model, photos, models_dir):
    result = run("make-updatable", pt_model, "--optimizer", "sgd", "--learning-rate", "0.05")
    assert result.code == 0, result
    assert run("retrain", "--label", "fast_food", "--epochs", "30", *photos["green"]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["hyperparameters"]["optimizer"] == "sgd"
    assert status["hyperparameters"]["learning_rate"] == 0.05


def test_a_retrain_rewrites_the_small_graph_and_copies_the_frozen_weights(
    run, pt_model, photos, models_dir
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    store = ModelStore(models_dir)
    base, personal = store.base_dir(store.read_state()), store.personal_dir()
    assert base is not None and personal is not None
    data = (personal / Files.MODEL_DATA).read_bytes()
    assert data == (base / Files.MODEL_DATA).read_bytes() and len(data) > 800
    skeleton = onnx.load(str(personal / Files.MODEL), load_external_data=False)
    external = [t.name for t in skeleton.graph.initializer if t.data_location == 1]
    assert "conv1.weight" in external and "fc.weight" not in external
    # The linked weights are the base's: the personalized model differs only in the head.
    full = onnx.load(str(personal / Files.MODEL))
    original = onnx.load(str(pt_model))
    weights = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    for tensor in original.graph.initializer:
        if not tensor.name.startswith("fc."):
            np.testing.assert_array_equal(weights[tensor.name], numpy_helper.to_array(tensor))


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "not an object",
        "names a stranger",
        "empty object",
        "format a string",
        "a link to /dev/zero",
        "a named pipe",
        "a directory",
        "names a list",  # 'unexpected TypeError: unhashable type: list'
        "history a number",  # 'unexpected TypeError: int object is not iterable'
        "a step names an object",
    ],
)
def test_a_damaged_state_json_never_blocks_and_repair_rebuilds_it(
    run, pt_model, photos, models_dir, damage
):
    """Before, a damaged state.json blocked every command, predict --base and export
    included, and the only advice was `reset`, which threw the intact personalization
    away. Readers now use the newest complete state the directories hold; writers and
    `luncher repair` write it back."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    assert run("retrain", "--label", "healthy", *photos["green"][:1]).code == 0
    personal = probabilities(run, *photos["red"], *photos["green"])
    state = models_dir / STATE_FILE
    # Not a file: /dev/zero filled the memory ("unexpected MemoryError"), a named pipe
    # blocked every command forever, a directory blocked every command.
    if damage in ("a link to /dev/zero", "a named pipe", "a directory"):
        state.unlink()
        if damage == "a named pipe":
            os.mkfifo(state)
        elif damage == "a directory":
            state.mkdir()
        else:
            state.symlink_to("/dev/zero")
    else:
        state.write_text(
            {
                "truncated": "{ truncated",
                "not an object": "[1, 2]",
                "names a stranger": '{"format": 1, "base": "../../etc", "personal": null}',
                "empty object": "{}",  # was "an unknown format; written by a newer luncher?"
                "format a string": '{"format": "1", "base": null}',
                "names a list": '{"format": 1, "base": ["base-0123456789ab"], "personal": null}',
                "history a number": '{"format": 1, "base": null, "personal": null, "history": 3}',
                "a step names an object": '{"format": 1, "base": null, "history": [{"base": {}}]}',
            }[damage]
        )
    assert probabilities(run, *photos["red"], *photos["green"]) == personal
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {
        "fast_food": 3,
        "healthy": 1,
    }
    assert run("predict", "--base", photos["red"][0]).code == 0
    assert run("export", models_dir.parent / "backup.tar.gz").code == 0
    repaired = run("repair")
    assert repaired.code == 0 and "rebuilt" in repaired.stdout, repaired
    assert run("repair").stdout.startswith("state.json is intact")
    # The older personalized copy came back as an undo step.
    assert run("undo").code == 0
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {"fast_food": 3}


def test_a_writer_repairs_a_damaged_state_json_itself(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    (models_dir / STATE_FILE).write_text("{ truncated")
    assert run("retrain", "--label", "healthy", *photos["green"]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"fast_food": 3, "healthy": 3}


def _copies_by_examples(models_dir: Path) -> dict[int, Path]:
    """Each personalized copy, by how many examples it holds (each retrain below adds some)."""
    found = {}
    for path in models_dir.glob("personal-*"):
        meta = json.loads((path / Files.META).read_text())
        found[sum(meta["examples_per_label"].values())] = path
    return found


@pytest.mark.parametrize("times", ["the same second", "a clock set back"])
def test_repair_finds_the_newest_copy_whatever_the_file_times(
    run, pt_model, photos, models_dir, times
):
    """`repair` after losing state.json took the copy whose meta.json was modified last:
    two retrains in the same second (FAT, HFS+, network shares keep 1-2 s) tied, and after
    a clock set back the older copy won, so the newest personalization became an undo step
    and `status` showed the one before. Each copy's meta.json now holds its number."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    assert run("retrain", "--label", "healthy", *photos["green"][:1]).code == 0
    assert run("retrain", "--label", "healthy", *photos["green"][1:]).code == 0
    copies = _copies_by_examples(models_dir)
    assert sorted(copies) == [3, 4, 6]
    for count, path in copies.items():  # newest oldest (set back) or all alike (ties)
        stamp = 1_700_000_000 + (0 if times == "the same second" else 100 * (6 - count))
        os.utime(path / Files.META, (stamp, stamp))
        os.utime(path, (stamp, stamp))
    (models_dir / STATE_FILE).unlink()
    assert run("repair").code == 0
    newest = {"fast_food": 3, "healthy": 3}
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == newest
    assert run("undo").code == 0
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {
        "fast_food": 3,
        "healthy": 1,
    }
    assert run("undo").code == 0
    assert run("status", "--json").json_lines()[0]["examples_per_label"] == {"fast_food": 3}


def test_repair_of_copies_made_before_they_were_numbered_goes_by_their_time(
    run, pt_model, photos, models_dir
):
    """Copies of an older luncher have no number in their meta.json: their time orders them,
    as before, and a copy with a number is newer than every copy without one."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    assert run("retrain", "--label", "healthy", *photos["green"][:1]).code == 0
    for count, path in _copies_by_examples(models_dir).items():
        meta = json.loads((path / Files.META).read_text())
        assert isinstance(meta.pop("sequence"), int)  # written by this version
        (path / Files.META).write_text(json.dumps(meta))
        stamp = 1_700_000_000 + 100 * count  # the newer, the later
        os.utime(path / Files.META, (stamp, stamp))
    base = next(models_dir.glob("base-*")) / Files.META
    meta = json.loads(base.read_text())
    del meta["sequence"]
    base.write_text(json.dumps(meta))
    (models_dir / STATE_FILE).unlink()
    assert run("repair").code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"fast_food": 3, "healthy": 1}
    assert run("retrain", "--label", "healthy", *photos["green"][1:]).code == 0
    newest = next(p for n, p in _copies_by_examples(models_dir).items() if n == 6)
    assert json.loads((newest / Files.META).read_text())["sequence"] == 1  # after none
    os.utime(newest / Files.META, (1_600_000_000, 1_600_000_000))  # older than the others
    (models_dir / STATE_FILE).unlink()
    assert run("repair").code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"fast_food": 3, "healthy": 3}


@pytest.mark.parametrize("value", ['"7"', "true", "0", "-1", "1.5", "null"])
def test_a_copy_number_that_is_not_one_is_refused_as_damage(
    run, pt_model, photos, models_dir, value
):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    personal = ModelStore(models_dir).personal_dir()
    assert personal is not None
    meta = json.loads((personal / Files.META).read_text())
    meta["sequence"] = json.loads(value)
    (personal / Files.META).write_text(json.dumps(meta))
    if value == "null":  # as if absent: an older copy
        assert run("status").code == 0
        return
    one_line_error(run("predict", photos["red"][0]), "sequence", "undo")


@pytest.mark.parametrize("damage", ["personal meta", "personal model", "personal weights file"])
def test_a_damaged_personal_copy_points_to_undo(run, pt_model, photos, models_dir, damage):
    assert run("make-updatable", pt_model).code == 0
    base = probabilities(run, *photos["red"])
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    store = ModelStore(models_dir)
    personal = store.personal_dir()
    assert personal is not None
    if damage == "personal meta":
        (personal / Files.META).write_text("not json")
    elif damage == "personal model":
        data = (personal / Files.MODEL).read_bytes()
        (personal / Files.MODEL).write_bytes(data[: len(data) // 2])
    else:
        (personal / Files.MODEL_DATA).unlink()
    one_line_error(run("predict", photos["red"][0]), "undo")
    assert probabilities(run, *photos["red"], base=True) == base
    result = run("undo")
    assert result.code == 0, result
    assert probabilities(run, *photos["red"]) == base


@pytest.mark.parametrize("copy", ["base", "personal"])
def test_a_meta_value_the_checks_refuse_names_its_file_and_the_way_out(
    run, pt_model, photos, models_dir, copy
):
    """Duplicate labels in meta.json were a bare "labels must be unique", from every command,
    make-updatable --force included: nothing said which file, nor how to get out."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    store = ModelStore(models_dir)
    folder = store.base_dir() if copy == "base" else store.personal_dir()
    assert folder is not None
    meta = json.loads((folder / Files.META).read_text())
    meta["labels"] = ["a", "a"]
    (folder / Files.META).write_text(json.dumps(meta))
    way_out = "make-updatable" if copy == "base" else "undo"
    one_line_error(run("status"), str(folder / Files.META), "must be unique", way_out)
    result = run("make-updatable", pt_model, "--force") if copy == "base" else run("undo")
    assert result.code == 0, result
    assert run("predict", photos["red"][0]).code == 0


def test_damaged_examples_are_a_clear_error(run, pt_model, photos, models_dir):
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    personal = ModelStore(models_dir).personal_dir()
    assert personal is not None
    (personal / Files.EXAMPLES).write_bytes(b"PK\x03\x04 torn")
    one_line_error(run("retrain", "--label", "healthy", *photos["green"]), "damaged", "undo")
    assert run("undo").code == 0
    assert run("retrain", "--label", "healthy", *photos["green"]).code == 0


def test_views_follow_the_budget_and_photos_keep_the_views_they_got(
    run, pt_model, photos, models_dir
):
    assert run("make-updatable", pt_model).code == 0
    few = run("retrain", "--label", "fast_food", "--json", *photos["red"])
    assert few.code == 0, few
    assert few.json_lines()[0]["views_per_photo"] == 8  # 32 views for 3 photos: 8 at most
    exact = run("retrain", "--label", "healthy", "--views", "2", "--json", photos["green"][0])
    assert exact.code == 0, exact
    assert exact.json_lines()[0]["views_per_photo"] == 2
    store = ModelStore(models_dir)
    personal = store.personal_dir()
    assert personal is not None
    with np.load(personal / Files.EXAMPLES) as data:
        per_photo = np.bincount(data["owner"]).tolist()
    assert per_photo == [8, 8, 8, 2]
    # --views applies once; with --save, it is kept: later retrains give exactly 2 again.
    once = run("retrain", "--label", "healthy", "--json", photos["green"][1])
    assert once.json_lines()[0]["views_per_photo"] == 8  # the budget again
    saved = run("retrain", "--label", "healthy", "--views", "2", "--save", photos["green"][1])
    assert saved.code == 0, saved
    again = run("retrain", "--label", "healthy", "--json", photos["green"][2])
    assert again.json_lines()[0]["views_per_photo"] == 2
    assert "2 views per photo" in run("status").stdout
    after = probabilities(run, *photos["red"], *photos["green"])
    assert all(after[str(p)]["fast_food"] > 0.5 for p in photos["red"]), after
    assert all(after[str(p)]["healthy"] > 0.5 for p in photos["green"]), after


@pytest.mark.parametrize("scores", ["kept", "damaged", "missing", "0-d digests", "NaN", "text"])
def test_before_of_a_retrain_is_what_the_last_retrain_said_after(
    run, pt_model, photos, models_dir, scores
):
    """The copy keeps its scores of every example; damaged or missing, they are recomputed."""
    assert run("make-updatable", pt_model).code == 0
    first = run("retrain", "--label", "fast_food", "--json", *photos["red"], photos["green"][0])
    assert first.code == 0, first
    personal = ModelStore(models_dir).personal_dir()
    assert personal is not None
    if scores == "damaged":
        (personal / Files.SCORES).write_bytes(b"PK\x03\x04 torn")
    elif scores == "missing":
        (personal / Files.SCORES).unlink()
    elif scores != "kept":  # arrays of the wrong kind: "0-d digests" was a TypeError
        with np.load(personal / Files.SCORES) as data:
            arrays = {name: data[name] for name in data.files}
        if scores == "0-d digests":
            arrays["digests"] = arrays["digests"][0]
        else:
            probs = arrays["probabilities"]
            arrays["probabilities"] = probs * np.nan if scores == "NaN" else probs.astype(str)
        np.savez(personal / Files.SCORES, **arrays)
    again = run("retrain", "--label", "fast_food", "--json", *photos["red"])
    assert again.code == 0, again
    after = {p["path"]: p["after"] for p in first.json_lines()[0]["photos"]}
    for photo in again.json_lines()[0]["photos"]:
        assert abs(photo["before"] - after[photo["path"]]) < 1e-5, (photo, after)
    # And the new copy's scores are what predict says.
    said = probabilities(run, *photos["red"])
    for photo in again.json_lines()[0]["photos"]:
        assert abs(photo["after"] - said[photo["path"]]["fast_food"]) < 1e-4


@needs_ort
@pytest.mark.parametrize("name", ["checkpoint", "training_model.onnx", "optimizer_model.onnx"])
def test_damaged_training_artifacts_are_one_line_that_says_what_to_do(
    run, pt_model, photos, models_dir, name
):
    """It was "unexpected RuntimeError: /onnxruntime_src/orttraining/...", C++ source text."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    before = probabilities(run, photos["red"][1])
    base = ModelStore(models_dir).base_dir()
    assert base is not None
    (base / Files.ARTIFACTS / name).write_bytes(b"torn")
    result = run("retrain", "--label", "fast_food", photos["red"][1])
    one_line_error(result, "is damaged", "make-updatable")
    assert "onnxruntime_src" not in result.stderr
    assert probabilities(run, photos["red"][1]) == before
    assert run("make-updatable", pt_model, "--keep-personalization").code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][1]).code == 0


def test_a_damaged_frozen_part_says_what_to_do(run, pt_model, photos, models_dir):
    """A retrain of a new photo runs the base's frozen.onnx: damaged, it was ONNX Runtime's
    "INVALID_PROTOBUF" with no way out."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    base = ModelStore(models_dir).base_dir()
    assert base is not None
    (base / Files.FROZEN).write_bytes(b"torn")
    result = run("retrain", "--label", "fast_food", photos["red"][1])
    one_line_error(result, "base model", "damaged", "--keep-personalization")
    assert run("make-updatable", pt_model, "--keep-personalization").code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][1]).code == 0


@pytest.mark.parametrize("damage", ["torn", "missing"])
def test_a_damaged_base_meta_json_names_a_command_that_works_as_written(
    run, pt_model, photos, models_dir, damage
):
    """It named `luncher make-updatable MODEL.onnx` "again", which, run as written, stopped
    at the same damaged meta.json: only --keep-personalization (or --force, which leaves
    the personalization an undo away) gets past it."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", photos["red"][0]).code == 0
    base = ModelStore(models_dir).base_dir()
    assert base is not None
    if damage == "torn":
        (base / Files.META).write_text('{"labels": [')
    else:
        (base / Files.META).unlink()
    line = one_line_error(run("predict", photos["red"][0]), "make-updatable MODEL.onnx")
    command = line.split("`")[1].split()[1:]  # as written, with MODEL.onnx the model
    assert run(*[str(pt_model) if word == "MODEL.onnx" else word for word in command]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["examples_per_label"] == {"fast_food": 1}
    assert run("predict", photos["red"][0]).code == 0


def test_a_damaged_base_weights_file_is_one_line_that_says_what_to_do(
    run, pt_model, photos, models_dir
):
    assert run("make-updatable", pt_model).code == 0
    store = ModelStore(models_dir)
    base = store.base_dir(store.read_state())
    assert base is not None
    (base / Files.MODEL_DATA).write_bytes(b"")  # truncated to nothing
    one_line_error(run("predict", photos["red"][0]), "base model", "make-updatable")
    assert run("make-updatable", pt_model, "--force").code == 0
    assert run("predict", photos["red"][0]).code == 0


def test_one_off_training_options_apply_once_unless_saved(run, pt_model, photos):
    """`retrain --epochs 1` used to become the setting of every later retrain (and of
    forget and upgrades) without a word."""
    assert run("make-updatable", pt_model).code == 0
    default = run("status", "--json").json_lines()[0]["hyperparameters"]
    once = run("retrain", "--label", "fast_food", "--epochs", "2", "--json", *photos["red"])
    assert once.json_lines()[0]["hyperparameters"]["epochs"] == 2  # what it trained with
    assert run("status", "--json").json_lines()[0]["hyperparameters"] == default
    saved = run("retrain", "--label", "healthy", "--epochs", "7", "--save", *photos["green"])
    assert saved.code == 0, saved
    assert run("status", "--json").json_lines()[0]["hyperparameters"]["epochs"] == 7


def test_status_names_the_settings_the_last_retrain_used(run, pt_model, photos):
    """`status` printed the saved settings beside the last retrain's date, so after
    `retrain --epochs 2` it said the last retrain ran the default epochs."""
    assert run("make-updatable", pt_model).code == 0
    default = run("status", "--json").json_lines()[0]["hyperparameters"]
    assert run("retrain", "--label", "fast_food", "--epochs", "2", *photos["red"]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["last_retrain_hyperparameters"]["epochs"] == 2
    assert status["hyperparameters"] == default  # what the next retrain starts from
    lines = run("status").stdout.splitlines()
    last = next(line for line in lines if line.startswith("last retrain"))
    settings = next(line for line in lines if line.startswith("next retrain"))
    assert "2 epochs" in last and f"{default['epochs']} epochs" in settings


def test_predict_sizes_columns_and_counts_photos_inside_a_folder(
    run, pt_model, tmp_path, monkeypatch
):
    """Given a folder, the columns were sized by the folder's name and the progress bar
    counted one photo: rows ran past the header, and 40 photos got no bar."""
    from healthyluncher import cli_output

    album = tmp_path / "a"
    names = [f"a-rather-long-photo-name-{i:02d}.png" for i in range(12)]
    for i, name in enumerate(names):
        solid(album / name, (20 * i, 200 - 10 * i, 40))
    assert run("make-updatable", pt_model).code == 0
    counted = []
    real_counting = cli_output.counting

    def counting(total: int):
        counted.append(total)
        return real_counting(total)

    monkeypatch.setattr("healthyluncher.cli.counting", counting)
    monkeypatch.chdir(tmp_path)
    result = run("predict", "a")
    assert result.code == 0, result
    assert counted == [12]
    header, *rows = result.stdout.splitlines()[1:]
    assert len(rows) == 12
    column = header.index("label")
    for row in rows:
        assert row[column - 2 : column] == "  " and row[column] != " ", (header, row)


def test_duplicate_photos_are_skipped_and_said_in_one_line(run, pt_model, photos, tmp_path):
    """The same photo twice in a folder, or one already taught with this label, silently
    became one example (and the summary counted -1 photos from the cache)."""
    assert run("make-updatable", pt_model).code == 0
    folder = tmp_path / "lunches"
    first = folder / "a.png"
    copy = folder / "b-copy.png"
    first.parent.mkdir()
    first.write_bytes(photos["red"][0].read_bytes())
    copy.write_bytes(photos["red"][0].read_bytes())
    (folder / "c.png").write_bytes(photos["red"][1].read_bytes())
    result = run("retrain", "--label", "healthy", folder)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    said = [line for line in lines if str(copy) in line]  # not in the table
    assert said == [f"Skipped 1 duplicate photo(s): {copy} (the same photo as {first})."]
    assert "; 0 photo(s) came from the cache" in result.stdout  # it said -1
    # Already taught with this label: skipped; the new photo is taught.
    data = run("retrain", "--label", "healthy", "--json", first, photos["red"][2]).json_lines()[0]
    assert data["duplicates"] == [
        {"path": str(first), "digest": data["duplicates"][0]["digest"],
         "reason": "already taught as 'healthy'"}
    ]  # fmt: skip
    assert [photo["path"] for photo in data["photos"]] == [str(photos["red"][2])]
    assert data["changed"] is True and data["skipped"] == []
    assert data["examples_per_label"] == {"healthy": 3}
    assert data["embedded"] + data["cached"] == 1


def test_a_retrain_that_changes_nothing_leaves_the_models_directory_alone(
    run, pt_model, photos, models_dir
):
    """Teaching photos again with the label and settings they have added an undo step (and
    wrote a new copy) for nothing; `undo` then undid nothing."""
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"]).code == 0
    assert run("retrain", "--label", "fast_food", *photos["green"]).code == 0

    def snapshot() -> dict[str, tuple[int, int]]:
        return {
            str(path.relative_to(models_dir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in models_dir.rglob("*")
        }

    before = snapshot()
    for args in ([], ["--views", "2"], ["--memory-strength", "40"]):  # views: for new photos
        result = run("retrain", "--label", "fast_food", *args, *photos["green"])
        assert result.code == 0, result
        assert result.stdout.startswith("Nothing changed (no new undo step): 3 duplicate")
        assert result.stdout.count("\n") == 1, result.stdout
        assert snapshot() == before, args
    data = run("retrain", "--label", "fast_food", "--json", photos["green"][0]).json_lines()[0]
    assert data["changed"] is False and data["photos"] == [] and len(data["duplicates"]) == 1
    assert snapshot() == before
    status = run("status", "--json").json_lines()[0]
    assert status["undo_steps"] == 2 and status["retrains"] == 2
    undone = run("undo", "--json").json_lines()[0]  # the green photos' retrain, not nothing
    assert undone["examples_per_label"] == {"healthy": 3}
    # Other settings are a change, even with no new photo.
    assert run("retrain", "--label", "healthy", "--epochs", "2", *photos["red"]).code == 0
    status = run("status", "--json").json_lines()[0]
    assert status["undo_steps"] == 2 and status["last_retrain_hyperparameters"]["epochs"] == 2


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", " OFF ", "False"])
def test_luncher_debug_set_to_off_keeps_errors_one_line(run, pt_model, photos, monkeypatch, value):
    """LUNCHER_DEBUG=0 (or false, no, off, empty) means no debug: one line, no traceback."""
    assert run("make-updatable", pt_model).code == 0
    import healthyluncher.predictor as predicting

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(predicting.Predictor, "predict", boom)
    monkeypatch.setenv("LUNCHER_DEBUG", value)
    one_line_error(run("predict", photos["red"][0]), "disk on fire", "--debug")


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "2", "verbose"])
def test_luncher_debug_set_to_anything_else_shows_the_traceback(
    run, pt_model, photos, monkeypatch, value
):
    assert run("make-updatable", pt_model).code == 0
    import healthyluncher.predictor as predicting

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(predicting.Predictor, "predict", boom)
    monkeypatch.setenv("LUNCHER_DEBUG", value)
    with pytest.raises(RuntimeError):
        run("predict", photos["red"][0])


def test_luncher_debug_words():
    from healthyluncher.errors import debug_wanted

    for value in ("0", "false", "no", "off", "", "  ", "OFF", "No"):
        assert debug_wanted(value) is False, value
    for value in ("1", "true", "yes", "on", "2", "verbose"):
        assert debug_wanted(value) is True, value
    assert debug_wanted(None) is False
