"""Deeper cuts: skip connections named, ops rewritten for training, BatchNormalization folded
or trained, and no ONNX Runtime text in a refusal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from healthyluncher import decompose, graph, rewrites
from healthyluncher.errors import LuncherError
from healthyluncher.runtime import inference_session, training_api
from healthyluncher.store import Files, ModelStore
from tests.conftest import label_folders, needs_ort, require_ort_training, solid
from tests.models import SIZE, distilled_style, levit_style

LABELS = ["healthy", "fast_food"]
# Fragments of ONNX Runtime's own messages (C++ sources, assertions, status codes).
ORT_TEXT = ("onnxruntime", ".cc:", ".h:", "was false", "ONNXRuntimeError", "::", "Grad(")
N = helper.make_node


def _init(name: str, value: object, dtype: type = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _classifier(
    path: Path, body: list[onnx.NodeProto], inits: list[TensorProto], *, opset: int = 17
) -> Path:
    """image -> conv0 -> relu ('r0') -> body ('body', 8 channels) -> GAP -> fc -> logits."""
    rng = np.random.default_rng(3)
    w0 = rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32)
    for c in range(3):
        w0[c] = 0
        w0[c, c] = 1.0 / 9
    nodes = [
        N("Conv", ["image", "conv0.weight", "conv0.bias"], ["c0"], name="conv0", pads=[1] * 4),
        N("Relu", ["c0"], ["r0"], name="relu0"),
        *body,
        N("GlobalAveragePool", ["body"], ["pooled"], name="pool"),
        N("Flatten", ["pooled"], ["features"], name="flatten"),
        N("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        _init("conv0.weight", w0),
        _init("conv0.bias", np.zeros(8)),
        _init("fc.weight", rng.normal(0, 0.5, (2, 8))),
        _init("fc.bias", np.zeros(2)),
        *inits,
    ]
    return _save(path, nodes, inits, opset)


def _save(path: Path, nodes: list, inits: list[TensorProto], opset: int = 17) -> Path:
    """The tiny classifier of these nodes: image (N, 3, SIZE, SIZE) to logits (N, 2)."""
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "tiny",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    helper.set_model_props(model, {"labels": json.dumps(LABELS)})
    model.ir_version = 7 if opset < 13 else 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _conv(name: str, source: str, out: str, seed: int, bias: bool = True) -> tuple:
    rng = np.random.default_rng(seed)
    weight = _init(f"{name}.weight", rng.normal(0, 0.4, (8, 8, 1, 1)))
    inputs = [source, f"{name}.weight"] + ([f"{name}.bias"] if bias else [])
    inits = [weight] + ([_init(f"{name}.bias", rng.normal(0, 0.1, 8))] if bias else [])
    return N("Conv", inputs, [out], name=name), inits


def _residual(path: Path) -> Path:
    """conv0 -> relu 'r0' -> conv1 -> relu -> conv2 -> + r0 -> relu: a ResNet block."""
    conv1, i1 = _conv("conv1", "r0", "c1", 1)
    conv2, i2 = _conv("conv2", "r1", "c2", 2)
    body = [
        conv1,
        N("Relu", ["c1"], ["r1"], name="relu1"),
        conv2,
        N("Add", ["c2", "r0"], ["sum"], name="skip_add"),
        N("Relu", ["sum"], ["body"], name="relu2"),
    ]
    return _classifier(path, body, [*i1, *i2])


def _after_conv1(path: Path, op: list[onnx.NodeProto], inits: list[TensorProto]) -> Path:
    """conv0 -> relu -> conv1 -> `op` (from 'c1' to 'body')."""
    conv1, i1 = _conv("conv1", "r0", "c1", 1)
    return _classifier(path, [conv1, *op], [*i1, *inits])


def _reduce_max(path: Path) -> Path:
    return _after_conv1(
        path,
        [
            N("ReduceMax", ["c1"], ["m"], name="channel_max", axes=[1], keepdims=1),
            N("Sub", ["c1", "m"], ["body"]),
        ],
        [],
    )


def _resize(path: Path) -> Path:
    resize = N("Resize", ["c1", "", "scales"], ["body"], name="upsample", mode="nearest")
    return _after_conv1(path, [resize], [_init("scales", [1, 1, 2, 2])])


def _layer_norm(path: Path) -> Path:
    """LayerNormalization over the channels of each pixel (ConvNeXt's), one output."""
    rng = np.random.default_rng(5)
    nodes = [
        N("Transpose", ["c1"], ["nhwc"], perm=[0, 2, 3, 1]),
        N("LayerNormalization", ["nhwc", "ln.weight", "ln.bias"], ["normed"], name="ln"),
        N("Transpose", ["normed"], ["body"], perm=[0, 3, 1, 2]),
    ]
    ln = [_init("ln.weight", rng.normal(1, 0.2, 8)), _init("ln.bias", rng.normal(0, 0.1, 8))]
    return _after_conv1(path, nodes, ln)


def _hard_swish(path: Path) -> Path:
    return _after_conv1(path, [N("HardSwish", ["c1"], ["body"], name="hswish")], [])


def _batch_norm(path: Path, *, after_conv: bool) -> Path:
    """conv1 -> BN (folded) or conv0 -> relu -> BN (pre-activation: a layer of its own)."""
    rng = np.random.default_rng(7)
    stats = [
        _init("bn.scale", rng.uniform(0.5, 2, 8)),
        _init("bn.bias", rng.normal(0, 0.3, 8)),
        _init("bn.mean", rng.normal(0, 0.3, 8)),
        _init("bn.var", rng.uniform(0.2, 2, 8)),
    ]
    source = "c1" if after_conv else "r0"
    bn = N("BatchNormalization", [source, "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"])
    bn.name, relu = "bn", N("Relu", ["bn"], ["body"])
    if not after_conv:
        return _classifier(path, [bn, relu], stats)
    return _after_conv1(path, [bn, relu], stats)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = inference_session(model.SerializeToString())
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _image_batch() -> np.ndarray:
    return np.random.default_rng(0).uniform(-2, 2, (4, 3, SIZE, SIZE)).astype(np.float32)


def _base_dir(models_dir: Path) -> Path:
    base = ModelStore(models_dir).base_dir()
    assert base is not None
    return base


def _meta(models_dir: Path) -> dict:
    return json.loads((_base_dir(models_dir) / Files.META).read_text())


def _trained_weights(models_dir: Path) -> dict[str, np.ndarray]:
    personal = ModelStore(models_dir).personal_dir()
    assert personal is not None
    with np.load(personal / Files.WEIGHTS) as data:
        return {name: data[name] for name in data.files}


def _base_weights(models_dir: Path) -> dict[str, np.ndarray]:
    head = onnx.load(str(_base_dir(models_dir) / Files.HEAD))
    return {t.name: numpy_helper.to_array(t) for t in head.graph.initializer}


def _one_line_without_ort_text(text: str) -> str:
    line = text.strip()
    assert "\n" not in line, line
    assert not any(fragment in line for fragment in ORT_TEXT), line
    return line


# Skip connections: the tensor that crosses the cut, and the cuts that work


def test_a_skip_connection_names_the_crossing_tensor_and_the_cuts_that_work(run, tmp_path):
    model = _residual(tmp_path / "resnet.onnx")
    result = run("make-updatable", model, "--trainable-layers", "2")
    assert result.code == 1 and result.stdout == ""
    line = _one_line_without_ort_text(result.stderr)
    assert "'r0'" in line and "skip connection" in line and "'r1'" in line
    assert "'image'" not in line
    assert "choose --trainable-layers from 1, 3, 4" in line


def test_more_layers_than_the_model_has_lists_the_ones_that_work(run, tmp_path):
    result = run("make-updatable", _residual(tmp_path / "m.onnx"), "--trainable-layers", "7")
    assert result.code == 1
    line = _one_line_without_ort_text(result.stderr)
    assert "more than the 4 layers" in line and "from 1, 3, 4" in line


@needs_ort
def test_a_cut_that_works_around_the_skip_connection_trains(run, tmp_path, photos, models_dir):
    model = _residual(tmp_path / "resnet.onnx")
    result = run("make-updatable", model, "--trainable-layers", "3")
    assert result.code == 0, result
    meta = _meta(models_dir)
    assert [layer["trainable"] for layer in meta["layers"]] == [False, True, True, True]
    assert meta["split_tensor"] == "r0"
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    trained, base = _trained_weights(models_dir), _base_weights(models_dir)
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert not np.allclose(trained[name], base[name]), name


# Ops that cannot train: refused before cutting, with the cuts that work


@pytest.mark.parametrize(
    ("build", "words"),
    [(_reduce_max, "ReduceMax ('channel_max')"), (_resize, "Resize ('upsample')")],
    ids=["no-gradient", "no-gradient-kernel"],
)
def test_an_op_that_cannot_train_is_named_with_the_cuts_that_work(run, tmp_path, build, words):
    model = build(tmp_path / "m.onnx")
    result = run("make-updatable", model, "--trainable-layers", "2")
    assert result.code == 1
    line = _one_line_without_ort_text(result.stderr)
    assert words in line and "ONNX Runtime training" in line
    assert line.endswith("choose --trainable-layers from 1")
    assert run("make-updatable", model, "--trainable-layers", "1").code == 0


@needs_ort
@pytest.mark.parametrize(
    ("build", "unlisted", "words"),
    [
        (_reduce_max, "NO_GRADIENT", "ReduceMax ('channel_max') in the trainable part has no"),
        (_resize, "NO_GRADIENT_KERNEL", "Resize in the trainable part has no CPU kernel"),
    ],
    ids=["gradient-builder", "training-session"],
)
def test_what_onnx_runtime_refuses_unforeseen_is_one_line_of_ours(
    run, tmp_path, monkeypatch, build, unlisted, words
):
    """Were an op missing from the measured lists, ORT's own refusal is translated."""
    monkeypatch.setattr(decompose, unlisted, frozenset())
    result = run("make-updatable", build(tmp_path / "m.onnx"), "--trainable-layers", "2")
    assert result.code == 1
    line = _one_line_without_ort_text(result.stderr)
    assert words in line and line.endswith("choose --trainable-layers from 1")


@needs_ort
def test_an_internal_assertion_of_onnx_runtime_never_reaches_the_user(run, tmp_path, monkeypatch):
    """LayerNormalization as exported trips `gradient_builder_base.h:123 ... was false`."""
    monkeypatch.delitem(decompose._REWRITES, "LayerNormalization")
    result = run("make-updatable", _layer_norm(tmp_path / "m.onnx"), "--trainable-layers", "2")
    assert result.code == 1
    line = _one_line_without_ort_text(result.stderr)
    assert "gradient" in line and "--trainable-layers" in line


# Ops rewritten for training: the same outputs, and they train


@needs_ort
@pytest.mark.parametrize(
    ("build", "op", "own"),
    [(_layer_norm, "LayerNormalization", ["ln.weight", "ln.bias"]), (_hard_swish, "HardSwish", [])],
    ids=["layer-norm", "hard-swish"],
)
def test_a_head_with_an_op_rewritten_for_training_trains(
    run, tmp_path, photos, models_dir, build, op, own
):
    model = build(tmp_path / "m.onnx")
    n = 2 + len(own) // 2  # conv1, the layer norm's scale and bias, fc
    result = run("make-updatable", model, "--trainable-layers", str(n))
    assert result.code == 0, result
    meta = _meta(models_dir)
    assert meta["trainable_params"] == ["conv1.weight", "conv1.bias", *own, "fc.weight", "fc.bias"]
    assert [layer["trainable"] for layer in meta["layers"]] == [False] + [True] * n
    # The base predicts with the op as exported; only the training graph is rewritten.
    head = onnx.load(str(_base_dir(models_dir) / Files.HEAD))
    assert op in {node.op_type for node in head.graph.node}
    training_model = onnx.load(str(_base_dir(models_dir) / Files.ARTIFACTS / "training_model.onnx"))
    assert op not in {node.op_type for node in training_model.graph.node}
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    trained, base = _trained_weights(models_dir), _base_weights(models_dir)
    for name in meta["trainable_params"]:
        assert not np.allclose(trained[name], base[name]), name


def _head_with(op: list[onnx.NodeProto], inits: list[TensorProto], opset: int = 18):
    """x (N, 8, 6, 6) -> conv -> op (c -> y) -> GAP -> fc: the head alone, every weight trained."""
    rng = np.random.default_rng(11)
    weights = [
        _init("conv.weight", rng.normal(0, 0.6, (8, 8, 1, 1))),
        _init("conv.bias", rng.normal(0, 0.3, 8)),
        _init("fc.weight", rng.normal(0, 0.5, (2, 8))),
        _init("fc.bias", np.zeros(2)),
    ]
    nodes = [
        N("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv"),
        *op,
        N("GlobalAveragePool", ["y"], ["p"]),
        N("Flatten", ["p"], ["f"]),
        N("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "head",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 6, 6])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
            [*weights, *inits],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    trainable = [t.name for t in [*weights, *inits] if t.data_type == TensorProto.FLOAT]
    trainable = [n for n in trainable if not n.startswith("const.")]
    return model, tuple(trainable)


def _per_channel(name: str, low: float, high: float) -> TensorProto:
    return _init(name, np.random.default_rng(len(name)).uniform(low, high, 8))


def _one(op: str, **attrs: object) -> Callable[[], tuple]:
    return lambda: ([N(op, ["c"], ["y"], name=op.lower(), **attrs)], [])


REWRITES: dict[str, Callable[[], tuple]] = {
    "LayerNormalization-last-axis": lambda: (
        [N("LayerNormalization", ["c", "ln.w", "ln.b"], ["y"], axis=-1, epsilon=1e-3)],
        [_init("ln.w", np.linspace(0.5, 1.5, 6)), _init("ln.b", np.linspace(-0.2, 0.2, 6))],
    ),
    "LayerNormalization-axis-1-no-bias": lambda: (
        [N("LayerNormalization", ["c", "ln.w"], ["y"], axis=1)],
        [_init("ln.w", np.random.default_rng(1).uniform(0.5, 1.5, (8, 6, 6)))],
    ),
    "LayerNormalization-unused-statistics": lambda: (
        [N("LayerNormalization", ["c", "ln.w", "ln.b"], ["y", "mean", "inv_std"], axis=-2)],
        [_init("ln.w", np.ones((6, 6))), _init("ln.b", np.full((6, 6), 0.1))],
    ),
    "HardSigmoid": _one("HardSigmoid", alpha=0.3, beta=0.4),
    "HardSwish": _one("HardSwish"),
    "Softplus": _one("Softplus"),
    "Mish": _one("Mish"),
    "Softsign": _one("Softsign"),
    "Elu": _one("Elu", alpha=0.7),
    "Selu": _one("Selu"),
    "Celu": _one("Celu", alpha=1.3),
    "ThresholdedRelu": _one("ThresholdedRelu", alpha=0.2),
    "PRelu": lambda: (
        [N("PRelu", ["c", "slope"], ["y"])],
        [_init("slope", np.linspace(0.05, 0.4, 8).reshape(8, 1, 1))],
    ),
    "BatchNormalization": lambda: (
        [
            N(
                "BatchNormalization",
                ["c", "bn.s", "bn.b", "const.bn_mean", "const.bn_var"],
                ["y"],
                epsilon=1e-3,
            )
        ],
        [
            _per_channel("bn.s", 0.5, 2),
            _per_channel("bn.b", -0.3, 0.3),
            _per_channel("const.bn_mean", -0.5, 0.5),
            _per_channel("const.bn_var", 0.2, 2),
        ],
    ),
    "InstanceNormalization": lambda: (
        [N("InstanceNormalization", ["c", "in.s", "in.b"], ["y"])],
        [_per_channel("in.s", 0.5, 2), _per_channel("in.b", -0.3, 0.3)],
    ),
    "AveragePool-padded": _one(
        "AveragePool", kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1
    ),
    "AveragePool-strided": _one("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    "GlobalMaxPool": _one("GlobalMaxPool"),
    "LpNormalization-2": _one("LpNormalization", axis=1, p=2),
    "LpNormalization-1": _one("LpNormalization", axis=1, p=1),
    "ReduceSumSquare": lambda: (
        [
            N("ReduceSumSquare", ["c", "const.axes"], ["s"], keepdims=1),
            N("Sub", ["c", "s"], ["y"]),
        ],
        [_init("const.axes", [1], np.int64)],
    ),
    "ReduceL1": lambda: (
        [N("ReduceL1", ["c", "const.axes"], ["s"]), N("Div", ["c", "s"], ["y"])],
        [_init("const.axes", [1], np.int64)],
    ),
    "Sum": lambda: ([N("Relu", ["c"], ["r"]), N("Sum", ["c", "r", "c"], ["y"])], []),
    "Mean": lambda: ([N("Relu", ["c"], ["r"]), N("Mean", ["c", "r"], ["y"])], []),
    "Dropout-with-ratio": lambda: (
        [N("Dropout", ["c", "const.ratio"], ["y"])],
        [_init("const.ratio", 0.3)],
    ),
}


@pytest.mark.parametrize("case", list(REWRITES))
def test_a_rewritten_op_gives_the_same_outputs_and_trains(case, tmp_path):
    """Within 1e-5 of the op as exported; with ONNX Runtime training, the training graph's
    loss is the model's own (no batch statistics, no dropout) and every weight moves."""
    head, trainable = _head_with(*REWRITES[case]())
    op = case.split("-")[0]
    rewritten = decompose.for_training(head)
    assert op not in {node.op_type for node in rewritten.graph.node}
    assert {t.name for t in head.graph.initializer} <= {t.name for t in rewritten.graph.initializer}
    x = np.random.default_rng(2).normal(0, 1.5, (5, 8, 6, 6)).astype(np.float32)
    expected = _outputs(head, x)
    np.testing.assert_allclose(_outputs(rewritten, x), expected, rtol=1e-5, atol=1e-5)
    if case.startswith("Dropout"):
        return  # ORT's own Dropout as exported trains too; it is rewritten for its assertion
    _check_training(head, trainable, x, expected, tmp_path)


def _check_training(
    head: onnx.ModelProto,
    trainable: tuple[str, ...],
    x: np.ndarray,
    logits: np.ndarray,
    tmp_path: Path,
) -> None:
    from healthyluncher.training import trainer_name

    if trainer_name() != "onnxruntime":
        return
    require_ort_training()
    from healthyluncher.trainers import generate_artifacts

    directory = tmp_path / "artifacts"
    generate_artifacts(head, trainable, "adamw", directory)
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state)
    optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    labels = np.array([0, 1, 1, 0, 1], np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_p[np.arange(len(labels)), labels].mean()
    module.train()
    before = {name: np.array(p.data) for name, p in state.parameters}
    assert float(module(x, labels)) == pytest.approx(expected_loss, abs=1e-5)
    optimizer.step()
    after = {name: np.array(p.data) for name, p in state.parameters}
    assert set(before) == set(trainable)
    assert [n for n in trainable if np.array_equal(before[n], after[n])] == []


def test_a_statistic_read_elsewhere_is_refused_not_rewritten():
    head, _ = _head_with(
        [
            N("LayerNormalization", ["c", "ln.w"], ["n", "mean"], axis=-1, name="ln"),
            N("Add", ["n", "mean"], ["y"]),
        ],
        [_init("ln.w", np.ones(6))],
    )
    with pytest.raises(LuncherError, match=r"LayerNormalization \('ln'\).*extra outputs"):
        decompose.for_training(head)


# BatchNormalization: folded into its Conv, or trained in eval form


def test_batch_norm_after_a_conv_is_folded_exactly(tmp_path):
    path = _batch_norm(tmp_path / "m.onnx", after_conv=True)
    original = onnx.load(str(path))
    folded = onnx.load(str(path))
    analysis = graph.analyze(folded)
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    assert [(layer.name, layer.op) for layer in analysis.layers] == [
        ("conv0", "Conv"),
        ("conv1", "Conv"),
        ("fc", "Gemm"),
    ]
    assert analysis.layers[1].trainable_names == ("conv1.weight", "conv1.bias")
    x = _image_batch()
    np.testing.assert_allclose(_outputs(folded, x), _outputs(original, x), rtol=1e-5, atol=1e-5)
    assert graph.analyze(folded).layers == analysis.layers  # folding twice changes nothing


def test_a_conv_without_bias_and_a_shared_weight_fold_too(tmp_path):
    conv1, inits = _conv("conv1", "r0", "c1", 1, bias=False)
    rng = np.random.default_rng(9)
    stats = [_init(f"bn.{k}", rng.uniform(0.5, 1.5, 8)) for k in ("s", "b", "m", "v")]
    body = [
        conv1,
        N("BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["n1"]),
        N("Conv", ["n1", "conv1.weight"], ["c2"], name="conv_again"),  # shares conv1's weight
        N("Add", ["c2", "r0"], ["body"]),
    ]
    path = _classifier(tmp_path / "m.onnx", body, [*inits, *stats])
    folded = onnx.load(str(path))
    graph.analyze(folded)
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    x = _image_batch()
    expected = _outputs(onnx.load(str(path)), x)
    np.testing.assert_allclose(_outputs(folded, x), expected, rtol=1e-5, atol=1e-5)


def test_a_conv_read_elsewhere_keeps_its_batch_norm_as_part_of_its_layer(tmp_path):
    conv1, inits = _conv("conv1", "r0", "c1", 1)
    rng = np.random.default_rng(9)
    stats = [_init(f"bn.{k}", rng.uniform(0.5, 1.5, 8)) for k in ("s", "b", "m", "v")]
    body = [
        conv1,
        N("BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["n1"]),
        N("Add", ["n1", "c1"], ["body"]),
    ]
    model = onnx.load(str(_classifier(tmp_path / "m.onnx", body, [*inits, *stats])))
    layers = graph.analyze(model).layers
    assert layers[1].op == "Conv+BatchNormalization"
    assert layers[1].trainable_names == ("conv1.weight", "conv1.bias", "bn.s", "bn.b")


@needs_ort
def test_a_standalone_batch_norm_is_a_layer_that_trains(run, tmp_path, photos, models_dir):
    """Pre-activation (DenseNet's norm5): its scale and bias train, its statistics stay."""
    model = _batch_norm(tmp_path / "densenet.onnx", after_conv=False)
    assert run("make-updatable", model, "--trainable-layers", "2").code == 0
    meta = _meta(models_dir)
    assert [(layer["op"], layer["trainable"]) for layer in meta["layers"]] == [
        ("Conv", False),
        ("BatchNormalization", True),
        ("Gemm", True),
    ]
    assert meta["trainable_params"] == ["bn.scale", "bn.bias", "fc.weight", "fc.bias"]
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    trained, base = _trained_weights(models_dir), _base_weights(models_dir)
    for name in meta["trainable_params"]:
        assert not np.allclose(trained[name], base[name]), name


def test_every_layer_listed_trainable_has_weights_that_train(tmp_path):
    """For every cut: the trainable layers are the last N, and each has trained weights."""
    for build in (_residual, _layer_norm, _hard_swish):
        model = onnx.load(str(build(tmp_path / "m.onnx")))
        analysis = graph.analyze(model)
        for n in range(1, len(analysis.layers) + 1):
            try:
                cut = graph.split(model, analysis, n)
            except LuncherError as exc:
                assert "skip connection" in str(exc)
                continue
            names = {name for layer in analysis.layers[-n:] for name in layer.trainable_names}
            assert set(cut.trainable_params) == names
            assert all(layer.trainable_names for layer in analysis.layers)
            assert names <= {t.name for t in cut.head.graph.initializer}
    for after_conv in (True, False):
        model = onnx.load(str(_batch_norm(tmp_path / "bn.onnx", after_conv=after_conv)))
        assert all(layer.trainable_names for layer in graph.analyze(model).layers)


# Old opsets: ONNX Runtime training's loss needs opset 12


@needs_ort
def test_an_opset_11_model_gets_training_artifacts_for_two_layers(
    run, tmp_path, models_dir, photos
):
    """The head is converted to opset 13 for training (generate_artifacts has run one
    training step on it), and a retrain works: the memory's Unsqueeze takes its axes as
    an attribute below opset 13."""
    conv1, inits = _conv("conv1", "r0", "c1", 1)
    body = [conv1, N("Relu", ["c1"], ["body"])]
    path = _classifier(tmp_path / "old.onnx", body, inits, opset=11)
    result = run("make-updatable", path, "--trainable-layers", "2")
    assert result.code == 0, result
    artifacts = _base_dir(models_dir) / Files.ARTIFACTS
    assert graph.default_opset(onnx.load(str(artifacts / "training_model.onnx"))) == 13
    head = onnx.load(str(_base_dir(models_dir) / Files.HEAD))
    assert graph.default_opset(head) == 11
    result = run("retrain", "--label", "healthy", *photos["red"])
    assert result.code == 0, result


def test_for_training_leaves_a_head_it_need_not_change_alone():
    head, _ = _head_with([N("Relu", ["c"], ["y"])], [])
    assert decompose.for_training(head) == head


def test_the_refusals_hold_without_onnx_runtime_training(run, tmp_path, monkeypatch):
    """The cut checks are graph analysis: they refuse the same with either trainer."""
    from healthyluncher.training import TRAINER_ENV

    monkeypatch.setenv(TRAINER_ENV, "numpy")
    result = run("make-updatable", _reduce_max(tmp_path / "m.onnx"), "--trainable-layers", "3")
    assert result.code == 1
    assert "ReduceMax" in _one_line_without_ort_text(result.stderr)


# Several linear heads summed (a distilled DeiT): one last layer


@pytest.mark.parametrize("constant_node", [True, False])
def test_two_averaged_heads_become_one_last_layer_exactly(tmp_path, constant_node):
    path = distilled_style(tmp_path / "distilled.onnx", constant_node=constant_node)
    original = onnx.load(str(path))
    merged = onnx.load(str(path))
    analysis = graph.analyze(merged)
    last = analysis.layers[-1]
    assert (last.name, last.op) == ("fc+fc_dist", "Gemm")
    assert [layer.name for layer in analysis.layers[:-1]] == ["conv1", "conv2"]
    assert not {"Add", "Div", "Constant"} & {node.op_type for node in merged.graph.node}
    onnx.checker.check_model(merged)
    x = _image_batch()
    np.testing.assert_allclose(_outputs(merged, x), _outputs(original, x), rtol=1e-5, atol=1e-6)
    assert graph.analyze(merged).layers == analysis.layers  # merging twice changes nothing


def test_a_sum_of_heads_with_another_reader_is_left_alone(tmp_path):
    model = onnx.load(str(distilled_style(tmp_path / "d.onnx")))
    model.graph.output.append(helper.make_tensor_value_info("cls_logits", TensorProto.FLOAT, None))
    assert not rewrites.merge_parallel_heads(model, "logits")
    assert "fc_dist" in {node.name for node in model.graph.node}


@needs_ort
@pytest.mark.parametrize("layers", ["1", "3"])
def test_a_distilled_model_gets_a_new_head_and_personalizes(run, tmp_path, photos, layers):
    """A distilled DeiT was refused at --trainable-layers 1: its two heads read two tensors,
    so no single tensor crossed the cut."""
    model = distilled_style(tmp_path / "distilled.onnx", labels=None, classes=10)
    examples = label_folders(tmp_path / "examples", healthy=".png")
    made = run("make-updatable", model, "--examples", examples, "--trainable-layers", layers)
    assert made.code == 0, made
    blue = [solid(tmp_path / "blue" / f"b{i}.png", (40, 60, 200 + 10 * i)) for i in range(3)]
    before = run("predict", "--json", *blue).json_lines()
    trained = run("retrain", "--label", "healthy", "--json", *blue).json_lines()[0]
    assert all(p["after"] > p["before"] for p in trained["photos"]), trained
    assert run("reset").code == 0
    assert run("predict", "--json", *blue).json_lines() == before


def _conv_classifier(path: Path) -> Path:
    """conv0 -> relu -> a 1x1 Conv to the 2 classes -> GAP -> Flatten: SqueezeNet's way of
    ending, whose last layer is no Gemm or MatMul."""
    rng = np.random.default_rng(4)
    nodes = [
        N("Conv", ["image", "conv0.weight", "conv0.bias"], ["c0"], name="conv0", pads=[1] * 4),
        N("Relu", ["c0"], ["r0"], name="relu0"),
        N("Conv", ["r0", "cls.weight", "cls.bias"], ["scores"], name="cls"),
        N("GlobalAveragePool", ["scores"], ["pooled"], name="pool"),
        N("Flatten", ["pooled"], ["logits"], name="flatten"),
    ]
    inits = [
        _init("conv0.weight", rng.normal(0, 0.3, (8, 3, 3, 3))),
        _init("conv0.bias", np.zeros(8)),
        _init("cls.weight", rng.normal(0, 0.5, (2, 8, 1, 1))),
        _init("cls.bias", np.zeros(2)),
    ]
    return _save(path, nodes, inits)


def test_a_last_layer_the_numpy_trainer_cannot_train_suggests_no_setting_in_use(
    run, tmp_path, monkeypatch
):
    """Without ONNX Runtime training, a model whose last layer is a 1x1 Conv was told to
    'use --trainable-layers 1 here', which it already did."""
    from healthyluncher.training import TRAINER_ENV

    monkeypatch.setenv(TRAINER_ENV, "numpy")
    result = run("make-updatable", _conv_classifier(tmp_path / "squeeze.onnx"))
    assert result.code == 1 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and "last layer" in line and "training package" in line, line
    assert "--trainable-layers" not in line


@pytest.mark.parametrize("layers", ["1", "3"])
def test_a_model_onnx_runtimes_optimizer_breaks_runs_unoptimized(run, tmp_path, layers):
    """ONNX Runtime 1.19 fuses a MatMul on (batch, tokens, channels) and the
    BatchNormalization after its Reshape into a Gemm it then refuses: a torch dynamo export
    of LeViT was refused at every --trainable-layers with 'ONNX Runtime cannot load the
    model: Node (MatMulBnFusion_Gemm) Op (Gemm) [ShapeInferenceError] First input does not
    have rank 2'. Without graph optimizations it loads and runs."""
    if layers == "3":  # a head of more than one layer trains with ONNX Runtime only
        require_ort_training()
    model = levit_style(tmp_path / "levit.onnx")
    result = run("make-updatable", model, "--trainable-layers", layers)
    assert result.code == 0, result
    red = solid(tmp_path / "red.png", (230, 30, 40))
    green = solid(tmp_path / "green.png", (30, 230, 40))
    base = run("predict", "--json", red, green).json_lines()
    assert len(base) == 2 and all(len(row["probabilities"]) == 2 for row in base)
    target = "healthy" if base[0]["label"] == "fast_food" else "fast_food"
    result = run("retrain", "--label", target, "--json", red)
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", red, green).json_lines() == base
