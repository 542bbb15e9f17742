"""Hostile models and in-memory photos: each is refused in one line of luncher's own words
(never Python's OverflowError or MemoryError, or onnx's InferenceError), before anything is
written, and a model that runs is held to the outputs it declares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import healthyluncher
from healthyluncher import LuncherError
from tests.conftest import TRAINER, one_line_error
from tests.models import pytorch_style


def _with_preprocessing(path, text):
    model = onnx.load(str(path))
    helper.set_model_props(model, {"labels": '["healthy", "fast_food"]', "preprocessing": text})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "preprocessing",
    ['{"crop": Infinity}', '{"crop": [16, -Infinity]}', '{"resize": Infinity}'],
)
def test_an_infinite_crop_or_resize_in_the_metadata_is_refused(
    run, pt_model, models_dir, preprocessing
):
    """Python's json reads Infinity, and int() of it raised OverflowError: the command
    ended with 'unexpected OverflowError: cannot convert float infinity to integer'."""
    _with_preprocessing(pt_model, preprocessing)
    one_line_error(run("make-updatable", pt_model), "bad crop or resize")
    assert not (models_dir / "state.json").exists()


@pytest.mark.parametrize("key", ["labels", "preprocessing"])
def test_metadata_nested_too_deeply_is_refused_in_one_line(run, pt_model, models_dir, key):
    """100,000 nested brackets in a model's metadata gave 'unexpected RecursionError'."""
    model = onnx.load(str(pt_model))
    props = {"labels": '["healthy", "fast_food"]', key: "[" * 100_000 + "]" * 100_000}
    helper.set_model_props(model, props)
    onnx.save(model, str(pt_model))
    assert "unexpected" not in one_line_error(run("make-updatable", pt_model))
    assert not (models_dir / "state.json").exists()


@pytest.mark.parametrize("opsets", [[], [("com.example", 1)]], ids=["none", "custom only"])
def test_a_model_that_imports_no_onnx_opset_is_refused(run, pt_model, opsets):
    """Without a default-domain opset onnx's shape inference raised its InferenceError
    ('No opset import for domain  optype Conv'), shown as an unexpected error."""
    model = onnx.load(str(pt_model))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, v) for domain, v in opsets)
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), "imports no ONNX operator set")


def test_two_initializers_with_one_name_are_refused(run, pt_model, models_dir):
    """ONNX Runtime runs such a graph (one of the two wins), but which weights train was
    then a guess: make-updatable failed late with 'unexpected ValueError: the graphs do not
    hold every trainable weight once'."""
    model = onnx.load(str(pt_model))
    twin = numpy_helper.to_array(model.graph.initializer[-2]) * 2
    model.graph.initializer.append(numpy_helper.from_array(twin, model.graph.initializer[-2].name))
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), "'fc.weight'", "more than one")
    assert not (models_dir / "state.json").exists()


def test_a_fixed_batch_too_large_to_run_is_refused_not_allocated(run, tmp_path):
    """The check run of make-updatable allocated the whole fixed batch: 2**31 photos of
    16x16 raised 'unexpected MemoryError: Unable to allocate 6.00 TiB'."""
    model = pytorch_style(tmp_path / "batch.onnx", batch=2**31)
    one_line_error(run("make-updatable", model), "fixed batch of 2147483648 photos")


@pytest.mark.parametrize("declared", [5, 1])
def test_a_model_that_outputs_another_number_of_scores_than_it_declares_is_refused(
    run, pt_model, photos, declared
):
    """A graph declaring 5 outputs that computes 2 became a base with 5 labels (the numpy
    trainer's machines; ONNX Runtime's training failed with its InferenceError): predict
    then paired 2 probabilities with the first 2 of 5 labels and never named the others."""
    model = onnx.load(str(pt_model))
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", declared])
    )
    onnx.save(model, str(pt_model))
    labels = ",".join("abcde"[:declared])
    one_line_error(
        run("make-updatable", pt_model, "--labels", labels),
        f"declares {declared} class scores but outputs 2",
    )


def test_a_model_whose_scores_are_not_numbers_is_refused(run, pt_model):
    model = onnx.load(str(pt_model))
    model.graph.node.append(helper.make_node("Cast", ["logits"], ["ints"], to=TensorProto.INT32))
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("ints", TensorProto.INT32, ["N", 2])
    )
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), "int32")


@pytest.mark.parametrize("kind", ["array", "PIL image"])
def test_an_in_memory_photo_larger_than_any_file_may_be_is_refused_unread(pt_model, kind):
    """A photo file declaring more than MAX_PIXELS is refused before decoding; a numpy
    array or PIL image of that size was copied and PNG-encoded first (MemoryError)."""
    pixels = np.broadcast_to(np.uint8(0), (100_000, 100_000, 3))  # no memory of its own
    photo = pixels if kind == "array" else _huge_lazy_image()
    healthyluncher.make_updatable(pt_model)
    with pytest.raises(LuncherError, match=r"^<image 0>: image is too large \(100000x100000"):
        healthyluncher.open().predict([photo])


def _huge_lazy_image():
    """A PIL image that claims 100000x100000 pixels and holds none (as a lazily opened
    file does until it is loaded)."""
    from PIL import Image

    image = Image.new("L", (1, 1))
    image._size = (100_000, 100_000)  # type: ignore[attr-defined]
    return image


def test_two_nodes_that_make_one_tensor_are_refused(run, pt_model):
    """onnx's Extractor asserted on it: 'unexpected AssertionError: ' (no message at all)."""
    model = onnx.load(str(pt_model))
    model.graph.node.append(helper.make_node("Identity", ["r1"], ["c2"]))
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), "'c2'", "more than one")


@pytest.mark.parametrize("fault", ["reshape", "weight shape"])
def test_a_model_onnx_runtime_loads_but_cannot_run_is_refused(run, pt_model, fault):
    """ONNX Runtime's run-time error text ('[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION :
    Non-zero status code returned while running Reshape node...') was the message."""
    model = onnx.load(str(pt_model))
    nodes = model.graph.node
    if fault == "reshape":  # Flatten -> Reshape to (-1, 7): 8 features do not fit
        at = next(i for i, node in enumerate(nodes) if node.op_type == "Flatten")
        nodes.remove(nodes[at])
        nodes.insert(at, helper.make_node("Reshape", ["pooled", "shape"], ["features"]))
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 7]), "shape"))
        op = "Reshape"
    else:
        weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
        weight.CopyFrom(numpy_helper.from_array(np.zeros((2, 0), np.float32), "fc.weight"))
        op = "Gemm"
    onnx.save(model, str(pt_model))
    # The numpy trainer refuses first: the last layer is no Gemm it can train.
    why = ("cannot run the model", op) if TRAINER == "onnxruntime" else ("not one Gemm",)
    line = one_line_error(run("make-updatable", pt_model), *why)
    assert "ONNXRuntimeError" not in line


@pytest.mark.parametrize("label", [None, 5, ""])
def test_remove_label_checks_its_label_like_every_other_call(pt_model, label):
    """remove_label(None) read as 'forget no photos': 'none of these photos are among
    your examples', a message about photos the caller never passed."""
    healthyluncher.make_updatable(pt_model)
    with pytest.raises(LuncherError, match="label"):
        healthyluncher.open().remove_label(label)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_a_model_of_an_ir_version_onnx_runtime_cannot_read_is_refused(run, pt_model, version):
    """IR versions 1 and 2 failed as 'ONNX Runtime training fails ... (ValidationError)'."""
    model = onnx.load(str(pt_model))
    model.ir_version = version
    onnx.save(model, str(pt_model))
    one_line_error(run("make-updatable", pt_model), f"IR version {version}")


def test_a_model_file_larger_than_protobuf_allows_is_refused_unread(run, tmp_path, monkeypatch):
    """No ONNX file over 2 GiB parses (protobuf's limit: larger models keep their weights in
    external data). A 3 GiB file was read twice, 6.3 GB of memory and 27 s, to end in
    "not an ONNX model (DecodeError)"."""
    huge = tmp_path / "huge.onnx"
    with huge.open("wb") as handle:  # sparse: no disk used
        handle.truncate(2**31)

    def read(*args, **kwargs):
        raise AssertionError("the file was read")

    monkeypatch.setattr(onnx, "load", read)
    monkeypatch.setattr(onnx, "load_model", read)
    one_line_error(run("make-updatable", huge), "2.0 GiB", "at most 2 GiB", "external data")


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [("offset", "999999", "cut short"), ("length", "10" * 8, "its shape takes")],
)
def test_external_weights_cut_short_are_named_not_called_not_onnx(
    run, pt_model, tmp_path, key, value, said
):
    """onnx's ValueError for an offset or length past the weights file's end became "not an
    ONNX model (ValueError)": the model is fine, its weights file is short."""
    onnx.save(onnx.load(str(pt_model)), str(pt_model), save_as_external_data=True, size_threshold=0)
    model = onnx.load(str(pt_model), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == key:
                entry.value = value
        if key == "length" and tensor.external_data:
            tensor.external_data.add(key="length", value=value)
    onnx.save(model, str(pt_model))
    line = one_line_error(run("make-updatable", pt_model), said)
    assert "not an ONNX model" not in line


@pytest.mark.parametrize(
    "edit",
    [
        {"height": 17, "width": 17},
        {"channels": 1},
        {"layout": "NHWC"},
        "no height",  # read as the default, 224
        "input name",
    ],
    ids=["size", "channels", "layout", "no height", "input name"],
)
def test_a_base_meta_json_that_disagrees_with_its_model_is_damage_in_one_line(
    run, pt_model, photos, models_dir, edit
):
    """meta.json is a file anyone can edit: an input size, layout or name its model does
    not take reached ONNX Runtime, whose error ('unexpected InvalidArgument: ... Got
    invalid dimensions for input: image for the following indices\\n index: 2 Got: 224
    Expected: 16 ...') took several lines. It is a damaged base now, in one line."""
    import json

    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    [meta_path] = models_dir.glob("base-*/meta.json")
    meta = json.loads(meta_path.read_text())
    if edit == "no height":
        del meta["preprocessing"]["height"]
    elif edit == "input name":
        meta["input_name"] = "pixels"
    else:
        meta["preprocessing"].update(edit)
    meta_path.write_text(json.dumps(meta))
    for args in (
        ["predict", photos["green"][0]],
        ["predict", "--base", photos["green"][0]],
        ["retrain", "--label", "healthy", photos["green"][1]],
    ):
        line = one_line_error(run(*args), "damaged", "make-updatable")
        assert "ONNXRuntime" not in line and "unexpected" not in line


def test_a_model_file_past_what_protobuf_can_hold_is_refused_unread(run, tmp_path):
    """An ONNX file is one protobuf message, which cannot pass 2 GiB (larger models keep
    their weights in external data). A 3 GiB file (sparse: no disk, no time to make) was
    read whole and parsed, 17 s and 6 GB of memory for 'not an ONNX model'."""
    path = tmp_path / "huge.onnx"
    with path.open("wb") as file:
        file.write(b"\\x0a\\xff\\xff\\xff\\xff\\x0f")  # a field that claims to be huge
        file.truncate(2**31 + 1)
    line = one_line_error(run("make-updatable", path), "huge.onnx", "2 GiB")
    assert "external data" in line


def _external(pt_model, tmp_path, length: int | None, data_size: int):
    """pt_model with its weights in `weights.data` (sparse, `data_size` bytes), the first
    tensor's entry claiming `length` bytes (None: no length, so onnx reads to the end)."""
    model = onnx.load(str(pt_model))
    onnx.save(
        model, str(pt_model), save_as_external_data=True, size_threshold=0, location="weights.data"
    )
    model = onnx.load(str(pt_model), load_external_data=False)
    tensor = model.graph.initializer[0]
    kept = [(e.key, e.value) for e in tensor.external_data if e.key != "length"]
    del tensor.external_data[:]
    for key, value in kept + ([] if length is None else [("length", str(length))]):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(pt_model))
    with (tmp_path / "weights.data").open("r+b") as file:
        file.truncate(data_size)
    return tensor.name


@pytest.mark.parametrize("length", [6 * 2**30, None], ids=["claims 6 GiB", "no length"])
def test_external_data_is_read_as_its_shape_says_never_as_its_entry_claims(
    run, pt_model, tmp_path, models_dir, length
):
    """A model of a few kilobytes whose weights entry claims 6 GiB of a sparse file beside
    it (or claims no length, when onnx reads the file to its end) had 6 GB read into memory
    and the process killed (SIGSEGV under a memory limit) after 20 s."""
    assert pt_model.parent == tmp_path
    name = _external(pt_model, tmp_path, length, data_size=7 * 2**30)
    result = run("make-updatable", pt_model)
    if length is None:  # read as the shape says: the rest of the file is not the weights'
        assert result.code == 0, result
    else:
        one_line_error(result, name, "claims 6442450944 bytes")


def test_external_data_cut_short_is_one_line(run, pt_model, tmp_path):
    name = _external(pt_model, tmp_path, None, data_size=10)
    one_line_error(run("make-updatable", pt_model), name, "cut short")


def test_a_model_that_computes_nan_for_a_photo_names_the_photo(run, pt_model, photos):
    """A frozen part with a Sqrt where a Relu belongs passes make-updatable's check and
    computes NaN for real photos: predict printed 'healthy  nan%' (argmax of NaN, exit 0),
    and retrain trained to NaN weights and advised a smaller --learning-rate."""
    model = onnx.load(str(pt_model))
    for node in model.graph.node:
        if node.name == "relu1":
            node.op_type = "Sqrt"  # NaN where the first convolution is negative
    onnx.save(model, str(pt_model))
    assert run("make-updatable", pt_model).code == 0
    photo = photos["red"][0]
    result = run("predict", "--json", photo)
    assert result.code == 1, result
    assert result.json_lines() == [
        {
            "path": str(photo),
            "error": f"{photo}: the model's scores for this photo are not numbers (NaN)",
        }
    ]
    line = one_line_error(run("retrain", "--label", "healthy", photo), str(photo), "not numbers")
    assert "learning-rate" not in line
