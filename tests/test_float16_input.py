"""Models whose image input is float16 (`model.half()` before export, onnxconverter-common's
`convert_float_to_float16(keep_io_types=False)`): float16 weights, input and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from healthyluncher.runtime import inference_session
from tests.conftest import label_folders, needs_ort, one_line_error
from tests.models import keras_style, pytorch_style
from tests.test_examples import float16_model


def half_model(source: Path, target: Path) -> Path:
    """Every float32 weight, the input and the output made float16, as `model.half()`
    exports them (keras_style's Softmax then gives float16 probabilities)."""
    model = onnx.load(str(source))
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))
    return target


MAKERS = {"pytorch": pytorch_style, "keras": keras_style}


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    return label_folders(tmp_path / "examples", count=8)


def _round_trip(run, model: Path, photos, *extra: str) -> None:
    """make-updatable, predict, retrain (the label's probability rises), reset (the base's
    predictions come back exactly)."""
    result = run("make-updatable", model, "--force", *extra)
    assert result.code == 0, result
    base = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert len(base) == 6 and all(len(row["probabilities"]) == 2 for row in base)
    target = "healthy" if base[0]["label"] == "fast_food" else "fast_food"
    result = run("retrain", "--label", target, "--json", "--epochs", "30", *photos["red"])
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", *photos["red"], *photos["green"]).json_lines() == base


@pytest.mark.parametrize("style", sorted(MAKERS))
def test_a_float16_input_model_personalizes(run, tmp_path, photos, style):
    """It was refused: "input 'image' is not an image: expected float32 with 4 dimensions,
    got float16"."""
    model = half_model(MAKERS[style](tmp_path / "m.onnx"), tmp_path / "half.onnx")
    _round_trip(run, model, photos)


@pytest.mark.parametrize("style", sorted(MAKERS))
def test_a_float16_input_model_gets_a_new_head_from_examples(
    run, tmp_path, photos, examples, style
):
    model = half_model(MAKERS[style](tmp_path / "m.onnx"), tmp_path / "half.onnx")
    _round_trip(run, model, photos, "--examples", str(examples))


@needs_ort
@pytest.mark.parametrize("layers", ["2", "3"])
def test_a_float16_input_model_trains_deeper_heads(run, tmp_path, photos, layers):
    model = half_model(pytorch_style(tmp_path / "m.onnx"), tmp_path / "half.onnx")
    _round_trip(run, model, photos, "--trainable-layers", layers)


def test_the_base_computes_what_the_model_does_on_float16_pixels(run, tmp_path, models_dir):
    """The base takes float32 and casts it to float16 where the model starts: the same
    scores as the original model fed the float16 pixels (its head now runs in float32)."""
    source = pytorch_style(tmp_path / "m.onnx")
    model = half_model(source, tmp_path / "half.onnx")
    assert run("make-updatable", model).code == 0
    (built,) = models_dir.glob("base-*/model.onnx")
    pixels = np.random.default_rng(0).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    ours = inference_session(built).run(None, {"image": pixels})[0]
    theirs = inference_session(model).run(None, {"image": pixels.astype(np.float16)})[0]
    assert ours.dtype == np.float32 and theirs.dtype == np.float16
    np.testing.assert_allclose(ours, theirs.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("convert", ["half", "keep_io_types"])
def test_int8_of_a_float16_model_is_refused_in_one_line(run, tmp_path, photos, convert):
    """--int8 on float16 weights (float32 input and output too) ended in ONNX Runtime's
    text: 'Type parameter (T) of Optype (Gemm) bound to different types (tensor(float16)
    and tensor(float)'."""
    make = half_model if convert == "half" else float16_model
    model = make(pytorch_style(tmp_path / "m.onnx"), tmp_path / "half.onnx")
    calibration = photos["red"][0].parent
    result = run("make-updatable", model, "--int8", "--calibration", calibration)
    line = one_line_error(result, "--int8", "float16", "float32")
    assert "ONNX" not in line and "::" not in line


def test_a_float16_input_that_is_no_image_is_still_refused_in_one_line(run, tmp_path):
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 2])
    weight = numpy_helper.from_array(np.ones((8, 2), np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [image], [out], [weight]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "flat.onnx"))
    one_line_error(run("make-updatable", tmp_path / "flat.onnx"), "'x' is not an image", "float16")
