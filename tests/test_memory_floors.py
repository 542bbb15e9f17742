"""The memory's floors: each remembered example against the replay set, cached per copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from healthyluncher import examples as examples_module
from healthyluncher import memory as memory_module
from healthyluncher.examples import copy_memory
from healthyluncher.records import load_base, load_examples, load_personal
from healthyluncher.store import Files, ModelStore
from tests.conftest import label_folders, solid
from tests.models import pytorch_style


@pytest.fixture
def base_with_replay(run, tmp_path: Path) -> Path:
    """A base whose head was trained on example photos, which became its replay set."""
    root = label_folders(tmp_path / "examples")
    stock = pytorch_style(tmp_path / "stock.onnx", labels=None, classes=10)
    assert run("make-updatable", stock, "--examples", root).code == 0
    return root


def _teach(run, folder: Path, label: str, colours: list[tuple[int, int, int]]) -> None:
    photos = [solid(folder / f"p{i}.png", colour) for i, colour in enumerate(colours)]
    assert run("retrain", "--label", label, *photos).code == 0


def _current(models_dir: Path):
    store = ModelStore(models_dir)
    state = store.read_state()
    personal = load_personal(store, state)
    assert personal is not None
    return load_base(store, state), personal, load_examples(personal, ())


def test_a_retrain_compares_only_new_rows_with_the_replay_set(
    run, base_with_replay, tmp_path, models_dir
):
    _teach(run, tmp_path / "a", "healthy", [(200, 40, 200), (210, 50, 190)])
    base, personal, first = _current(models_dir)
    assert (personal.path / Files.FLOORS).is_file()
    computed: list[int] = []
    real = memory_module.build_memory

    def spy(rows, classes, threshold, replay, **kwargs):
        known = kwargs.get("known")
        computed.append(len(rows) if known is None else int(np.isnan(known).sum()))
        return real(rows, classes, threshold, replay, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(examples_module, "build_memory", spy)
        _teach(run, tmp_path / "b", "healthy", [(90, 90, 220)])
    base, personal, second = _current(models_dir)
    new_rows = len(second.owner) - len(first.owner)  # the new photo's views
    # "before" of the new photo (the old copy: all cached), then the new copy.
    assert computed == [0, new_rows]
    # The cached floors are the ones a fresh computation gives.
    hp = personal.meta.hyperparameters
    fresh = copy_memory(base, second, personal.meta.labels, hp.memory_floor)
    cached = copy_memory(
        base,
        second,
        personal.meta.labels,
        hp.memory_floor,
        examples_module.load_floors(personal, base),
    )
    assert (fresh.conflicts > -1).all()  # the replay set is there
    np.testing.assert_allclose(fresh.conflicts, cached.conflicts, atol=1e-6)


@pytest.mark.parametrize(
    "damage",
    ["garbage", "nan", "too large", "another dtype", "keys of another length", "plain cosines"],
)
def test_a_damaged_floors_file_is_computed_again(
    run, base_with_replay, tmp_path, models_dir, damage
):
    _teach(run, tmp_path / "a", "healthy", [(200, 40, 200), (210, 50, 190)])
    base, personal, examples = _current(models_dir)
    path = personal.path / Files.FLOORS
    with np.load(path) as data:
        keys, conflicts = data["keys"], data["conflicts"]
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        if damage == "nan":
            conflicts = np.full_like(conflicts, np.nan)
        elif damage == "too large":
            conflicts = np.full_like(conflicts, 5.0)
        elif damage == "another dtype":
            conflicts = conflicts.astype(np.float64)
        elif damage == "keys of another length":
            keys = keys[:-1]
        # "plain cosines": as saved before the memory measured from the replay set's mean
        # (no "rule"): right in form, wrong in meaning.
        np.savez(path, keys=keys, conflicts=conflicts)
    assert examples_module.load_floors(personal, base) == {}
    result = run("retrain", "--label", "healthy", solid(tmp_path / "c.png", (90, 90, 220)))
    assert result.code == 0, result
    base, personal, examples = _current(models_dir)
    hp = personal.meta.hyperparameters
    saved = examples_module.load_floors(personal, base)
    fresh = copy_memory(base, examples, personal.meta.labels, hp.memory_floor)
    keys = examples_module.view_keys(fresh.views, examples.origin, examples.segments)
    assert saved and all(saved[k] == pytest.approx(c, abs=1e-6)
                         for k, c in zip(keys, fresh.conflicts, strict=True) if k)  # fmt: skip


def test_a_base_with_an_older_template_gets_a_new_one_on_its_first_retrain(
    run, base_with_replay, tmp_path, models_dir
):
    """A base made by an earlier version has a template of another memory graph (or none):
    it is made again once, so later retrains render without onnx."""
    from healthyluncher.template import MAGIC

    store = ModelStore(models_dir)
    base = load_base(store, store.read_state())
    template = base.path / Files.TEMPLATE
    template.write_bytes(b"luncher-template 2\n{}\n")  # an older version's
    _teach(run, tmp_path / "a", "healthy", [(200, 40, 200), (210, 50, 190)])
    assert template.read_bytes().startswith(MAGIC)
    base, personal, examples = _current(models_dir)
    # The copy rendered from the new template is the one onnx builds.
    from healthyluncher.personal import personal_graphs, render_personal
    from healthyluncher.records import load_weights

    meta = personal.meta
    params = load_weights(personal)
    rendered = render_personal(base, meta.labels, params, examples, meta.hyperparameters)
    _, head = personal_graphs(base, meta.labels, params, examples, meta.hyperparameters)
    x = np.random.default_rng(0).normal(size=(4, *examples.inputs.shape[1:])).astype(np.float32)
    x = np.concatenate([examples.inputs[:2], x])
    from healthyluncher.runtime import HeadRunner

    np.testing.assert_allclose(
        HeadRunner(rendered.head).logits(x), HeadRunner(head.SerializeToString()).logits(x),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
