"""A cut where the tensor's first axis is not one row per photo (a Reshape to (-1, C) of
tokens, a Transpose that moves the batch) is refused in one line that lists the working
`--trainable-layers`; a Reshape to (-1, C) that keeps one row per photo still cuts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from healthyluncher import cuts, graph
from healthyluncher.errors import LuncherError
from tests.conftest import needs_ort, solid
from tests.models import SIZE, levit_style, save

TOKENS, CHANNELS = (SIZE // 4) ** 2, 8


def _tokens_model(path: Path, fold: str, *, batch: int | str = "N") -> Path:
    """Patches (batch, tokens, 8) -> `fold` -> MatMul (a layer) -> unfold -> mean -> Gemm.
    `fold`: "reshape" to (-1, 8), "transpose" to (tokens, batch, 8), or "none"."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 4, 4)).astype(np.float32), "patch.w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "patch.b"),
        numpy_helper.from_array(np.array([0, CHANNELS, TOKENS], np.int64), "to_tokens"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "mm.w"),
        numpy_helper.from_array(np.array([-1, CHANNELS], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, TOKENS, CHANNELS], np.int64), "unflat"),
        numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
        numpy_helper.from_array(rng.normal(0, 0.3, (2, 8)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "fc.b"),
    ]
    make = helper.make_node
    fold_nodes, unfold_nodes = {
        "reshape": (
            [make("Reshape", ["t", "flat"], ["x"])],
            [make("Reshape", ["m", "unflat"], ["u"])],
        ),
        "transpose": (
            [make("Transpose", ["t"], ["x"], perm=[1, 0, 2])],
            [make("Transpose", ["m"], ["u"], perm=[1, 0, 2])],
        ),
        "none": ([make("Identity", ["t"], ["x"])], [make("Identity", ["m"], ["u"])]),
    }[fold]
    nodes = [
        make("Conv", ["image", "patch.w", "patch.b"], ["p"], strides=[4, 4]),
        make("Reshape", ["p", "to_tokens"], ["pt"]),
        make("Transpose", ["pt"], ["t"], perm=[0, 2, 1]),
        *fold_nodes,
        make("MatMul", ["x", "mm.w"], ["m"]),
        *unfold_nodes,
        make("ReduceMean", ["u", "token_axis"], ["pooled"], keepdims=0),
        make("Gemm", ["pooled", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph_ = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])],
        inits,
    )
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 18)])
    return save(model, path, ["healthy", "fast_food"])


def _split_problem(path: Path, layers: int) -> str | None:
    model = graph.load_model(path)
    analysis = graph.analyze(model)
    try:
        graph.split(model, analysis, layers)
    except LuncherError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("fold", "batch"), [("reshape", "N"), ("reshape", 1), ("transpose", "N"), ("transpose", 2)]
)
def test_a_cut_whose_first_axis_is_not_the_batch_is_refused(tmp_path, fold, batch):
    """The tensor at the cut folds the batch into the tokens (or moves it): its cached rows
    would be tokens, not photos, and the head ran on one of them per photo (ONNX Runtime:
    'The input tensor cannot be reshaped to the requested shape')."""
    path = _tokens_model(tmp_path / "m.onnx", fold, batch=batch)
    problem = _split_problem(path, 2)
    assert problem is not None and "\n" not in problem, problem
    assert "'x'" in problem and "one row per photo" in problem, problem
    assert re.search(r"choose trainable_layers from 1, 3$", problem), problem
    assert _split_problem(path, 1) is None and _split_problem(path, 3) is None


def test_a_cut_that_keeps_the_batch_first_still_works(tmp_path):
    path = _tokens_model(tmp_path / "m.onnx", "none")
    assert [_split_problem(path, n) for n in (1, 2, 3)] == [None, None, None]


def test_a_reshape_to_minus_one_that_keeps_one_row_per_photo_still_cuts(tmp_path):
    """GlobalAveragePool -> Reshape to (-1, 8) -> Gemm: no symbol says the first axis is
    the batch, but it is one row per photo."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "c.w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "c.b"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "shape"),
        numpy_helper.from_array(rng.normal(0, 0.3, (2, 8)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c.w", "c.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "flat",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = save(model, tmp_path / "flat.onnx", ["healthy", "fast_food"])
    assert _split_problem(path, 1) is None


def test_levit_style_at_two_layers_is_refused_in_one_line(run, tmp_path):
    """A model-zoo run: a LeViT-like model's Reshape to (-1, channels) before its
    BatchNormalization, cut at --trainable-layers 2, ended in 'unexpected
    RuntimeException: ... cannot be reshaped to the requested shape'."""
    model = levit_style(tmp_path / "levit.onnx")
    result = run("make-updatable", model, "--trainable-layers", "2")
    assert result.code == 1 and result.stdout == "", result
    line = result.stderr.strip()
    assert "\n" not in line and "one row per photo" in line, line
    assert line.endswith("choose --trainable-layers from 1, 3, 4"), line
    assert not any(text in line for text in ("onnxruntime", "ONNXRuntimeError", "::"))


@needs_ort
def test_every_advised_count_of_levit_style_works(run, tmp_path):
    model = levit_style(tmp_path / "levit.onnx")
    red = solid(tmp_path / "red.png", (230, 30, 40))
    for layers in ("1", "3", "4"):
        result = run("make-updatable", model, "--trainable-layers", layers, "--force")
        assert result.code == 0, (layers, result)
        base = run("predict", "--json", red).json_lines()
        target = "healthy" if base[0]["label"] == "fast_food" else "fast_food"
        taught = run("retrain", "--label", target, "--json", red)
        assert taught.code == 0, (layers, taught)
        assert all(p["after"] > p["before"] for p in taught.json_lines()[0]["photos"])
        assert run("reset").code == 0
        assert run("predict", "--json", red).json_lines() == base


def test_the_probe_leaves_the_model_alone(tmp_path):
    """The run that checks the cuts adds outputs to a copy, never to the model itself."""
    model = graph.load_model(_tokens_model(tmp_path / "m.onnx", "reshape"))
    analysis = graph.analyze(model)
    before = model.SerializeToString()
    graph.split(model, analysis, 1)
    assert model.SerializeToString() == before
    assert [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.parametrize(("batch", "folded"), [("N", {"f0", "t"}), (1, {"t"})])
def test_the_rule_is_the_first_axis_not_the_op(tmp_path, batch, folded):
    """Flatten with axis 0 puts every photo in one row (with a fixed batch of one, that row
    is the photo's); a Transpose that moves the batch gives channels first; Flatten with
    axis 1, a Reshape to (-1, C) of one vector per photo and the Conv keep a row per photo."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "c.w"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "shape"),
    ]
    make = helper.make_node
    nodes = [
        make("Conv", ["image", "c.w"], ["c"], pads=[1, 1, 1, 1]),
        make("Flatten", ["c"], ["f0"], axis=0),
        make("Flatten", ["c"], ["f1"], axis=1),
        make("Transpose", ["c"], ["t"], perm=[1, 0, 2, 3]),
        make("GlobalAveragePool", ["c"], ["p"]),
        make("Reshape", ["p", "shape"], ["r"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("f0", "r")]
    g = helper.make_graph(
        nodes,
        "rule",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        outputs,
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what ONNX Runtime 1.19 reads (graph.normalize_versions)
    found = cuts.folded_cuts(model, "image", ["c", "f0", "f1", "t", "r"])
    assert found == folded
