"""The numpy trainer against ONNX Runtime's: same weights, losses and predictions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from healthyluncher.errors import LuncherError
from healthyluncher.heads import class_axes, grow_classes
from healthyluncher.linearhead import LinearHead, linear_head_of
from healthyluncher.numpy_trainer import train_linear
from healthyluncher.settings import Hyperparameters, OptimizerName
from healthyluncher.trainers import TrainingSet, epoch_order, generate_artifacts, train
from tests.conftest import require_ort_training

FEATURES = 16
CLASSES = 3

# How far train_linear's weights may be from ORT's. Measured on the eight cases below, whose
# weights move by 0.15 to 1.3 from the start: at most 1.9e-7 with AdamW and 6.0e-8 with SGD;
# over the same heads with 20 other seeds each, at most 3.0e-7 and 1.2e-7 (2.5 and 1 ulp at
# 1.0). Neither side is exact: ORT's float32 kernels and numpy's BLAS round differently, and
# AdamW divides by the root of the squared gradients, which magnifies the differences where a
# gradient is small. The tolerances are about three times the worst case seen.
WEIGHT_TOLERANCE = {"adamw": 1e-6, "sgd": 4e-7}
# Epoch mean losses, measured at most 8e-8 apart over the same runs.
LOSS_TOLERANCE = 3e-7


def _model(
    nodes: list[onnx.NodeProto], inits: list[np.ndarray], names: list[str]
) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "head",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURES])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
            [numpy_helper.from_array(a, n) for a, n in zip(inits, names, strict=True)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 10
    return model


def gemm_head(seed: int = 0) -> onnx.ModelProto:
    """PyTorch's nn.Linear: Gemm with transB=1, weight (C, D), bias (C,)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.3, (CLASSES, FEATURES)).astype(np.float32)
    bias = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    node = helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], transB=1)
    return _model([node], [weight, bias], ["fc.weight", "fc.bias"])


def matmul_head(seed: int = 0) -> onnx.ModelProto:
    """Keras's Dense: MatMul by a (D, C) kernel, then Add of the bias."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0, 0.3, (FEATURES, CLASSES)).astype(np.float32)
    bias = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["features", "dense/kernel"], ["mm"]),
        helper.make_node("Add", ["mm", "dense/bias"], ["logits"]),
    ]
    return _model(nodes, [kernel, bias], ["dense/kernel", "dense/bias"])


HEADS = {"gemm": gemm_head, "matmul": matmul_head}


def params_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def predictions(
    model: onnx.ModelProto, params: dict[str, np.ndarray], inputs: np.ndarray
) -> np.ndarray:
    """The class the ONNX head (run by onnx's reference evaluator) picks with `params`."""
    trained = onnx.ModelProto()
    trained.CopyFrom(model)
    del trained.graph.initializer[:]
    trained.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in params.items())
    (logits,) = ReferenceEvaluator(trained).run(None, {"features": inputs})
    picked: np.ndarray = np.asarray(logits).argmax(axis=1)
    return picked


def training_set(weighted: bool) -> TrainingSet:
    """48 random examples: 16 "own" inputs and 32 more in `extra` (the replay layout)."""
    rng = np.random.default_rng(1)
    inputs = rng.normal(0, 1, (48, FEATURES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 48).astype(np.int64)
    weights = np.where(labels == 2, 4.0, 1.0) if weighted else np.ones(48)
    return TrainingSet(inputs=inputs[:16], labels=labels, weights=weights, extra=inputs[16:])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Training artifacts for each head and optimizer, generated once for the module."""
    require_ort_training()
    root = tmp_path_factory.mktemp("artifacts")
    made = {}
    for kind, make in HEADS.items():
        model = make()
        for optimizer in ("adamw", "sgd"):
            directory = root / f"{kind}-{optimizer}"
            generate_artifacts(model, tuple(params_of(model)), optimizer, directory)
            made[kind, optimizer] = directory
    return made


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "equal"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_same_training_as_onnx_runtime(
    artifacts: dict[tuple[str, str], Path], kind: str, optimizer: OptimizerName, weighted: bool
) -> None:
    model = HEADS[kind]()
    start = params_of(model)
    spec = linear_head_of(model, tuple(start))
    assert spec is not None
    data = training_set(weighted)
    # A learning rate high enough for the weights to move far (0.15 to 1.3), so that drift
    # would show; batch_limit 5 leaves a short last batch (48 = 9 x 5 + 3).
    hp = Hyperparameters(epochs=6, learning_rate=0.05, batch_size=16, optimizer=optimizer)
    limit = 5 if weighted else None
    ort_epochs: list[tuple[int, int, float]] = []
    numpy_epochs: list[tuple[int, int, float]] = []

    ort = train(
        artifacts[kind, optimizer],
        data,
        hp,
        start=start,
        batch_limit=limit,
        on_epoch=lambda *e: ort_epochs.append(e),
    )
    params, loss = train_linear(
        spec, start, data, hp, batch_limit=limit, on_epoch=lambda *e: numpy_epochs.append(e)
    )

    assert set(params) == set(start)
    for name, value in params.items():
        assert value.dtype == np.float32 and value.shape == start[name].shape
    moved = max(float(np.abs(params[n] - start[n]).max()) for n in start)
    drift = max(float(np.abs(params[n] - ort.params[n]).max()) for n in start)
    gap = loss - ort.final_loss
    print(f"{kind} {optimizer} {weighted=}: {drift=:.3g} {moved=:.3g} {gap=:.2g}")
    assert moved > 0.1
    assert drift <= WEIGHT_TOLERANCE[optimizer]
    assert loss == pytest.approx(ort.final_loss, abs=LOSS_TOLERANCE)
    assert [e[:2] for e in numpy_epochs] == [e[:2] for e in ort_epochs]
    for ours, theirs in zip(numpy_epochs, ort_epochs, strict=True):
        assert ours[2] == pytest.approx(theirs[2], abs=LOSS_TOLERANCE)
    held_out = np.random.default_rng(2).normal(0, 1, (200, FEATURES)).astype(np.float32)
    assert np.array_equal(
        predictions(model, params, held_out), predictions(model, ort.params, held_out)
    )


def test_nothing_to_train_on() -> None:
    model = gemm_head()
    spec = linear_head_of(model, tuple(params_of(model)))
    assert spec is not None
    empty = TrainingSet(
        inputs=np.zeros((0, FEATURES), np.float32),
        labels=np.zeros(0, np.int64),
        weights=np.zeros(0),
    )
    with pytest.raises(LuncherError, match="nothing to train on"):
        train_linear(spec, params_of(model), empty, Hyperparameters())


def test_start_must_match_the_head() -> None:
    model = gemm_head()
    spec = linear_head_of(model, tuple(params_of(model)))
    assert spec is not None
    start = params_of(model)
    data = training_set(weighted=False)
    with pytest.raises(LuncherError, match="shape"):
        train_linear(spec, {**start, "fc.weight": start["fc.weight"].T}, data, Hyperparameters())
    with pytest.raises(LuncherError, match="expected the parameters"):
        train_linear(spec, {"fc.weight": start["fc.weight"]}, data, Hyperparameters())


def test_linear_head_of_accepts_both_exports() -> None:
    gemm = linear_head_of(gemm_head(), ("fc.weight", "fc.bias"))
    assert gemm == LinearHead(
        op="Gemm",
        weight="fc.weight",
        bias="fc.bias",
        features=FEATURES,
        classes=CLASSES,
        trans_b=True,
    )
    keras = linear_head_of(matmul_head(), ("dense/bias", "dense/kernel"))
    assert keras == LinearHead(
        op="MatMul", weight="dense/kernel", bias="dense/bias", features=FEATURES, classes=CLASSES
    )


def test_linear_head_of_allows_identity_after_the_layer() -> None:
    model = gemm_head()
    model.graph.node[0].output[0] = "raw"
    model.graph.node.extend(
        [
            helper.make_node("Identity", ["raw"], ["copy"]),
            helper.make_node("Identity", ["copy"], ["logits"]),
        ]
    )
    assert linear_head_of(model, ("fc.weight", "fc.bias")) is not None


def _relu_after() -> tuple[onnx.ModelProto, tuple[str, ...]]:
    model = gemm_head()
    model.graph.node[0].output[0] = "raw"
    model.graph.node.append(helper.make_node("Relu", ["raw"], ["logits"]))
    return model, ("fc.weight", "fc.bias")


def _two_layers() -> tuple[onnx.ModelProto, tuple[str, ...]]:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["hidden"], transB=1),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1),
    ]
    arrays = [
        rng.normal(0, 1, (8, FEATURES)).astype(np.float32),
        np.zeros(8, np.float32),
        rng.normal(0, 1, (CLASSES, 8)).astype(np.float32),
        np.zeros(CLASSES, np.float32),
    ]
    return _model(nodes, arrays, ["w1", "b1", "w2", "b2"]), ("w1", "b1", "w2", "b2")


def _rank4_input() -> tuple[onnx.ModelProto, tuple[str, ...]]:
    model = matmul_head()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims.add().dim_value = 1
    dims.add().dim_value = 1
    return model, ("dense/kernel", "dense/bias")


def _trans_a() -> tuple[onnx.ModelProto, tuple[str, ...]]:
    model = gemm_head()
    model.graph.node[0].attribute.append(helper.make_attribute("transA", 1))
    return model, ("fc.weight", "fc.bias")


def _frozen_bias() -> tuple[onnx.ModelProto, tuple[str, ...]]:
    return gemm_head(), ("fc.weight",)


def _conv() -> tuple[onnx.ModelProto, tuple[str, ...]]:
    weight = np.ones((CLASSES, FEATURES, 1, 1), np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["features", "w"], ["logits"])],
            "conv",
            [
                helper.make_tensor_value_info(
                    "features", TensorProto.FLOAT, ["batch", FEATURES, 1, 1]
                )
            ],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES, 1, 1])],
            [numpy_helper.from_array(weight, "w")],
        )
    )
    return model, ("w",)


@pytest.mark.parametrize(
    "make", [_relu_after, _two_layers, _rank4_input, _trans_a, _frozen_bias, _conv]
)
def test_linear_head_of_refuses_anything_else(make: Any) -> None:
    model, trainable = make()
    assert linear_head_of(model, trainable) is None


def test_json_round_trip() -> None:
    spec = LinearHead(
        op="Gemm", weight="w", bias=None, features=4, classes=2, trans_b=False, alpha=0.5, beta=2.0
    )
    assert LinearHead.from_json(spec.to_json()) == spec
    assert LinearHead.from_json({**spec.to_json(), "future_key": 1}) == spec


GOOD: dict[str, Any] = {
    "op": "Gemm",
    "weight": "w",
    "bias": "b",
    "features": 4,
    "classes": 2,
    "trans_b": True,
    "alpha": 1.0,
    "beta": 1.0,
}


@pytest.mark.parametrize(
    "change",
    [
        {"op": "Conv"},
        {"weight": 3},
        {"weight": ""},
        {"bias": 5},
        {"bias": "w"},
        {"features": 0},
        {"features": -1},
        {"features": 1.5},
        {"classes": True},
        {"classes": "2"},
        {"trans_b": 1},
        {"alpha": math.nan},
        {"alpha": math.inf},
        {"beta": "1"},
        {"beta": None},
        {"alpha": True},
        {"op": "MatMul"},  # MatMul has no transB
    ],
)
def test_from_json_refuses_bad_values(change: dict[str, Any]) -> None:
    with pytest.raises(LuncherError, match="linear head"):
        LinearHead.from_json({**GOOD, **change})


@pytest.mark.parametrize("data", [[], None, {k: v for k, v in GOOD.items() if k != "alpha"}])
def test_from_json_refuses_bad_shapes(data: Any) -> None:
    with pytest.raises(LuncherError, match="linear head"):
        LinearHead.from_json(data)


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_grown_matches_heads_grow_classes(kind: str) -> None:
    model = HEADS[kind]()
    spec = linear_head_of(model, tuple(params_of(model)))
    assert spec is not None
    grown = spec.grown(2, params_of(model))
    grow_classes(model, class_axes(model, CLASSES), 2)
    expected = params_of(model)
    assert set(grown) == set(expected)
    for name, value in grown.items():
        assert value.dtype == expected[name].dtype
        np.testing.assert_array_equal(value, expected[name])
    bigger = spec.with_extra_classes(2)
    assert bigger.classes == CLASSES + 2
    # The grown parameters train as the grown head.
    data = training_set(weighted=True)
    five = TrainingSet(
        inputs=data.inputs, labels=data.labels + 2, weights=data.weights, extra=data.extra
    )
    params, _ = train_linear(bigger, grown, five, Hyperparameters(epochs=1))
    assert {n: v.shape for n, v in params.items()} == {n: v.shape for n, v in grown.items()}
    with pytest.raises(LuncherError):
        spec.grown(-1, params_of(HEADS[kind]()))


def test_epochs_draw_at_most_the_cap_and_both_trainers_follow_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With years of examples every epoch drew one example per row (5,000 photos: 1,690
    optimizer steps for a 5-photo retrain). Epochs now draw at most MAX_DRAWS_PER_EPOCH,
    by the same weights; below it nothing changes, draw for draw."""
    from healthyluncher import numpy_trainer, trainers

    p = np.full(48, 1 / 48)
    p[:8] *= 3
    p /= p.sum()
    for weighted in (True, False):
        old_rule = np.random.default_rng(7)
        expected = (
            old_rule.choice(48, size=48, replace=True, p=p)
            if weighted
            else old_rule.permutation(48)
        )
        got = trainers.epoch_order(np.random.default_rng(7), p, weighted)
        assert np.array_equal(got, expected)  # under the cap: the draws of before

    model = gemm_head()
    start = params_of(model)
    spec = linear_head_of(model, tuple(start))
    assert spec is not None
    steps = 0
    real = numpy_trainer._Params.loss_and_gradients

    def counted(*args: Any) -> Any:
        nonlocal steps
        steps += 1
        return real(*args)

    monkeypatch.setattr(numpy_trainer._Params, "loss_and_gradients", counted)
    monkeypatch.setattr(trainers, "MAX_DRAWS_PER_EPOCH", 20)
    assert len(trainers.epoch_order(np.random.default_rng(0), p, True)) == 20
    hp = Hyperparameters(epochs=3, learning_rate=0.05, batch_size=16)
    train_linear(spec, start, training_set(weighted=True), hp)
    assert steps == 3 * 2  # 20 draws in batches of 16 per epoch; 48 rows made 3 batches


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_capped_epochs_train_the_same_as_onnx_runtime(
    artifacts: dict[tuple[str, str], Path],
    optimizer: OptimizerName,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from healthyluncher import trainers

    monkeypatch.setattr(trainers, "MAX_DRAWS_PER_EPOCH", 20)
    model = gemm_head()
    start = params_of(model)
    spec = linear_head_of(model, tuple(start))
    assert spec is not None
    data = training_set(weighted=True)
    hp = Hyperparameters(epochs=6, learning_rate=0.05, batch_size=16, optimizer=optimizer)
    ort = train(artifacts["gemm", optimizer], data, hp, start=start)
    params, loss = train_linear(spec, start, data, hp)
    drift = max(float(np.abs(params[n] - ort.params[n]).max()) for n in start)
    assert drift <= WEIGHT_TOLERANCE[optimizer]
    assert loss == pytest.approx(ort.final_loss, abs=LOSS_TOLERANCE)


def _reference_step(
    spec: LinearHead,
    params: dict[str, np.ndarray],
    state: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    hp: Hyperparameters,
) -> float:
    """One step as train_linear took it before its parameters shared one vector: the loss
    and gradients per parameter, then AdamW or SGD per parameter, in the kernels' order."""
    from healthyluncher import numpy_trainer as nt

    xs = x.astype(np.float64)
    weight = params[spec.weight].astype(np.float64)
    logits = xs @ (weight.T if spec.trans_b else weight)
    if spec.alpha != 1.0:
        logits *= spec.alpha
    if spec.bias is not None:
        logits += spec.beta * params[spec.bias].astype(np.float64).reshape(-1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    loss = float(np.float32(-log_prob[rows, y].mean()))
    d_logits = np.exp(log_prob)
    d_logits[rows, y] -= 1.0
    d_logits /= len(y)
    d_w = spec.alpha * (xs.T @ d_logits)
    grads = {spec.weight: (d_w.T if spec.trans_b else d_w).astype(np.float32)}
    if spec.bias is not None:
        d_b = spec.beta * d_logits.sum(axis=0)
        grads[spec.bias] = d_b.reshape(params[spec.bias].shape).astype(np.float32)
    lr, one = np.float32(hp.learning_rate), np.float32(1.0)
    if hp.optimizer == "sgd":
        for name, g in grads.items():
            params[name] += -lr * g
        return loss
    state["steps"] += 1
    correction1 = one - np.float32(float(nt.ADAMW_BETA1) ** state["steps"])
    correction2 = one - np.float32(float(nt.ADAMW_BETA2) ** state["steps"])
    lr_corrected = lr * (np.sqrt(correction2) / correction1)
    for name, g in grads.items():
        m1 = state.setdefault(("m1", name), np.zeros_like(g))
        m2 = state.setdefault(("m2", name), np.zeros_like(g))
        m1 = state["m1", name] = nt.ADAMW_BETA1 * m1 + (one - nt.ADAMW_BETA1) * g
        m2 = state["m2", name] = nt.ADAMW_BETA2 * m2 + (one - nt.ADAMW_BETA2) * g * g
        params[name] -= lr_corrected * m1 / (np.sqrt(m2) + nt.ADAMW_EPSILON)
    return loss


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize(
    "layer",
    [
        {"op": "Gemm", "trans_b": True},
        {"op": "Gemm", "trans_b": False, "alpha": 0.7, "beta": 1.3},
        {"op": "Gemm", "trans_b": True, "bias": None, "alpha": 2.0},
        {"op": "MatMul", "bias_shape": (1, CLASSES)},
    ],
    ids=["gemm", "gemm-alpha-beta", "gemm-no-bias", "matmul-row-bias"],
)
def test_the_trainer_gives_the_same_bits_as_one_step_per_parameter(
    layer: dict[str, Any], optimizer: OptimizerName
) -> None:
    """train_linear keeps the weight and the bias in one vector, so each optimizer step is
    one set of elementwise operations instead of one per parameter (a cached retrain of
    the shipped head: 41 -> 32 ms). Elementwise float32 arithmetic rounds each entry on its
    own, so the weights must not change by a single bit."""
    layer = dict(layer)
    bias_shape = layer.pop("bias_shape", (CLASSES,))
    spec = LinearHead(
        weight="w",
        bias=layer.pop("bias", "b"),
        features=FEATURES,
        classes=CLASSES,
        **layer,
    )
    rng = np.random.default_rng(3)
    start = {"w": rng.normal(0, 0.3, spec.weight_shape).astype(np.float32)}
    if spec.bias is not None:
        start["b"] = rng.normal(0, 0.1, bias_shape).astype(np.float32)
    data = training_set(weighted=True)
    hp = Hyperparameters(epochs=4, learning_rate=0.05, batch_size=16, optimizer=optimizer)
    params, loss = train_linear(spec, start, data, hp, batch_limit=5)

    expected = {name: value.copy() for name, value in start.items()}
    state: dict[str, Any] = {"steps": 0}
    inputs = np.concatenate([data.inputs, data.extra])
    p = data.weights / data.weights.sum()
    order_rng = np.random.default_rng(hp.seed)
    for _ in range(hp.epochs):
        order = epoch_order(order_rng, p, True)
        losses = [
            _reference_step(spec, expected, state, inputs[i], data.labels[i], hp)
            for i in (order[at : at + 5] for at in range(0, len(order), 5))
        ]
    assert loss == float(np.mean(losses))
    for name, value in expected.items():
        assert params[name].dtype == np.float32 and params[name].shape == value.shape
        assert params[name].tobytes() == value.tobytes(), name
