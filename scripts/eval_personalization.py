"""Measure personalization on ../shared/food: our retrain beside a naive Core ML-style update.

Run from the repository root (needs ../shared/food and the shipped base model):

    .venv/bin/python scripts/eval_personalization.py --out results/personalization.md

Scenarios, each on the held-out split of the base's photos and held-out photos of the dish:
- the pancakes story: K = 1, 3, 5, 10 pancake photos labelled healthy;
- a new label: `--label pancakes` from 10 photos;
- one photo: does the trained photo itself take the label?
- the same on dishes the base never saw (64 px Food-101 dishes left out of its training).

"ours" is the real `luncher retrain` path (replay, weighted personal examples, augmented
views, ORT training artifacts) through the library API. "naive" is Core ML's update: start
from the current weights and train on the new photos alone, with the same ORT artifacts,
epochs and learning rate. Both are scored with the head on cached frozen-part outputs,
which is what `predict` computes (checked against `predict` once per run).

The leave-dish-out protocol (dishes nobody chose a setting on, full size and 64 px, draws
and training seeds; the settings were chosen on other dishes) is its own mode:

    .venv/bin/python scripts/eval_personalization.py leave-dish-out \
        --full-size bibimbap,breakfast_burrito --out results/dishes-full-size.md

It runs `scripts/eval_dishes.py` with the options that follow (its docstring has the
protocol; the full-size dishes need a base built without them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import healthyluncher  # noqa: E402
from healthyluncher.embedder import Embedder  # noqa: E402
from healthyluncher.heads import head_with  # noqa: E402
from healthyluncher.personal import personal_graphs  # noqa: E402
from healthyluncher.records import (  # noqa: E402
    Base,
    load_base,
    load_examples,
    load_personal,
    load_weights,
)
from healthyluncher.runtime import HeadRunner  # noqa: E402
from healthyluncher.settings import Hyperparameters  # noqa: E402
from healthyluncher.store import Files, ModelStore  # noqa: E402
from healthyluncher.trainers import TrainingSet  # noqa: E402
from healthyluncher.training import fit  # noqa: E402

FOOD = REPO.parent / "shared" / "food"
SUFFIXES = {".jpg", ".jpeg", ".png"}


def held_out(path: Path) -> bool:
    """The base's held-out split: the photos make-updatable --examples held out when
    scripts/build_base_model.py built it (by content hash)."""
    from build_base_model import held_out as base_held_out  # type: ignore[import-not-found]

    return bool(base_held_out(path))


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def halves(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """A dish's photos split in two by file-name hash: (pool to train from, held out)."""
    test = [p for p in paths if int(hashlib.sha256(p.name.encode()).hexdigest()[:8], 16) % 2]
    pool = [p for p in paths if p not in set(test)]
    return pool, test


@dataclass
class Features:
    """Frozen-part outputs (first view) for a list of photos, with their true labels."""

    inputs: np.ndarray
    labels: list[str]
    dishes: list[str]


def embed(store: ModelStore, base: Base, paths: list[Path], labels: list[str]) -> Features:
    embedded, failures, _ = Embedder(store, base, 1).embed(paths)
    if failures:
        raise SystemExit(f"cannot read {failures[0].path}: {failures[0].error}")
    return Features(
        inputs=np.stack([views[0] for _, _, views in embedded]),
        labels=labels,
        dishes=[p.parent.name for p in paths],
    )


@dataclass
class Model:
    labels: tuple[str, ...]
    head: Path | Any  # a path, or an onnx.ModelProto (the head with the memory)
    params: dict[str, np.ndarray] | None

    def predict(self, base: Base, feats: np.ndarray) -> list[str]:
        probs = HeadRunner(head_with(self.head, self.params)).probabilities(feats)
        return [self.labels[i] for i in probs.argmax(axis=1)]


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))


def ours(store: ModelStore, label: str, train_photos: list[Path], views: int | None) -> Model:
    """The real retrain, through the public API, as a program would call it."""
    lun = healthyluncher.open(store.root)
    lun.reset()
    lun.retrain(label, train_photos, new_label=True, views=views)
    return ours_model(store)


def naive(
    store: ModelStore, base: Base, label: str, train_photos: list[Path], epochs: int, lr: float
) -> Model:
    """Core ML's update: current weights, the new photos only, no replay, no views."""
    if label not in base.meta.labels:
        raise ValueError("the naive update cannot add a label (Core ML neural networks can't)")
    feats = embed(store, base, train_photos, [label] * len(train_photos)).inputs
    hp = base.meta.hyperparameters.replace(epochs=epochs, learning_rate=lr)
    data = TrainingSet(
        inputs=feats,
        labels=np.full(len(feats), base.meta.labels.index(label), np.int64),
        weights=np.ones(len(feats)),
    )
    # fit honours LUNCHER_TRAINER (trainers.train would always be ONNX Runtime).
    classes = len(base.meta.labels)
    trained = fit(base.path, base.meta, classes, base.path / Files.ARTIFACTS, data, hp)
    return Model(base.meta.labels, base.path / Files.HEAD, trained.params)


def check_against_predict(
    store: ModelStore, model: Model, base: Base, paths: list[Path], feats: np.ndarray
) -> None:
    """The head-with-memory scores used here must be what `luncher predict` says."""
    from healthyluncher.photos import ImageFailure
    from healthyluncher.predictor import Predictor

    said = [r.label for r in Predictor(store).predict(paths) if not isinstance(r, ImageFailure)]
    if said != model.predict(base, feats):
        raise SystemExit("the evaluation disagrees with luncher predict; fix the script")


def main() -> None:
    if sys.argv[1:2] == ["leave-dish-out"]:
        sys.path.insert(0, str(REPO / "scripts"))
        import eval_dishes  # type: ignore[import-not-found]

        sys.argv = [str(REPO / "scripts" / "eval_dishes.py"), *sys.argv[2:]]
        eval_dishes.main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--food", type=Path, default=FOOD)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "luncher-eval")
    parser.add_argument("--draws", type=int, default=5, help="random photo draws per K")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "personalization.md")
    parser.add_argument(
        "--unseen", default="edamame,donuts", help="64 px dishes the base never saw"
    )
    # Core ML's update needs more than our gentle defaults to flip anything at all: give it
    # the settings of the original example (20 epochs at 0.01).
    parser.add_argument("--naive-epochs", type=int, default=20)
    parser.add_argument("--naive-lr", type=float, default=0.01)
    parser.add_argument(
        "--base-test",
        choices=("held-out", "lowres64"),
        default="held-out",
        help="where base accuracy is measured: the base's held-out photos, or every 64 px "
        "dish besides --unseen (the same photos for any base)",
    )
    parser.add_argument("--skip-dishes", action="store_true", help="only the upgrade part")
    parser.add_argument("--skip-upgrade", action="store_true", help="only the dishes part")
    parser.add_argument(
        "--views", type=int, default=None, help="augmented views for ours (default: the base's)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    started = time.perf_counter()

    store = ModelStore(args.work)
    # The shipped base, set up afresh: a work directory left by an earlier run may hold
    # another base (the upgrade part's second one, or one made with --examples).
    from healthyluncher.bases import UpdatableOptions, make_updatable
    from healthyluncher.records import BUNDLED_REPLAY, bundled_model

    shipped = bundled_model()
    assert shipped is not None
    replay = shipped.with_name(BUNDLED_REPLAY)
    make_updatable(store, shipped, UpdatableOptions(replay=replay, force=True))
    base = load_base(store, store.read_state())
    base_model = Model(base.meta.labels, base.path / Files.HEAD, None)

    # The base's held-out photos (full size), and its accuracy on them.
    test_paths, test_labels = [], []
    for label in ("healthy", "fast_food"):
        if args.base_test == "lowres64":
            # 64 px dishes no base trained on (besides the --unseen ones taught here): the
            # same test photos for any base, whatever split it held out.
            skip = set(args.unseen.split(","))
            for dish in sorted((args.food / "lowres64" / label).iterdir()):
                if dish.is_dir() and dish.name not in skip:
                    test_paths.extend(photos(dish))
            test_labels.extend([label] * (len(test_paths) - len(test_labels)))
            continue
        for path in photos(args.food / label):
            if held_out(path):
                test_paths.append(path)
                test_labels.append(label)
    test = embed(store, base, test_paths, test_labels)
    base_acc = accuracy(base_model.predict(base, test.inputs), test.labels)

    if not args.skip_upgrade:
        upgrade(store, args, test)
        # The upgrade part set the shipped base up again, in a directory of its own (the
        # first one may have left the undo history and been removed).
        base = load_base(store, store.read_state())
        base_model = Model(base.meta.labels, base.path / Files.HEAD, None)
    if args.skip_dishes:
        return
    dishes = {"pancakes": args.food / "personal" / "pancakes"}
    for name in args.unseen.split(","):
        found = list((args.food / "lowres64").glob(f"*/{name}"))
        if found:
            dishes[name] = found[0]
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng(0)
    for dish, folder in dishes.items():
        pool, held = halves(photos(folder))
        held_feats = embed(store, base, held, ["healthy"] * len(held)).inputs
        base_label = base_model.predict(base, held_feats)
        # The user disagrees with the base's majority call for this dish.
        majority = max(set(base_label), key=base_label.count)
        target = "healthy" if majority == "fast_food" else "fast_food"
        base_flip = float(np.mean([p == target for p in base_label]))
        scenarios = [(k, target) for k in (1, 3, 5, 10)] + [(10, dish)]
        for k, label in scenarios:
            for method in ("ours", "naive"):
                if method == "naive" and label not in base.meta.labels:
                    continue
                flipped, drops, self_flips = [], [], []
                for _ in range(args.draws):
                    chosen = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
                    if method == "ours":
                        model = ours(store, label, chosen, args.views)
                        check_against_predict(store, model, base, held[:8], held_feats[:8])
                    else:
                        model = naive(store, base, label, chosen, args.naive_epochs, args.naive_lr)
                    flipped.append(np.mean([p == label for p in model.predict(base, held_feats)]))
                    drops.append(base_acc - accuracy(model.predict(base, test.inputs), test.labels))
                    own = embed(store, base, chosen, [label] * k).inputs
                    self_flips.append(np.mean([p == label for p in model.predict(base, own)]))
                rows.append(
                    {
                        "dish": dish,
                        "seen_by_base": dish == "pancakes",
                        "label": label,
                        "new_label": label not in base.meta.labels,
                        "k": k,
                        "method": method,
                        "held_out_photos": len(held),
                        "base_share_with_label": round(base_flip, 3),
                        "held_out_with_label": round(float(np.mean(flipped)), 3),
                        "base_accuracy_drop_points": round(100 * float(np.mean(drops)), 2),
                        "trained_photos_with_label": round(float(np.mean(self_flips)), 3),
                        "trained_photos_min": round(float(np.min(self_flips)), 3),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    healthyluncher.open(store.root).reset()
    elapsed = time.perf_counter() - started
    write(args.out, rows, base_acc, len(test.labels), args, elapsed)


def second_base(store: ModelStore, base: Base, food: Path, target: Path) -> None:
    """The same backbone with a head trained on another split (fold 1 by content hash also
    left out, fold 0 is the held-out one) and another seed, through the project's own
    training path: an improved base to ship."""
    import onnx

    from healthyluncher.heads import write_back
    from healthyluncher.photos import digest_of, read_bytes

    def fold_of(path: Path) -> int:
        return int(digest_of(read_bytes(path))[:8], 16) % 5

    paths, labels = [], []
    for label in ("healthy", "fast_food"):
        for path in photos(food / label):
            if fold_of(path) not in (0, 1):
                paths.append(path)
                labels.append(label)
    feats = embed(store, base, paths, labels)
    y = np.array([base.meta.labels.index(label) for label in labels], np.int64)
    weights = np.array([1.0 / np.sum(y == c) for c in y])
    hp = Hyperparameters(epochs=10, learning_rate=0.001, seed=1)
    data = TrainingSet(feats.inputs, y, weights)
    classes = len(base.meta.labels)
    trained = fit(base.path, base.meta, classes, base.path / Files.ARTIFACTS, data, hp)
    model = onnx.load(str(base.path / Files.MODEL))
    write_back(model, trained.params)
    onnx.save(model, str(target))


def upgrade(store: ModelStore, args: argparse.Namespace, test: Features) -> None:
    """Personalize the shipped base with K=5 pancakes, move to a second base keeping the
    personalization, and compare with a fresh personalization on that second base."""
    from healthyluncher.bases import UpdatableOptions, make_updatable
    from healthyluncher.predictor import Predictor
    from healthyluncher.records import BUNDLED_REPLAY, bundled_model

    shipped = bundled_model()
    assert shipped is not None
    replay = shipped.with_name(BUNDLED_REPLAY)
    v1 = load_base(store, store.read_state())
    v2_path = args.work.parent / "luncher-eval-base-v2.onnx"
    second_base(store, v1, args.food, v2_path)
    pool, held = halves(photos(args.food / "personal" / "pancakes"))
    rows = []
    rng = np.random.default_rng(1)
    for draw in range(args.draws):
        chosen = [pool[i] for i in rng.choice(len(pool), size=5, replace=False)]
        for method in ("upgrade", "fresh"):
            make_updatable(store, shipped, UpdatableOptions(replay=replay, force=True))
            if method == "upgrade":
                healthyluncher.open(store.root).retrain("healthy", chosen)
                options = UpdatableOptions(replay=replay, keep_personalization=True)
                make_updatable(store, v2_path, options)
            else:
                make_updatable(store, v2_path, UpdatableOptions(replay=replay, force=True))
                healthyluncher.open(store.root).retrain("healthy", chosen)
            base = load_base(store, store.read_state())
            plain = Model(base.meta.labels, base.path / Files.HEAD, None)
            model = ours_model(store)
            predictor = Predictor(store)
            own = [r.label for r in predictor.predict(chosen) if hasattr(r, "label")]
            held_feats = embed(store, base, held, ["healthy"] * len(held)).inputs
            base_acc = accuracy(plain.predict(base, test.inputs), test.labels)
            rows.append(
                {
                    "draw": draw,
                    "method": method,
                    "own_photos_with_label": float(np.mean([x == "healthy" for x in own])),
                    "held_out_with_label": float(
                        np.mean([x == "healthy" for x in model.predict(base, held_feats)])
                    ),
                    "new_base_accuracy": base_acc,
                    "drop_points": 100
                    * (base_acc - accuracy(model.predict(base, test.inputs), test.labels)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    healthyluncher.open(store.root).reset()
    make_updatable(store, shipped, UpdatableOptions(replay=replay, force=True))
    lines = [
        "# Upgrading the base and keeping the personalization",
        "",
        f"Produced by `python scripts/eval_personalization.py --skip-dishes --draws {args.draws}`. "
        "Personalize the shipped base with K=5 pancake photos labelled healthy, then "
        "`make-updatable NEW --keep-personalization` to a second base (same backbone, head "
        "trained on another split and seed), against a fresh personalization of the new base "
        "with the same photos. Mean over draws (min in brackets).",
        "",
        "| method | own photos keep the label | held-out pancakes healthy | new base accuracy "
        "| drop |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in ("upgrade", "fresh"):
        mine = [r for r in rows if r["method"] == method]

        def stat(key: str, mine: list[dict[str, Any]] = mine) -> str:
            values = [float(r[key]) for r in mine]
            return f"{np.mean(values):.3f} ({np.min(values):.3f})"

        drop = np.mean([float(r["drop_points"]) for r in mine])
        lines.append(
            f"| {method} | {stat('own_photos_with_label')} | {stat('held_out_with_label')} | "
            f"{float(mine[0]['new_base_accuracy']):.3f} | {drop:+.2f} |"
        )
    out = args.out.with_name("upgrade.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


def ours_model(store: ModelStore) -> Model:
    """The current personalized head with its memory, as predict runs it."""
    state = store.read_state()
    base = load_base(store, state)
    personal = load_personal(store, state)
    assert personal is not None
    meta = personal.meta
    examples = load_examples(personal, ())
    weights = load_weights(personal)
    _, head = personal_graphs(base, meta.labels, weights, examples, meta.hyperparameters)
    return Model(meta.labels, head, None)


def write(
    out: Path,
    rows: list[dict[str, object]],
    base_acc: float,
    n_test: int,
    args: argparse.Namespace,
    elapsed: float,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Personalization: our retrain beside a naive Core ML-style update",
        "",
        f"Produced by `python scripts/eval_personalization.py --draws {args.draws}"
        + (f" --views {args.views}" if args.views else "")
        + (f" --base-test {args.base_test}" if args.base_test != "held-out" else "")
        + "` "
        f"(naive: {args.naive_epochs} epochs at learning rate {args.naive_lr}) "
        f"in {elapsed:.0f} s. Base accuracy on "
        + (
            f"its {n_test} held-out photos"
            if args.base_test == "held-out"
            else f"{n_test} photos of 64 px dishes it never trained on"
        )
        + f": {base_acc:.3f}.",
        f"Each row averages {args.draws} random draws of K training photos from one half of the "
        "dish; 'held out' is the other half. 'drop' is base accuracy lost, in points.",
        "",
        "| dish | label | K | method | held out with label | base accuracy drop | "
        "trained photos with label (mean / min) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        label = f"{r['label']} (new)" if r["new_label"] else str(r["label"])
        dish = str(r["dish"]) + ("" if r["seen_by_base"] else " (unseen)")
        lines.append(
            f"| {dish} | {label} | {r['k']} | {r['method']} | {r['held_out_with_label']:.2f} "
            f"(base {r['base_share_with_label']:.2f}) | {r['base_accuracy_drop_points']:+.2f} | "
            f"{r['trained_photos_with_label']:.2f} / {r['trained_photos_min']:.2f} |"
        )
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
