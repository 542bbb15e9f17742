"""make-updatable --int8: an int8 frozen part that predicts like fp32 and still personalizes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from PIL import Image

import healthyluncher
from healthyluncher import LuncherError, child
from healthyluncher.meta import BaseMeta
from healthyluncher.store import STATE_FILE, Files, ModelStore
from tests.conftest import needs_ort, one_line_error
from tests.models import keras_style, pytorch_style


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    """Photos unlike the test photos but spanning their colours: solid colours across the
    RGB cube and noise, in two subfolders."""
    folder = tmp_path / "calibration"
    rng = np.random.default_rng(7)
    for i in range(10):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (folder / "solid").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(folder / "solid" / f"s{i}.jpg")
        noise = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        (folder / "noise").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise).save(folder / "noise" / f"n{i}.png")
    return folder


def two_conv_keras(path: Path) -> Path:
    return keras_style(path, convs=2)


def probabilities(run, *paths: Path, models_dir: Path | None = None) -> dict[str, dict[str, float]]:
    where = ["--models-dir", models_dir] if models_dir else []
    result = run(*where, "predict", "--json", *paths)
    assert result.code == 0, result
    return {str(row["path"]): row["probabilities"] for row in result.json_lines()}


def base_dir(models_dir: Path) -> Path:
    path = ModelStore(models_dir).base_dir()
    assert path is not None
    return path


def weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.parametrize("factory", [pytorch_style, two_conv_keras], ids=["pytorch", "keras"])
def test_int8_base_predicts_like_fp32(run, factory, tmp_path, photos, calibration):
    model = factory(tmp_path / "model.onnx")
    fp32_dir, int8_dir = tmp_path / "fp32", tmp_path / "int8"
    assert run("--models-dir", fp32_dir, "make-updatable", model).code == 0
    made = run(
        "--models-dir", int8_dir, "make-updatable", model, "--int8", "--calibration", calibration
    )
    assert made.code == 0, made
    assert "int8, calibrated on 20 photo(s)" in made.stdout

    base = base_dir(int8_dir)
    meta = json.loads((base / Files.META).read_text())
    assert meta["int8"] is True and meta["calibration_photos"] == 20
    fp32_meta = json.loads((base_dir(fp32_dir) / Files.META).read_text())
    assert fp32_meta["int8"] is False and fp32_meta["calibration_photos"] == 0
    # Another base as far as caches and backups are concerned: its embeddings differ.
    assert meta["sha256"] != fp32_meta["sha256"]

    # Both the embedding model and the predicting model hold int8 weights and Q/DQ pairs;
    # the head is float32 under its original names in both model.onnx and head.onnx.
    frozen = onnx.load(str(base / Files.FROZEN))
    joined = onnx.load(str(base / Files.MODEL))
    for part in (frozen, joined):
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in part.graph.node}
        assert any(t.data_type == TensorProto.INT8 for t in part.graph.initializer)
    head_params = meta["trainable_params"]
    head = weights(onnx.load(str(base / Files.HEAD)))
    for name in head_params:
        assert weights(joined)[name].data_type == TensorProto.FLOAT
        assert head[name].data_type == TensorProto.FLOAT

    paths = photos["red"] + photos["green"]
    fp32 = probabilities(run, *paths, models_dir=fp32_dir)
    int8 = probabilities(run, *paths, models_dir=int8_dir)
    assert fp32.keys() == int8.keys() == {str(p) for p in paths}
    differences = [
        abs(int8[path][label] - fp32[path][label]) for path in fp32 for label in fp32[path]
    ]
    # Tolerance: a uint8 activation is off by half a quantization step from rounding, plus
    # what earlier layers pass on (the global average pool mostly averages that out); two
    # steps of the coarsest activation scale bound the error of each head input. The gap
    # between the two logits moves by at most that times sum |w_healthy - w_fast_food|,
    # and a probability by at most a quarter of it (Softmax's steepest slope): from
    # 0.003 to 0.008 for these models; the measured differences are 2e-4 to 7e-4.
    scales = [
        float(numpy_helper.to_array(t))
        for t in frozen.graph.initializer
        if t.name.endswith("_scale") and not t.dims
    ]
    kernel = numpy_helper.to_array(head[head_params[0]])
    rows = kernel if factory is pytorch_style else kernel.T  # (classes, features)
    tolerance = 2 * max(scales) * float(np.abs(rows[0] - rows[1]).sum()) / 4
    assert max(differences) <= tolerance, (max(differences), tolerance)
    assert max(differences) > 0  # int8 really runs: fp32 would match to the last digit


def test_int8_base_retrains_grows_and_resets_exactly(run, pt_model, photos, calibration):
    made = run("make-updatable", pt_model, "--int8", "--calibration", calibration)
    assert made.code == 0, made
    red = photos["red"]
    before = probabilities(run, *red, *photos["green"])
    label = min(("healthy", "fast_food"), key=lambda k: before[str(red[0])][k])
    assert all(before[str(p)][label] < 0.5 for p in red)

    result = run("retrain", "--label", label, "--epochs", "60", "--json", *red)
    assert result.code == 0, result
    after = probabilities(run, *red)
    assert all(after[str(p)][label] > 0.5 for p in red), after
    # The retrain summary scores the int8 frozen part's cached outputs with the head; predict
    # runs the joined model. They are the same computation.
    for photo in result.json_lines()[0]["photos"]:
        assert abs(photo["after"] - after[photo["path"]][label]) < 1e-4

    grown = run(
        "retrain", "--label", "dessert", "--new-label", "--epochs", "40", "--json", *photos["green"]
    )
    assert grown.code == 0, grown
    rows = run("predict", "--json", *photos["green"]).json_lines()
    assert [r["label"] for r in rows] == ["dessert"] * 3

    assert run("reset").code == 0
    assert probabilities(run, *red, *photos["green"]) == before


def test_int8_upgrade_keeps_the_personalization(run, pt_model, photos, calibration):
    assert run("make-updatable", pt_model).code == 0
    red = photos["red"]
    label = min(("healthy", "fast_food"), key=lambda k: probabilities(run, red[0])[str(red[0])][k])
    assert run("retrain", "--label", label, "--epochs", "60", *red).code == 0
    upgraded = run(
        "make-updatable",
        pt_model,
        "--int8",
        "--calibration",
        calibration,
        "--keep-personalization",
    )
    assert upgraded.code == 0, upgraded
    assert "carried over" in upgraded.stdout
    status = run("status", "--json").json_lines()[0]
    assert status["predicting_with"] == "personalized"
    assert all(row[label] > 0.5 for row in probabilities(run, *red).values())


def test_at_most_200_calibration_photos_spread_over_subfolders(tmp_path):
    from healthyluncher.quantize import MAX_CALIBRATION_PHOTOS, calibration_photos

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(150):
            (tmp_path / folder / f"{i:03}.jpg").write_bytes(b"")
    chosen = calibration_photos(tmp_path)
    assert len(chosen) == MAX_CALIBRATION_PHOTOS == 200
    assert {p.parent.name for p in chosen} == {"a", "b"}
    assert len(set(chosen)) == len(chosen)


def test_base_meta_without_int8_fields_reads_as_fp32(run, pt_model, models_dir):
    assert run("make-updatable", pt_model).code == 0
    data = json.loads((base_dir(models_dir) / Files.META).read_text())
    del data["int8"], data["calibration_photos"]
    meta = BaseMeta.from_json(data)
    assert meta.int8 is False and meta.calibration_photos == 0


# -- refusals ----------------------------------------------------------------------------


def state_of(models_dir: Path) -> str | None:
    path = models_dir / STATE_FILE
    return path.read_text() if path.is_file() else None


def test_int8_needs_calibration(run, pt_model, models_dir):
    one_line_error(run("make-updatable", pt_model, "--int8"), "--int8 needs --calibration")
    assert state_of(models_dir) is None


def test_calibration_needs_int8(run, pt_model, calibration, models_dir):
    result = run("make-updatable", pt_model, "--calibration", calibration)
    one_line_error(result, "--calibration is only used with --int8")
    assert state_of(models_dir) is None


def test_refuses_calibration_without_readable_photos(run, pt_model, tmp_path, models_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "lunch.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("no photos here")
    result = run("make-updatable", pt_model, "--int8", "--calibration", folder)
    # The quantizer runs in a child Python: its refusal still names the command's option,
    # and the API's parameter to a program.
    one_line_error(result, f"--calibration {folder}: none of its 1 image files could be read")
    assert state_of(models_dir) is None
    with pytest.raises(LuncherError, match=re.escape(f"calibration='{folder}': none of its")):
        healthyluncher.make_updatable(pt_model, int8=True, calibration=folder, force=True)


def test_refuses_calibration_that_is_empty_or_not_a_directory(run, pt_model, tmp_path, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(
        run("make-updatable", pt_model, "--int8", "--calibration", empty), "no image files"
    )
    one_line_error(
        run("make-updatable", pt_model, "--int8", "--calibration", photos["red"][0]),
        "not a directory",
    )


@needs_ort
def test_refuses_a_model_whose_every_layer_trains(run, pt_model, calibration, models_dir):
    result = run(
        "make-updatable",
        pt_model,
        "--trainable-layers",
        "3",
        "--int8",
        "--calibration",
        calibration,
    )
    one_line_error(result, "every layer of this model trains")
    assert state_of(models_dir) is None


def test_refuses_an_opset_without_per_channel_dequantize(run, tmp_path, calibration):
    model = onnx.load(str(pytorch_style(tmp_path / "model.onnx")))
    model.opset_import[0].version = 12  # the same ops, before DequantizeLinear had `axis`
    onnx.save(model, str(tmp_path / "opset12.onnx"))
    result = run(
        "make-updatable", tmp_path / "opset12.onnx", "--int8", "--calibration", calibration
    )
    one_line_error(result, "--int8 needs ONNX opset 13", "opset 12")


def test_a_quantization_failure_keeps_the_previous_base(
    run, pt_model, calibration, models_dir, photos, monkeypatch
):
    assert run("make-updatable", pt_model).code == 0
    before_state = state_of(models_dir)
    before = probabilities(run, *photos["red"])

    from healthyluncher.runtime import runtime

    runtime()
    import onnxruntime.quantization

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel\nsecond line")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", fails)
    # In this process (where no child Python can be started), for the failure above.
    monkeypatch.setattr(child, "python", lambda: None)
    result = run("make-updatable", pt_model, "--force", "--int8", "--calibration", calibration)
    one_line_error(result, "cannot quantize the frozen part to int8: no kernel")
    assert "second line" not in result.stderr and "ONNXRuntimeError" not in result.stderr
    assert state_of(models_dir) == before_state
    assert probabilities(run, *photos["red"]) == before
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".staging-")]


def test_without_a_python_to_start_the_quantizer_leaves_no_root_handler(
    run, pt_model, calibration, models_dir
):
    """Where no child can be started, the quantizer runs in this process, and its advice
    (logging.warning, which gives a root logger without a handler one) leaves no handler."""
    from healthyluncher.runtime import runtime

    runtime()
    import onnxruntime.quantization

    quantize_static = onnxruntime.quantization.quantize_static

    def advises(*args: object, **kwargs: object) -> None:
        logging.warning("Please consider to run pre-processing before quantization.")
        quantize_static(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnxruntime.quantization, "quantize_static", advises)
        patch.setattr(child, "python", lambda: None)
        patch.setattr(logging.root, "handlers", [])
        result = run("make-updatable", pt_model, "--int8", "--calibration", calibration)
        assert logging.root.handlers == []
    assert result.code == 0, result


# -- what stays float32 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "stem", "second"),
    [(pytorch_style, "conv1", "conv2"), (two_conv_keras, "conv", "conv_1")],
    ids=["pytorch", "keras"],
)
def test_int8_keeps_the_first_convolution_float32(
    run, factory, stem, second, tmp_path, calibration, models_dir
):
    """The stem convolution (found structurally: the first Conv the input reaches, here
    straight from the input and after a Transpose) keeps float32 weights and bias with no
    Quantize/DequantizeLinear on them; the next convolution is int8."""
    made = run(
        "make-updatable", factory(tmp_path / "model.onnx"), "--int8", "--calibration", calibration
    )
    assert made.code == 0, made
    base = base_dir(models_dir)
    for file in (Files.FROZEN, Files.MODEL):
        part = onnx.load(str(base / file))
        made_by = {out: node for node in part.graph.node for out in node.output}
        kinds = {t.name: t.data_type for t in part.graph.initializer}
        convs = {node.name: node for node in part.graph.node if node.op_type == "Conv"}
        for tensor in convs[stem].input:
            producer = made_by.get(tensor)
            assert producer is None or producer.op_type not in {"DequantizeLinear", "Cast"}, (
                file,
                tensor,
            )
        assert kinds[convs[stem].input[1]] == kinds[convs[stem].input[2]] == TensorProto.FLOAT
        weight = made_by[convs[second].input[1]]
        assert weight.op_type == "DequantizeLinear"
        assert kinds[weight.input[0]] == TensorProto.INT8


def test_int8_keeps_the_bias_of_a_nearly_dead_channel(
    run, tmp_path, calibration, models_dir, recwarn
):
    """A channel whose weights are ~0 (a batch norm with a ~0 scale folded into them) outputs
    its bias. Its int32 bias at scale input_scale * weight_scale overflows; the quantizer
    used to wrap it to -2**31, turning relu(0.5) into 0, and numpy's warning about that
    cast reached the user's terminal."""
    path = pytorch_style(tmp_path / "model.onnx")
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    array = numpy_helper.to_array(weight).copy()
    array[0] *= 1e-9  # conv2.bias is 0.5: feature 0 is relu(0.5 + ~0) = 0.5 for any photo
    weight.CopyFrom(numpy_helper.from_array(array, "conv2.weight"))
    onnx.save(model, str(path))
    made = run("make-updatable", path, "--int8", "--calibration", calibration)
    assert made.code == 0, made
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]

    from healthyluncher.runtime import runtime

    frozen = base_dir(models_dir) / Files.FROZEN
    session = runtime().InferenceSession(str(frozen), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(3).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    features = session.run(None, {"image": image})[0]
    assert np.allclose(features[:, 0], 0.5, atol=0.02), features[:, 0]


@pytest.mark.parametrize("trainable", [1, pytest.param(2, marks=needs_ort)])
def test_int8_refuses_a_frozen_part_that_is_only_the_first_convolution(
    run, trainable, tmp_path, calibration, models_dir
):
    # keras_style's frozen part is Transpose -> Conv -> Relu -> pool; pytorch_style with two
    # trainable layers freezes conv1 only.
    model = (keras_style if trainable == 1 else pytorch_style)(tmp_path / "model.onnx")
    args = ["--trainable-layers", str(trainable)] if trainable > 1 else []
    result = run("make-updatable", model, *args, "--int8", "--calibration", calibration)
    one_line_error(result, "--int8", "first convolution")
    assert state_of(models_dir) is None


def test_the_stem_is_every_convolution_the_input_reaches_without_another():
    from onnx import helper

    from healthyluncher.quantize import stem_convolutions

    def conv(name: str, source: str) -> onnx.NodeProto:
        return helper.make_node("Conv", [source, "w", "b"], [name], name=name)

    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["centred"], name="normalize"),
        conv("a", "centred"),  # the first convolution, after a normalization
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu"),
        conv("b", "a_relu"),  # after another convolution: not a stem
        conv("c", "image"),  # a second branch straight from the input
        helper.make_node("Add", ["b", "c"], ["sum"], name="add"),
        conv("d", "sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros(3, np.float32), name) for name in ("mean", "w", "b")],
    )
    assert [node.name for node in stem_convolutions(graph)] == ["a", "c"]


def test_a_model_computing_nan_is_named_not_the_quantizers_assert(run, pt_model, calibration):
    """A frozen part that computes NaN for the calibration photos (a Sqrt where a Relu
    belongs) failed with `cannot quantize the frozen part to int8: scale isse`, the text of
    an assert inside ONNX Runtime's quantizer."""
    model = onnx.load(str(pt_model))
    for node in model.graph.node:
        if node.name == "relu1":
            node.op_type = "Sqrt"  # NaN where the first convolution is negative
    onnx.save(model, str(pt_model))
    result = run("make-updatable", pt_model, "--int8", "--calibration", calibration)
    line = one_line_error(result, "cannot quantize", "not numbers (NaN or infinity)")
    assert "isse" not in line
