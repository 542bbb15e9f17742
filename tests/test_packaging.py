"""Which ONNX Runtime package each supported Python gets, read from the installed metadata.

pip's `--python-version` dry run evaluates environment markers against the running
interpreter, so it proves nothing about other Pythons; evaluating the markers here does.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

DIST = "healthyluncher"
TRAINING = "onnxruntime-training-cpu"
PLAIN = "onnxruntime"
# Distributions that install the onnxruntime/ package directory: at most one per environment.
OWNERS_OF_THE_ONNXRUNTIME_DIRECTORY = (
    PLAIN,
    TRAINING,
    "onnxruntime-training",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
)

WITH_TRAINING_API = ("3.10.0", "3.10.13", "3.11.0", "3.11.7", "3.12.0", "3.12.1")
WITHOUT_TRAINING_API = ("3.13.0", "3.13.5", "3.14.0", "3.14.2")


def requirements() -> list[Requirement]:
    return [Requirement(line) for line in importlib.metadata.requires(DIST) or []]


def required_names(full_version: str) -> set[str]:
    """Names of the runtime dependencies (no extras) for a Python of this version."""
    major, minor = full_version.split(".")[:2]
    environment = {
        "python_version": f"{major}.{minor}",
        "python_full_version": full_version,
        "extra": "",
    }
    return {
        canonicalize_name(req.name)
        for req in requirements()
        if req.marker is None or req.marker.evaluate(environment)
    }


@pytest.mark.parametrize("version", WITH_TRAINING_API)
def test_the_training_build_alone_up_to_312(version: str) -> None:
    names = required_names(version)
    assert TRAINING in names
    assert PLAIN not in names


@pytest.mark.parametrize("version", WITHOUT_TRAINING_API)
def test_plain_onnxruntime_alone_from_313(version: str) -> None:
    names = required_names(version)
    assert PLAIN in names
    assert TRAINING not in names


def test_the_training_build_is_pinned_to_its_last_release() -> None:
    (req,) = [r for r in requirements() if canonicalize_name(r.name) == TRAINING]
    assert str(req.specifier) == "==1.19.2"


def test_requires_python_admits_310_to_314() -> None:
    spec = SpecifierSet(importlib.metadata.metadata(DIST)["Requires-Python"])
    for version in (*WITH_TRAINING_API, *WITHOUT_TRAINING_API, "3.14.99"):
        assert spec.contains(version), version
    for version in ("3.9.18", "3.9.0", "2.7.18"):
        assert not spec.contains(version), version


def test_classifiers_name_310_to_314() -> None:
    classifiers = importlib.metadata.metadata(DIST).get_all("Classifier") or []
    for minor in range(10, 15):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers


def test_at_most_one_onnxruntime_distribution_is_installed() -> None:
    installed = []
    for name in OWNERS_OF_THE_ONNXRUNTIME_DIRECTORY:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed.append(name)
    assert len(installed) <= 1, f"{installed} all own onnxruntime/; keep one"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_the_installed_metadata_matches_pyproject() -> None:
    """Otherwise the tests above read stale metadata: reinstall (pip install -e '.[dev]')."""
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml next to the tests")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    declared = {str(Requirement(line)) for line in project["dependencies"]}
    installed = {str(req) for req in requirements() if "extra ==" not in str(req.marker)}
    assert installed == declared
    requires_python = importlib.metadata.metadata(DIST)["Requires-Python"]
    assert SpecifierSet(requires_python) == SpecifierSet(project["requires-python"])
