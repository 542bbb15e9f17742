"""The personalized model written from the base's template equals the one built with onnx."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from healthyluncher import template
from healthyluncher.bases import UpdatableOptions, make_updatable
from healthyluncher.personal import PersonalModel, personal_graphs, render_personal
from healthyluncher.records import Base, Examples, load_base
from healthyluncher.runtime import inference_session
from healthyluncher.settings import Hyperparameters
from healthyluncher.store import Files, ModelStore
from tests.models import SIZE, keras_style, pytorch_style


def updatable(tmp_path: Path, factory, replay: bool) -> Base:
    store = ModelStore(tmp_path / "models")
    options = UpdatableOptions()
    if replay:
        probe = make_updatable(store, factory(tmp_path / "probe.onnx"), UpdatableOptions())
        width = int(np.prod(_head_input_shape(probe.directory)))
        rng = np.random.default_rng(1)
        path = tmp_path / "replay.npz"
        np.savez(
            path,
            inputs=rng.normal(size=(12, width)).astype(np.float32),
            labels=np.array(["healthy", "fast_food"] * 6),
        )
        options = UpdatableOptions(replay=path, force=True)
    make_updatable(store, factory(tmp_path / "model.onnx"), options)
    return load_base(store, store.read_state())


def _head_input_shape(directory: Path) -> list[int]:
    session = inference_session(directory / Files.HEAD)
    return [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]


def examples_for(base: Base, rng: np.random.Generator, photos: int, views: int) -> Examples:
    shape = _head_input_shape(base.path)
    inputs = rng.normal(size=(photos * views, *shape)).astype(np.float32)
    owner = np.repeat(np.arange(photos), views)
    labels = tuple(base.meta.labels[i % 2] for i in range(photos))
    return Examples(inputs, owner, tuple(f"d{i}" for i in range(photos)), labels)


def trained_params(base: Base, rng: np.random.Generator) -> dict[str, np.ndarray]:
    head = onnx.load(str(base.path / Files.HEAD))
    wanted = set(base.meta.trainable_params)
    return {
        t.name: numpy_helper.to_array(t) + rng.normal(0, 0.1, t.dims).astype(np.float32)
        for t in head.graph.initializer
        if t.name in wanted
    }


def outputs(model: bytes, feed: np.ndarray, directory: Path) -> np.ndarray:
    """Run a serialized model saved in `directory` (its external weights live there)."""
    path = directory / "candidate.onnx"
    path.write_bytes(model)
    session = inference_session(path)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: feed})[0])


@pytest.mark.parametrize("replay", [False, True], ids=["no-replay", "replay"])
@pytest.mark.parametrize("factory", [pytorch_style, keras_style], ids=["pytorch", "keras"])
def test_the_template_gives_the_model_onnx_builds(tmp_path, factory, replay):
    base = updatable(tmp_path, factory, replay)
    assert (base.path / Files.TEMPLATE).is_file()
    rng = np.random.default_rng(0)
    params = trained_params(base, rng)
    examples = examples_for(base, rng, photos=5, views=3)
    hp = Hyperparameters()
    fast = render_personal(base, base.meta.labels, params, examples, hp)
    model, head = personal_graphs(base, base.meta.labels, params, examples, hp)
    assert fast.model is not None
    assert fast.locations == (Files.MODEL_DATA,)

    # The same tensors, by name and value, and the same nodes in the same order.
    for fast_bytes, slow in ((fast.model, model), (fast.head, head)):
        parsed = onnx.load_from_string(fast_bytes)
        assert [n.SerializeToString() for n in parsed.graph.node] == [
            n.SerializeToString() for n in slow.graph.node
        ]
        mine = {t.name: t for t in parsed.graph.initializer}
        theirs = {t.name: t for t in slow.graph.initializer}
        assert mine.keys() == theirs.keys()
        for name, tensor in theirs.items():
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                assert mine[name].external_data == tensor.external_data
            else:
                np.testing.assert_array_equal(
                    numpy_helper.to_array(mine[name]), numpy_helper.to_array(tensor)
                )

    # And ONNX Runtime computes the same with both.
    work = tmp_path / "run"
    work.mkdir()
    (work / Files.MODEL_DATA).write_bytes((base.path / Files.MODEL_DATA).read_bytes())
    shape = [
        d if isinstance(d, int) else 4
        for d in inference_session(base.path / Files.MODEL).get_inputs()[0].shape
    ]
    pixels = rng.random(shape).astype(np.float32)
    np.testing.assert_allclose(
        outputs(fast.model, pixels, work), outputs(model.SerializeToString(), pixels, work)
    )
    feats = examples.inputs[:6]
    np.testing.assert_allclose(
        outputs(fast.head, feats, work), outputs(head.SerializeToString(), feats, work)
    )


def test_without_a_usable_template_onnx_builds_the_same(tmp_path):
    base = updatable(tmp_path, pytorch_style, replay=True)
    rng = np.random.default_rng(2)
    params = trained_params(base, rng)
    examples = examples_for(base, rng, photos=3, views=2)
    hp = Hyperparameters()
    fast = render_personal(base, base.meta.labels, params, examples, hp)
    (base.path / Files.TEMPLATE).write_bytes(b"luncher-template 1\n{not json")
    assert template.load(base.path / Files.TEMPLATE) is None
    slow = render_personal(base, base.meta.labels, params, examples, hp)
    assert isinstance(slow, PersonalModel) and slow.model is not None
    feats = examples.inputs
    work = tmp_path / "run"
    work.mkdir()
    np.testing.assert_allclose(outputs(fast.head, feats, work), outputs(slow.head, feats, work))


@pytest.mark.parametrize("kind", ["a link to /dev/zero", "a named pipe"])
def test_a_template_that_is_not_a_file_is_not_read(tmp_path, kind):
    """personal.template is a cache, read whole: a link to /dev/zero filled the memory
    ("unexpected MemoryError" from every retrain), a named pipe blocked it forever."""
    base = updatable(tmp_path, pytorch_style, replay=True)
    path = base.path / Files.TEMPLATE
    path.unlink()
    if kind == "a named pipe":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    assert template.load(path) is None
    rng = np.random.default_rng(2)
    params, examples = trained_params(base, rng), examples_for(base, rng, photos=2, views=1)
    rendered = render_personal(base, base.meta.labels, params, examples, Hyperparameters())
    assert isinstance(rendered, PersonalModel) and rendered.model is not None


def test_a_retrain_with_a_template_does_not_import_onnx(tmp_path):
    """The point of the template: a retrain of the base's labels never imports onnx."""
    base = updatable(tmp_path, pytorch_style, replay=True)
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (SIZE * 2, SIZE * 2), (200, 30 + 40 * i, 40)).save(photos / f"{i}.png")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from healthyluncher.personalizing import retrain\n"
        "from healthyluncher.store import ModelStore\n"
        f"store = ModelStore(Path({str(base.path.parent)!r}))\n"
        f"retrain(store, 'healthy', [Path({str(photos)!r})])\n"
        f"retrain(store, 'fast_food', [Path({str(photos)!r})])\n"
        "print('onnx' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False", done.stderr


def test_a_models_directory_from_before_the_weights_file_still_retrains(
    run, pt_model, photos, models_dir
):
    """Bases written by earlier versions: self-contained model.onnx and frozen.onnx, no
    model.data and no template. They predict, retrain (through onnx) and undo as before."""
    assert run("make-updatable", pt_model).code == 0
    store = ModelStore(models_dir)
    base = store.base_dir(store.read_state())
    assert base is not None
    for name in (Files.MODEL, Files.FROZEN):
        model = onnx.load(str(base / name))  # reads model.data
        onnx.save(model, str(base / name))  # inline again
    (base / Files.MODEL_DATA).unlink()
    (base / Files.TEMPLATE).unlink()
    before = run("predict", "--json", *photos["red"]).json_lines()
    assert len({row["label"] for row in before}) == 1
    label = "fast_food" if before[0]["label"] == "healthy" else "healthy"
    result = run("retrain", "--label", label, "--epochs", "40", *photos["red"])
    assert result.code == 0, result
    personal = store.personal_dir()
    assert personal is not None and not (personal / Files.MODEL_DATA).exists()
    after = run("predict", "--json", *photos["red"]).json_lines()
    assert all(row["label"] == label for row in after), after
    assert run("undo").code == 0
    assert run("predict", "--json", *photos["red"]).json_lines() == before
