"""The base model that ships with the package, on the example photo that ships with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthyluncher.records import BUNDLED_MODEL

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "coffee.jpg"


@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUNCHER_BUNDLED_MODEL")
    assert (REPO / "models" / BUNDLED_MODEL).is_file()


def test_predict_works_on_first_use_with_the_shipped_model(run, shipped, models_dir):
    result = run("predict", "--json", EXAMPLE)
    assert result.code == 0, result
    (row,) = result.json_lines()
    assert set(row) == {"path", "label", "probability", "probabilities"}
    assert set(row["probabilities"]) == {"healthy", "fast_food"}
    # The shipped head's answer for this photo (an espresso, not a lunch).
    assert row["label"] == "fast_food"
    assert 0.8 < row["probability"] < 0.95
    status = run("status", "--json").json_lines()[0]
    assert status["base_source"] == "bundled"
    assert status["replay_examples"] == 800  # 400 photos, as they are and as thumbnails
    assert (models_dir / "state.json").is_file()


def test_the_shipped_base_can_be_replaced_without_force(run, shipped, pt_model):
    assert run("predict", EXAMPLE).code == 0  # initializes from the shipped model
    assert run("make-updatable", pt_model).code == 0
    assert run("status", "--json").json_lines()[0]["base_name"] == "tiny_pt"


def test_retrain_on_the_shipped_model_flips_the_photo(run, shipped):
    result = run("retrain", "--label", "healthy", "--json", EXAMPLE)
    assert result.code == 0, result
    photo = result.json_lines()[0]["photos"][0]
    assert photo["before"] < 0.2 and photo["after"] > 0.5
    assert run("predict", "--json", EXAMPLE).json_lines()[0]["label"] == "healthy"
