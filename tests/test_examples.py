"""make-updatable --examples: a new head from a folder of photos, and preprocessing presets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import healthyluncher
from healthyluncher import Progress, headfit
from tests.conftest import label_folders, needs_ort, one_line_error, solid
from tests.models import batch_one_head, dynamo_squeezenet_style, keras_style, pytorch_style, save


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """One subfolder per label, ten photos each, told apart by colour."""
    return label_folders(tmp_path / "examples")


@pytest.fixture
def stock(tmp_path: Path) -> Path:
    """A stock export: ten unnamed classes, as an ImageNet model has a thousand."""
    return pytorch_style(tmp_path / "stock.onnx", labels=None, classes=10)


def test_a_stock_export_gets_a_new_head_for_the_folders_labels(
    run, stock, examples, photos, tmp_path
):
    result = run("make-updatable", stock, "--examples", examples)
    assert result.code == 0, result
    assert "A new final layer for your photos (fast_food: 10, healthy: 10)" in result.stdout
    assert "held-out accuracy" in result.stdout
    status = run("status", "--json").json_lines()[0]
    assert sorted(status["labels"]) == ["fast_food", "healthy"]
    assert status["replay_examples"] > 0  # the photos became the replay set
    rows = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3 + ["healthy"] * 3

    # Personalize it end to end: a retrain raises the label, reset restores exactly.
    blue = [solid(tmp_path / "blue" / f"b{i}.png", (40, 60, 200 + 10 * i)) for i in range(3)]
    before = run("predict", "--json", *blue).json_lines()
    trained = run("retrain", "--label", "healthy", "--json", *blue).json_lines()[0]
    assert all(p["after"] > p["before"] for p in trained["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", *blue).json_lines() == before


@needs_ort
def test_a_full_temporary_directory_is_one_line(run, pt_model, examples, tmp_path):
    """The new head's training files go to a work folder (in the models directory since a
    killed build left them in $TMPDIR): full, it was 'unexpected OSError'
    (before, 'ONNX Runtime training fails on the trainable part', as if the model could not
    train)."""
    import errno

    from healthyluncher import artifacts

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifacts, "write", full)
        result = run("make-updatable", pt_model, "--examples", examples)
    one_line_error(result, "cannot write training files", "No space left on device")
    assert run("make-updatable", pt_model, "--examples", examples).code == 0


def test_the_models_own_labels_fine_tune_its_head(run, pt_model, examples):
    result = run("make-updatable", pt_model, "--examples", examples)
    assert result.code == 0, result
    assert "The model's own head, fine-tuned on your photos" in result.stdout
    # The model's order of classes is kept, not the folders' alphabetical one.
    assert run("status", "--json").json_lines()[0]["labels"] == ["healthy", "fast_food"]


def test_a_label_count_that_does_not_match_points_to_examples(run, stock):
    result = run("make-updatable", stock, "--labels", "healthy,fast_food")
    assert result.code == 1
    assert "--examples DIR" in result.stderr and "\n" not in result.stderr.strip()
    result = run("make-updatable", stock)
    assert result.code == 1 and "--examples DIR" in result.stderr


def test_examples_folders_are_checked(run, stock, tmp_path):
    one = tmp_path / "one"
    solid(one / "healthy" / "a.png", (10, 200, 10))
    result = run("make-updatable", stock, "--examples", one)
    assert result.code == 1 and "at least two" in result.stderr
    (one / "fast_food").mkdir()
    (one / "fast_food" / "notes.txt").write_text("not a photo")
    result = run("make-updatable", stock, "--examples", one)
    assert result.code == 1 and "holds no photos" in result.stderr
    result = run("make-updatable", stock, "--examples", tmp_path / "missing")
    assert result.code == 1 and "not a directory" in result.stderr


def test_the_api_reports_progress_while_photos_are_embedded(stock, examples, models_dir):
    events: list[Progress] = []
    result = healthyluncher.make_updatable(
        stock, examples=examples, models_dir=models_dir, progress=events.append
    )
    assert result.examples is not None and result.examples.replaced_head
    embedding = [e for e in events if e.stage == "embedding"]
    assert embedding[-1].done == embedding[-1].total == 20
    assert any(e.stage == "training" for e in events)
    assert healthyluncher.open(models_dir).labels == ("fast_food", "healthy")


@pytest.mark.parametrize(
    ("option", "mean", "std"),
    [
        ("imagenet", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),
        ("inception", [127.5] * 3, [127.5] * 3),
        ("unit", [0.0] * 3, [255.0] * 3),
        ("raw", [0.0] * 3, [1.0] * 3),
    ],
)
def test_preprocessing_presets_and_where_they_came_from(
    run, tmp_path, models_dir, option, mean, std
):
    model = keras_style(tmp_path / "keras.onnx")
    result = run("make-updatable", model, "--preprocessing", option, "--force")
    assert result.code == 0, result
    assert f"Preprocessing from --preprocessing {option}" in result.stdout
    state = json.loads((models_dir / "state.json").read_text())
    meta = json.loads((models_dir / state["base"] / "meta.json").read_text())
    assert meta["preprocessing"]["mean"] == mean and meta["preprocessing"]["std"] == std


def test_the_default_preprocessing_says_it_is_a_default(run, tmp_path):
    result = run("make-updatable", keras_style(tmp_path / "keras.onnx"))
    assert "Preprocessing from the default (ImageNet mean and std" in result.stdout
    result = run("make-updatable", keras_style(tmp_path / "k2.onnx"), "--preprocessing", "bgr")
    assert result.code == 2  # not one of the choices: a usage error


def deep_model(path: Path, convs: int) -> Path:
    """`convs` 1x1 convolutions, then pooling and a Gemm: many layers before the cut."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, current = [], [], "image"
    for k in range(convs):
        weight = rng.normal(0, 0.5, (3, 3, 1, 1)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"conv{k}.weight"))
        nodes.append(helper.make_node("Conv", [current, f"conv{k}.weight"], [f"c{k}"]))
        current = f"c{k}"
    inits.append(numpy_helper.from_array(rng.normal(0, 1, (2, 3)).astype(np.float32), "fc.w"))
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "fc.w"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return save(model, path, ["healthy", "fast_food"])


def test_the_layer_table_shows_the_layers_near_the_cut(run, tmp_path):
    model = deep_model(tmp_path / "deep.onnx", convs=8)
    short = run("make-updatable", model).stdout
    assert "the last 4 of 9; --verbose lists all" in short
    assert "conv4.weight" not in short and "conv5.weight" in short and "fc.w" in short
    full = run("make-updatable", model, "--force", "--verbose").stdout
    assert all(f"conv{k}.weight" in full for k in range(8))


def float16_model(source: Path, target: Path) -> Path:
    """float16 weights with float32 input and output, as onnxconverter-common's
    convert_float_to_float16(model, keep_io_types=True) writes them."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
    image, logits = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        node.input[:] = [f"{image}/half" if x == image else x for x in node.input]
        node.output[:] = [f"{logits}/half" if x == logits else x for x in node.output]
    nodes = [
        helper.make_node("Cast", [image], [f"{image}/half"], to=TensorProto.FLOAT16),
        *graph.node,
        helper.make_node("Cast", [f"{logits}/half"], [logits], to=TensorProto.FLOAT),
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize("with_examples", [False, True], ids=["own head", "examples"])
def test_a_float16_model_trains_its_head_in_float32(run, tmp_path, photos, examples, with_examples):
    model = float16_model(pytorch_style(tmp_path / "m.onnx"), tmp_path / "half.onnx")
    extra = ["--examples", str(examples)] if with_examples else []
    assert run("make-updatable", model, *extra).code == 0
    base = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    target = "healthy" if base[0]["label"] == "fast_food" else "fast_food"
    result = run("retrain", "--label", target, "--json", "--epochs", "30", *photos["red"])
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", *photos["red"], *photos["green"]).json_lines() == base


def _relu6_with_shared_bounds(source: Path, target: Path) -> Path:
    """Every Relu made Clip(0, 6), all reading one pair of bound tensors, as torch's
    dynamo exporter writes torchvision's MobileNetV2 (ReLU6 ... 'min_val_cast')."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Clip"
            node.input.extend(["min_val_cast", "max_val_cast"])
    for name, value in (("min_val_cast", 0.0), ("max_val_cast", 6.0)):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    model.opset_import[0].version = 18
    onnx.checker.check_model(model)
    helper.set_model_props(model, {"labels": '["healthy", "fast_food"]'})
    onnx.save(model, str(target))
    return target


@needs_ort  # a head deeper than one layer, or a Conv: the training package
@pytest.mark.parametrize("with_examples", [False, True], ids=["own head", "examples"])
def test_float16_constants_the_frozen_part_shares_with_the_head_stay_float16_there(
    run, tmp_path, photos, examples, with_examples
):
    """The head's float16 constants became float32 in the whole model, where the frozen
    part's Clip read them too: a dynamo export of MobileNetV2 with float16 weights was
    refused at --trainable-layers 2 and 3 with 'ONNX Runtime cannot load the model: Type
    Error: Type parameter (T) of Optype (Clip) bound to different types (tensor(float16)
    and tensor(float)'."""
    relu6 = _relu6_with_shared_bounds(pytorch_style(tmp_path / "m.onnx"), tmp_path / "r6.onnx")
    model = float16_model(relu6, tmp_path / "half.onnx")
    extra = ["--examples", str(examples)] if with_examples else []
    result = run("make-updatable", model, "--trainable-layers", "2", *extra)
    assert result.code == 0, result
    base = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert len(base) == 6
    result = run("retrain", "--label", "healthy", "--json", "--epochs", "30", *photos["red"])
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", *photos["red"], *photos["green"]).json_lines() == base


def test_folders_of_links_to_folders_are_searched(run, stock, examples, tmp_path):
    """A label folder made of symlinks to dish folders (and a link to itself, which must not
    loop) finds every photo once."""
    linked = tmp_path / "linked"
    for label in ("fast_food", "healthy"):
        (linked / label).mkdir(parents=True)
        (linked / label / "dish").symlink_to(examples / label, target_is_directory=True)
    (examples / "healthy" / "again").symlink_to(examples / "healthy", target_is_directory=True)
    result = run("make-updatable", stock, "--examples", linked)
    assert result.code == 0, result
    assert "(fast_food: 10, healthy: 10)" in result.stdout


def test_labels_with_examples_set_the_order_of_a_new_head(run, stock, examples, photos):
    result = run("make-updatable", stock, "--examples", examples, "--labels", "healthy,fast_food")
    assert result.code == 0, result
    assert run("status", "--json").json_lines()[0]["labels"] == ["healthy", "fast_food"]
    rows = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3 + ["healthy"] * 3


def test_huge_alike_features_are_scaled_so_a_retrain_raises_the_label(
    run, tmp_path, examples, photos
):
    """A random-weight deep network's features are huge and alike (a ResNet-50's: L1 norm
    90,000, cosine 0.997 between any two photos); at the default learning rate each AdamW
    step then moved a logit by about a hundred, and a retrain to healthy took healthy's
    probability from 1.0 to 0.0. make-updatable --examples scales such inputs down."""
    model = pytorch_style(tmp_path / "huge.onnx", labels=None, classes=10, gain=10, offset=1e5)
    result = run("make-updatable", model, "--examples", examples)
    assert result.code == 0, result
    assert "features are very large; they are scaled by" in result.stdout
    before = run("predict", "--json", *photos["red"]).json_lines()
    trained = run("retrain", "--label", "healthy", "--json", *photos["red"]).json_lines()[0]
    assert all(p["after"] > p["before"] for p in trained["photos"]), trained
    after = run("predict", "--json", *photos["red"]).json_lines()
    for b, a in zip(before, after, strict=True):
        assert a["probabilities"]["healthy"] > b["probabilities"]["healthy"]
    assert run("reset").code == 0
    assert run("predict", "--json", *photos["red"]).json_lines() == before


def test_ordinary_features_are_not_scaled(run, stock, examples):
    result = run("make-updatable", stock, "--examples", examples)
    assert result.code == 0 and "scaled by" not in result.stdout


def test_a_taught_photo_takes_its_label_next_to_a_base_example_of_another(
    run, stock, examples, tmp_path
):
    """The user's word about a photo beats a base example that looks almost the same:
    before, the memory gave a taught photo almost nothing when a replayed example of the
    other label was nearly identical to it, and a retrain left it with the other label."""
    twins = [
        solid(tmp_path / "twins" / f"t{i}.png", (170 + 10 * i, 26 + 3 * i, 40)) for i in range(3)
    ]
    assert run("make-updatable", stock, "--examples", examples).code == 0
    rows = run("predict", "--json", *twins).json_lines()
    assert [r["label"] for r in rows] == ["fast_food"] * 3  # near copies of fast_food examples
    trained = run("retrain", "--label", "healthy", "--json", *twins).json_lines()[0]
    assert all(p["after"] > 0.5 for p in trained["photos"]), trained
    assert [r["label"] for r in run("predict", "--json", *twins).json_lines()] == ["healthy"] * 3


def test_a_float16_model_with_huge_features_is_scaled_in_float16(run, tmp_path, photos, examples):
    """The scale goes where the frozen part ends: in a float16 frozen part it must be a
    float16 constant (a float32 one made ONNX Runtime refuse the model: "Type parameter (T)
    of Optype (Mul) bound to different types")."""
    huge = pytorch_style(tmp_path / "m.onnx", labels=None, classes=10, gain=3, offset=3e4)
    model = float16_model(huge, tmp_path / "half.onnx")
    result = run("make-updatable", model, "--examples", examples)
    assert result.code == 0, result
    assert "scaled by" in result.stdout
    base = run("predict", "--json", *photos["red"]).json_lines()
    trained = run("retrain", "--label", "healthy", "--json", *photos["red"]).json_lines()[0]
    assert all(p["after"] > p["before"] for p in trained["photos"]), trained
    assert run("reset").code == 0
    assert run("predict", "--json", *photos["red"]).json_lines() == base


def test_a_replay_set_beside_the_model_is_used(run, tmp_path, pt_model, photos):
    """`make-updatable healthyluncher-base.onnx` ignored the .replay.npz beside it: that
    base then called 400 of 403 pizza and beignet photos healthy after a pancake retrain."""
    import numpy as np

    model = tmp_path / "mine.onnx"
    model.write_bytes(pt_model.read_bytes())
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "mine.replay.npz",
        inputs=rng.random((6, 8)).astype(np.float32),
        labels=np.array(["healthy", "fast_food"] * 3),
    )
    result = run("make-updatable", model)
    assert result.code == 0, result
    assert "Replay set: 6 examples from" in result.stdout and "found beside" in result.stdout
    assert run("status", "--json").json_lines()[0]["replay_examples"] == 6
    # --examples builds its own replay set: the file beside the model is not mixed in.
    folder = tmp_path / "ex"
    for i in range(5):
        solid(folder / "healthy" / f"h{i}.png", (30, 160 + 9 * i, 40))
        solid(folder / "fast_food" / f"f{i}.png", (170 + 9 * i, 30, 40))
    again = run("make-updatable", model, "--examples", folder, "--force")
    assert again.code == 0 and "found beside" not in again.stdout


def test_the_replay_set_spreads_over_a_labels_subfolders(tmp_path):
    """A dish with few photos kept few replay rows (chosen by hash in proportion: 3 of 54
    fruit photos against 95 of 247 beet salads), so personalizing forgot it first. Each
    subfolder (dish) now gets an even share of the label's replay rows."""
    from healthyluncher import headfit

    root = tmp_path / "examples"
    for i in range(6):
        solid(root / "healthy" / "salad" / f"s{i}.png", (30, 150 + 10 * i, 40))
    solid(root / "healthy" / "fruit" / "f0.png", (200, 200, 20))
    solid(root / "healthy" / "loose.png", (20, 200, 200))
    for i in range(3):
        solid(root / "fast_food" / f"b{i}.png", (150 + 10 * i, 20, 40))
    found = headfit.read_examples(root)
    named = {Path(str(p)).name: g for (p, _), g in zip(found.photos, found.groups, strict=True)}
    assert named == {
        **{f"s{i}.png": "salad" for i in range(6)},
        "f0.png": "fruit",
        "loose.png": "",
        **{f"b{i}.png": "" for i in range(3)},
    }

    rng = np.random.default_rng(0)
    groups = np.array(["big"] * 300 + ["small"] * 10 + ["mid"] * 40 + [""] * 50, dtype=object)
    labels = np.array([0] * 350 + [1] * 50)
    digests = np.array([f"{rng.integers(1 << 60):016x}" for _ in range(400)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(headfit, "REPLAY_PER_LABEL", 60)
        rows = headfit._replay(labels, digests, groups)
    kept = {g: int(np.sum(groups[rows] == g)) for g in ("big", "small", "mid", "")}
    assert kept == {"big": 25, "small": 10, "mid": 25, "": 50}
    assert headfit.fair_quotas({"a": 1, "b": 100, "c": 100}, 1000) == {"a": 1, "b": 100, "c": 100}


def _tensor_of(model_path: Path, tensor: str, image: np.ndarray) -> np.ndarray:
    """`tensor` as `model_path` computes it for `image` (an inner tensor made an output)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))  # the base's weights file too
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, 1, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([tensor], {"image": image})[0])


@pytest.mark.parametrize("layers, scaled", [(1, True), pytest.param(2, False, marks=needs_ort)])
def test_head_inputs_are_scaled_only_where_no_pretrained_layer_reads_them(
    tmp_path, examples, layers, scaled
):
    """With a new last layer behind a pretrained one (--trainable-layers 2), scaling the
    large head inputs down (as a new linear head needs) fed the pretrained layer inputs it
    was never trained on: the shipped backbone's one-step deeper base called every photo
    fast food (held out 0.35). The pretrained layer must compute what it computed."""
    stock = pytorch_style(tmp_path / "stock.onnx", labels=None, classes=10, gain=100)
    options = healthyluncher.Hyperparameters(learning_rate=1e-9)  # training moves nothing
    result = healthyluncher.make_updatable(
        stock,
        examples=examples,
        trainable_layers=layers,
        preprocessing="raw",  # pixels 0 to 255: head inputs far above the scaling's bound
        hyperparameters=options,
        models_dir=tmp_path / "models",
    )
    image = np.random.default_rng(0).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32)
    made = _tensor_of(result.directory / "model.onnx", "r2", image)
    np.testing.assert_allclose(made, _tensor_of(stock, "r2", image), rtol=1e-4)
    assert result.examples is not None
    assert (result.examples.input_scale != 1.0) == scaled


@pytest.mark.parametrize("flag", [[], ["--balance-subfolders"]])
def test_balance_subfolders_weighs_each_dish_the_same(run, stock, tmp_path, flag):
    """A label's photos in two dishes of 8 and 2 photos: by default each photo weighs the
    same; with --balance-subfolders each dish weighs half its label."""
    root = tmp_path / "dishes"
    for i in range(8):
        solid(root / "healthy" / "salad" / f"s{i}.png", (30, 150 + 10 * i, 40))
    for i in range(2):
        solid(root / "healthy" / "soup" / f"p{i}.png", (30, 120, 150 + 30 * i))
    for i in range(10):
        solid(root / "fast_food" / f"f{i}.png", (150 + 10 * i, 20, 40))
    seen: list[np.ndarray] = []
    real = headfit.example_weights

    def spy(labels: np.ndarray, groups: np.ndarray, by_subfolder: bool) -> np.ndarray:
        weights = real(labels, groups, by_subfolder)
        seen.append(weights[np.flatnonzero(groups == "soup")].sum() / weights.sum())
        return weights

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(headfit, "example_weights", spy)
        assert run("make-updatable", stock, "--examples", root, *flag).code == 0
    # The soup's share of all the weight: half of healthy's half, or (a photo or two of
    # healthy's training photos, some held out) well under that.
    assert len(seen) == 1
    if flag:
        assert seen[0] == pytest.approx(0.25)
    else:
        assert 0 < seen[0] < 0.15


def test_balance_subfolders_without_examples_is_refused(run, stock):
    one_line_error(run("make-updatable", stock, "--balance-subfolders"), "--examples")


def test_the_replay_set_holds_each_replayed_photo_as_a_thumbnail_too(run, tmp_path, models_dir):
    """A label taught from small photos (thumbnails, photos sent small) spread to every
    other small photo: the replay set held the base's photos at full size only, so blur
    alone told the user's label from the base's. Each replayed photo now also comes as a
    64-pixel thumbnail, embedded as `retrain` embeds such a photo."""
    from PIL import Image

    from healthyluncher.embedder import Embedder
    from healthyluncher.records import load_base
    from healthyluncher.store import Files, ModelStore

    rng = np.random.default_rng(0)
    root, small = tmp_path / "examples", tmp_path / "small"
    for label in ("healthy", "fast_food"):
        (root / label).mkdir(parents=True)
        (small / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)  # detail blur removes
            pixels[:, :, 1 if label == "healthy" else 0] //= 4
            Image.fromarray(pixels).save(root / label / f"{i}.png")
            thumbnail = Image.fromarray(pixels).resize((85, 64), Image.Resampling.BILINEAR)
            thumbnail.save(small / label / f"{i}.png")
    stock = pytorch_style(tmp_path / "stock.onnx", labels=None, classes=10, size=128)
    assert run("make-updatable", stock, "--examples", root).code == 0
    store = ModelStore(models_dir)
    base = load_base(store, store.read_state())
    with np.load(base.path / Files.REPLAY, allow_pickle=False) as data:
        inputs, labels = data["inputs"], data["labels"]
        weights = data["weights"]
    half = len(inputs) // 2
    assert len(inputs) == 2 * half and half > 0
    assert labels[:half].tolist() == labels[half:].tolist()
    # A photo and its thumbnail weigh one photo in all, as a user's photo over its views.
    np.testing.assert_array_equal(weights, np.full(2 * half, 0.5, np.float32))
    full = inputs[:half].reshape(half, -1)
    thumbs = inputs[half:].reshape(half, -1)
    assert not np.allclose(full, thumbs, atol=1e-3)  # the thumbnails are other inputs
    # Each thumbnail row is what embedding a 64-pixel copy of one of the photos gives.
    done, failures, _ = Embedder(store, base, 1).embed(sorted(small.rglob("*.png")))
    assert not failures
    expected = np.stack([v[0].reshape(-1) for _, _, v in done])
    nearest = np.abs(thumbs[:, None, :] - expected[None, :, :]).max(axis=2).min(axis=1)
    assert np.all(nearest < 0.05 * np.abs(expected).max())


def test_replayed_rows_weigh_what_the_replay_file_says(tmp_path):
    """Two rows of weight 0.5 (a photo and its thumbnail) count as one row of weight 1;
    before, each counted as a whole photo against the user's."""
    from healthyluncher.examples import training_set
    from healthyluncher.records import Examples
    from healthyluncher.settings import Hyperparameters

    mine = Examples(
        inputs=np.ones((2, 4), np.float32),
        owner=np.array([0, 1]),
        digests=("a" * 64, "b" * 64),
        labels=("healthy", "healthy"),
    )
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    hp = Hyperparameters()
    labels = ("healthy", "fast_food")
    # Two replayed rows of the user's own label at 0.5 each (a photo and its thumbnail)...
    halves = training_set(mine, (rows, np.array([0, 0, 1]), np.array([0.5, 0.5, 1.0])), labels, hp)
    # ...weigh what one row of weight 1 does, so the user's photos keep their share.
    whole = training_set(mine, (rows[1:], np.array([0, 1])), labels, hp)
    np.testing.assert_allclose(halves.weights[:2], whole.weights[:2])  # the user's photos
    np.testing.assert_allclose(halves.weights[2] + halves.weights[3], whole.weights[2])
    np.testing.assert_allclose(halves.weights[2], halves.weights[3])
    np.testing.assert_allclose(halves.weights[4], whole.weights[3])


@pytest.mark.parametrize(
    "weights", [np.full(4, 0.5), np.array([0.5, np.nan, 0.5]), np.array([0.5, 2.0, 0.5]),
                np.array([1, 1, 1]), np.array([0.5, 0.0, 0.5])],
)  # fmt: skip
def test_a_replay_file_with_damaged_weights_is_refused_in_one_line(
    run, pt_model, tmp_path, weights
):
    replay = tmp_path / "mine.replay.npz"
    np.savez(replay, inputs=np.ones((3, 8), np.float32), labels=np.array(["healthy"] * 3),
             weights=weights)  # fmt: skip
    result = run("make-updatable", pt_model, "--replay", replay)
    assert result.code != 0
    one_line_error(result, "weights are damaged")


@pytest.mark.parametrize(
    "damage", ["NaN inputs", "huge inputs", "labels not one per input", "0-d labels"]
)
def test_a_replay_file_whose_rows_do_not_pair_up_or_are_nan_is_refused(
    run, pt_model, tmp_path, photos, damage
):
    """They were accepted, and then every retrain failed ("unexpected IndexError"), or,
    with NaN inputs, trained a model that predicted null; inputs of 1e38 trained into NaN,
    and the error blamed the learning rate."""
    inputs, labels = np.ones((4, 8), np.float32), np.array(["healthy", "fast_food"] * 2)
    if damage == "NaN inputs":
        inputs[1, 2] = np.nan
    elif damage == "huge inputs":
        inputs[1, 2] = -1e38
    elif damage == "labels not one per input":
        labels = labels[:3]
    else:
        labels = np.array("healthy")
    replay = tmp_path / "mine.replay.npz"
    np.savez(replay, inputs=inputs, labels=labels)
    one_line_error(run("make-updatable", pt_model, "--replay", replay), "not a replay set")
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "healthy", photos["red"][0]).code == 0


def test_a_damaged_replay_file_in_the_models_directory_stops_a_retrain_in_one_line(
    run, pt_model, tmp_path, models_dir, photos
):
    from healthyluncher.store import Files, ModelStore

    replay = tmp_path / "mine.replay.npz"
    np.savez(replay, inputs=np.ones((4, 8), np.float32), labels=np.array(["healthy"] * 4),
             weights=np.full(4, 0.5, np.float32))  # fmt: skip
    assert run("make-updatable", pt_model, "--replay", replay).code == 0
    assert run("retrain", "--label", "healthy", *photos["red"][:1]).code == 0
    before = run("predict", "--json", *photos["green"]).json_lines()
    store = ModelStore(models_dir)
    path = store.root / store.read_state().base / Files.REPLAY
    np.savez(path, inputs=np.ones((4, 8), np.float32), labels=np.array(["healthy"] * 4),
             weights=np.array([0.5, np.inf, 0.5, 0.5], np.float32))  # fmt: skip
    result = run("retrain", "--label", "healthy", *photos["red"][1:2])
    assert result.code != 0
    one_line_error(result, "weights are damaged")
    assert run("predict", "--json", *photos["green"]).json_lines() == before


def test_the_replay_set_is_read_once_until_its_file_changes(tmp_path):
    """A retrain needs the replay set twice (the training set, the memory's balls): it is
    read once, read-only, and read again when the file is another one."""
    from healthyluncher.examples import load_replay
    from healthyluncher.records import Base
    from healthyluncher.store import Files

    meta = type("Meta", (), {"labels": ("healthy", "fast_food")})()
    base = Base(tmp_path, meta)  # type: ignore[arg-type]
    labels = np.array(["healthy", "fast_food"])
    np.savez(tmp_path / Files.REPLAY, inputs=np.ones((2, 4), np.float32), labels=labels)
    first = load_replay(base)
    assert first is not None and load_replay(base) is first
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0] = 5.0
    np.savez(
        tmp_path / Files.REPLAY, inputs=np.full((3, 4), 2, np.float32), labels=[*labels, "healthy"]
    )
    again = load_replay(base)
    assert again is not None and again[0].shape == (3, 4) and float(again[0][0, 0]) == 2.0


def test_where_the_preprocessing_came_from_names_api_words_to_a_program(run, tmp_path):
    """UpdatableResult.preprocessing_source said "--mean/--std" or "--preprocessing
    inception" to a program that had passed mean= and std= or preprocessing=; the CLI
    still says it with its options."""
    model = keras_style(tmp_path / "keras.onnx")
    folder = str(tmp_path / "api")
    cases = {
        "the inception preset": {"preprocessing": "inception"},
        "the given mean and std": {"mean": [127.5] * 3, "std": [127.5] * 3},
        "the default (ImageNet mean and std)": {},
    }
    for source, options in cases.items():
        result = healthyluncher.make_updatable(model, models_dir=folder, force=True, **options)
        assert result.preprocessing_source == source
    cli = run("make-updatable", model, "--mean", "127.5", "--std", "127.5", "--force")
    assert "Preprocessing from --mean/--std:" in cli.stdout


def test_a_photo_under_two_labels_is_left_out_and_named(run, stock, examples, models_dir):
    """The same photo under healthy/ and fast_food/ (a copy, or a link to the label's
    parent) trained both labels at once, silently; a photo twice under one label counted
    twice."""
    import shutil

    shutil.copy(examples / "healthy" / "h0.jpg", examples / "fast_food" / "also-h0.jpg")
    shutil.copy(examples / "healthy" / "h1.jpg", examples / "healthy" / "again-h1.jpg")
    result = run("make-updatable", stock, "--examples", examples)
    assert result.code == 0, result
    assert "(fast_food: 10, healthy: 9)" in result.stdout  # each photo once, h0 in neither
    line = next(x for x in result.stdout.splitlines() if "also under another label" in x)
    assert line.startswith("2 file(s)") and "/h0.jpg" in line and "also-h0.jpg" in line
    report = healthyluncher.make_updatable(
        stock, examples=examples, models_dir=models_dir, force=True
    ).examples
    assert report is not None
    assert sorted(Path(p).name for p in report.contradictory) == ["also-h0.jpg", "h0.jpg"]
    assert report.photos == {"fast_food": 10, "healthy": 9}


@needs_ort
@pytest.mark.parametrize("classes", [2, 10], ids=["own head", "new head"])
def test_a_head_baked_to_batch_1_learns_the_examples(run, tmp_path, examples, photos, classes):
    """torch's dynamo exporter, for a batch-1 export, bakes the 1 into the Reshape before
    the classifier. A head cut before it (resnet18 at --trainable-layers 3) trained the
    examples on batches of 16: 'error: unexpected RuntimeError: ... Reshape node ...
    Input shape:{16,512,1,1}, requested shape:{1,512}' (ONNX Runtime's text)."""
    labels = None if classes == 10 else ["healthy", "fast_food"]
    model = batch_one_head(tmp_path / "b1.onnx", labels, classes=classes)
    result = run("make-updatable", model, "--examples", examples, "--trainable-layers", "2")
    assert result.code == 0, result
    status = json.loads(run("status", "--json").stdout)
    assert status["trainable_layers"] == 2 and sorted(status["labels"]) == ["fast_food", "healthy"]
    base = run("predict", "--json", *photos["red"], *photos["green"]).json_lines()
    assert [row["label"] for row in base] == ["fast_food"] * 3 + ["healthy"] * 3
    result = run("retrain", "--label", "healthy", "--json", *photos["red"][:2])
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", *photos["red"], *photos["green"]).json_lines() == base


@needs_ort  # a head deeper than one layer, or a Conv: the training package
@pytest.mark.parametrize("batch", [1, "N"], ids=["batch 1", "dynamic batch"])
def test_a_class_count_baked_into_a_reshape_follows_a_new_head(run, tmp_path, examples, batch):
    """torch's dynamo exporter ends SqueezeNet in Reshape to (1, 1000) (TorchScript wrote
    Flatten). A new head for the examples' two labels still asked for 1000 classes there:
    the zoo's export failed at every --trainable-layers with 'error: unexpected
    RuntimeException: ... Reshape node ... Input shape:{1,2,1,1}, requested
    shape:{1,1000}' (ONNX Runtime's text), this model with 'ONNX Runtime training fails on
    the trainable part (InferenceError)'."""
    model = dynamo_squeezenet_style(tmp_path / "sq.onnx", None, classes=10, batch=batch)
    result = run("make-updatable", model, "--examples", examples, "--trainable-layers", "2")
    assert result.code == 0, result
    red = solid(tmp_path / "red.png", (230, 30, 40))
    green = solid(tmp_path / "green.png", (30, 230, 40))
    base = run("predict", "--json", red, green).json_lines()
    assert all(sorted(row["probabilities"]) == ["fast_food", "healthy"] for row in base)
    result = run("retrain", "--label", "healthy", "--json", red)
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert run("reset").code == 0
    assert run("predict", "--json", red, green).json_lines() == base


@needs_ort  # a head deeper than one layer, or a Conv: the training package
@pytest.mark.parametrize("batch", [1, "N"], ids=["batch 1", "dynamic batch"])
def test_a_class_count_baked_into_a_reshape_grows_with_a_new_label(run, tmp_path, batch):
    """The same model's own head, given a third label by retrain: the last layer grew to
    three classes but the Reshape still asked for two ('ONNX Runtime training fails on the
    trainable part (InferenceError); the last layer alone already has it')."""
    model = dynamo_squeezenet_style(tmp_path / "sq.onnx", batch=batch)
    assert run("make-updatable", model, "--trainable-layers", "1").code == 0
    photos = [solid(tmp_path / f"b{i}.png", (30, 40, 150 + 30 * i)) for i in range(3)]
    result = run("retrain", "--label", "blue_plate", "--new-label", "--json", *photos)
    assert result.code == 0, result
    assert all(p["after"] > p["before"] for p in result.json_lines()[0]["photos"])
    assert json.loads(run("status", "--json").stdout)["labels"][-1] == "blue_plate"
    rows = run("predict", "--json", *photos).json_lines()
    assert [row["label"] for row in rows] == ["blue_plate"] * 3


KILLED_WHILE_BUILDING = """
import os, sys
import healthyluncher
from healthyluncher import quantize
model, examples, calibration, models_dir, where = sys.argv[1:]
def killed(*args, **kwargs):
    os._exit(3)  # as kill -9 would, with the work files written
if where == "training":
    healthyluncher.make_updatable(
        model, examples=examples, models_dir=models_dir,
        progress=lambda event: event.stage == "training" and killed(),
    )
else:
    real = quantize.child.run
    quantize.child.run = lambda *args, **kwargs: (real(*args, **kwargs), killed())
    healthyluncher.make_updatable(model, int8=True, calibration=calibration, models_dir=models_dir)
"""


@pytest.mark.parametrize("where", ["training", "int8"])
def test_a_killed_make_updatable_leaves_no_work_files_behind(
    where, stock, pt_model, examples, tmp_path
):
    """make-updatable's work files (the new head's training files, the int8 quantizer's
    model) were in $TMPDIR: a make-updatable killed there left a luncher-examples-* or
    luncher-int8-* folder (13 MB for the shipped base) that nothing ever removed. They are
    in the models directory now, where the next change removes a killed run's."""
    import subprocess
    import sys

    temp = tmp_path / "tmpdir"
    temp.mkdir()
    models = tmp_path / "killed"
    calibration = tmp_path / "calibration"
    for i in range(4):
        solid(calibration / f"c{i}.png", (60 * i, 255 - 60 * i, 90))
    model = stock if where == "training" else pt_model
    env = {**os.environ, "TMPDIR": str(temp)}
    args = [model, examples, calibration, models]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_BUILDING, *map(str, args), where],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 3, killed.stderr
    # (Only ours: with the newest onnxruntime, something else leaves a `.ses` file there.)
    assert [p.name for p in temp.iterdir() if "luncher" in p.name] == []
    healthyluncher.make_updatable(pt_model, models_dir=models, force=True)
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == [".lock"]
