"""Fuzzed metadata: every value read from an archive or a model is refused in one line or
works, and never breaks a later command (no traceback, hang or NaN).

Hypothesis replaces or deletes one value anywhere in a backup's manifest.json or meta.json
(with checksums made to match, so that the value itself is what is tested), or in a
model's `labels` and `preprocessing` metadata, by any JSON value: huge and negative
numbers, NaN and infinities, control characters, lists and objects where numbers belong.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from healthyluncher.cli import app
from tests.conftest import solid
from tests.models import pytorch_style

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    # CI draws the same inputs every run, so that a submission's CI does not fail by chance;
    # elsewhere each run draws new ones, and whatever they find becomes a test of its own.
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document a value sits."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.extend(_paths(child, (*prefix, index)))
    return found


def _mutate(document: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    document = json.loads(json.dumps(document))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return document


def _no_nan(text: str) -> None:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON output: {text}")

    for line in text.splitlines():
        json.loads(line, parse_constant=refuse)


def _cli(models_dir: Path, *args: Any) -> Any:
    return CliRunner().invoke(
        app, ["--models-dir", str(models_dir), *map(str, args)], catch_exceptions=False
    )


def _one_line_or_works(result: Any) -> None:
    assert result.exit_code in (0, 1), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def _later_commands_work(models_dir: Path, photo: Path) -> None:
    status = _cli(models_dir, "status", "--json")
    assert status.exit_code == 0, status.output
    _no_nan(status.stdout)
    predicted = _cli(models_dir, "predict", "--json", photo)
    assert predicted.exit_code == 0, predicted.output
    _no_nan(predicted.stdout)
    row = json.loads(predicted.stdout.splitlines()[0])
    assert all(math.isfinite(p) for p in row["probabilities"].values())
    label = json.loads(status.stdout)["labels"][0]
    retrained = _cli(models_dir, "retrain", "--label", label, "--json", photo)
    assert retrained.exit_code == 0, retrained.output
    _no_nan(retrained.stdout)


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz-import")
    model = pytorch_style(root / "tiny.onnx")
    red = [solid(root / "red" / f"r{i}.png", (190 + 20 * i, 30, 40)) for i in range(2)]
    models = root / "models"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNCHER_BUNDLED_MODEL", "")
        assert _cli(models, "make-updatable", model).exit_code == 0
        assert _cli(models, "retrain", "--label", "fast_food", *red).exit_code == 0
        archive = root / "backup.tar.gz"
        assert _cli(models, "export", archive).exit_code == 0
    with tarfile.open(archive, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}  # type: ignore[union-attr]
    return {"root": root, "base": models, "files": files, "photo": red[0]}


def _pack(target: Path, files: dict[str, bytes], manifest: Any) -> Path:
    """manifest.json first, with every other file's checksum and size made to match."""
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name, data in files.items():
            if name in manifest["files"] and isinstance(manifest["files"][name], dict):
                manifest["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
                manifest["files"][name]["size"] = len(data)
    with tarfile.open(target, "w:gz") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


@FUZZ
@given(data=st.data())
def test_fuzzed_archive_metadata_is_refused_or_works(backup: dict[str, Any], data: Any) -> None:
    files = dict(backup["files"])
    manifest = json.loads(files.pop("manifest.json"))
    which = data.draw(st.sampled_from(["manifest.json", "meta.json"]))
    document = manifest if which == "manifest.json" else json.loads(files["meta.json"])
    path = data.draw(st.sampled_from(_paths(document)))
    new = data.draw(JSON)
    changed = _mutate(document, path, new, data.draw(st.booleans()))
    if which == "manifest.json":
        manifest = changed
    else:
        files["meta.json"] = json.dumps(changed).encode()
    work = backup["root"] / "trial"
    shutil.rmtree(work, ignore_errors=True)
    models = work / "models"
    shutil.copytree(backup["base"], models)
    archive = _pack(work / "fuzzed.tar.gz", files, manifest)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNCHER_BUNDLED_MODEL", "")
        _one_line_or_works(_cli(models, "import", archive))
        _later_commands_work(models, backup["photo"])


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz-model")
    model = onnx.load(str(pytorch_style(root / "tiny.onnx")))
    photo = solid(root / "lunch.png", (200, 40, 40))
    return {"root": root, "model": model, "photo": photo}


@FUZZ
@given(
    labels=st.one_of(st.none(), JSON, st.lists(st.text(max_size=12), max_size=3)),
    preprocessing=st.one_of(
        st.none(),
        JSON,
        st.fixed_dictionaries(
            {},
            optional={
                "mean": st.lists(JSON, max_size=4),
                "std": st.lists(JSON, max_size=4),
                "resize": JSON,
                "crop": JSON,
                "size": JSON,
            },
        ),
    ),
)
def test_fuzzed_model_metadata_is_refused_or_works(
    stock: dict[str, Any], labels: Any, preprocessing: Any
) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(stock["model"])
    del model.metadata_props[:]
    props = {}
    if labels is not None:
        props["labels"] = json.dumps(labels)
    if preprocessing is not None:
        props["preprocessing"] = json.dumps(preprocessing)
    onnx.helper.set_model_props(model, props)
    work = stock["root"] / "trial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    path = work / "model.onnx"
    onnx.save(model, str(path))
    models = work / "models"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNCHER_BUNDLED_MODEL", "")
        result = _cli(models, "make-updatable", path)
        _one_line_or_works(result)
        if result.exit_code == 0:
            _later_commands_work(models, stock["photo"])
