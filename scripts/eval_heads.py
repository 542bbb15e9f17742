"""Head designs for personalization side by side, on frozen features (issue 16).

Run from the repository root (needs ../shared/food and two leave-out bases, built with
`scripts/build_base_model.py --stock STOCK.onnx --leave-out DISHES --output DIR`):

    .venv/bin/python scripts/eval_heads.py --tuning-base /tmp/lobaseB --report-base /tmp/lobase

Protocol:

- **Two pairs of full-size dishes**, each left out of its own base. The tuning pair
  (`--tuning-dishes`, default fruit and beignets: the second-smallest sha256 of the dish
  names per label) is the only place any setting is chosen; the report pair
  (`--report-dishes`, default bibimbap and breakfast_burrito: the smallest) is measured
  once, with the settings frozen. The same pairs as scripts/eval_dishes.py --full-size and
  results/dishes-tuning-sweep.md.
- **Scenarios and draws** are eval_dishes.py's, draw for draw (the same random generator
  and order): the user teaches the label the base does not give the dish with K = 1, 5,
  10 photos drawn from one half of the dish, or a new label (the dish's name) from 10; the
  other half is held out. Every cell is `--draws` draws x `--seeds` seeds; a method with no
  randomness of its own (all but a random projection) is run once per draw and says so.
- **Measures**, as in eval_dishes.py: recall (held-out photos of the dish that get the
  user's label), precision (of every test photo given the label: the dish's held-out
  photos, the base's held-out full-size photos, the 64 px report dishes), base drop
  (accuracy lost on the base's own held-out full-size photos, the left-out dishes
  excluded, against the base head) and far drop (on the 64 px report dishes).
- **Methods**, all on the base's frozen features (the 1280-d head inputs; test photos as
  they are, the user's photos with or without augmented views, `views` below), with the
  base's shipped replay set (400 head inputs) standing for the base's data, as on a
  user's machine. The user's photos always form a group of their own
  (a new class, or for a relabelled dish a sub-class mapped to the taught label):
  - `current`: the library's own retrain and memory through the public API
    (`healthyluncher.open(dir).retrain`), exactly as eval_dishes.py runs it;
  - `ncm` (SimpleShot): features centred on the replay mean and L2-normalised; the
    nearest class mean by cosine over the two base classes' replay means and the user's
    mean (cosine, not distance: a mean of one photo is longer than a mean of 200);
  - `simplecil`: the same prototypes on uncentred, L2-normalised features;
  - `ridge` (RanPAC): centred, L2-normalised features, optionally a fixed random
    projection to M dims with ReLU (`dims`, a seed per training seed), then ridge
    regression (`lam`, relative to the features' squared norm) to one-hot targets over
    replay and user rows, each class with the same total weight; all classes decided by
    the ridge head;
  - `hybrid-ridge`, `hybrid-ncm`: the same scores decide only whether a photo belongs to
    the user's group; otherwise the base head's answer stands, so no other prediction
    moves (a calibrated combination of the base head and a few-shot rule).
  Each method's one knob is a bonus added to the user group's score (a cosine for the
  nearest-mean rules, one-hot units for ridge). `views`: the user's photos alone, or with
  the library's augmented views (8 per photo at K=1, 3 at K=5, 1 at K=10).
- **Selection rule** (per method, on the tuning pair only): among its settings, those
  whose mean base drop is at most `--max-drop` points in every scenario; of those, the one
  with the highest mean recall over the four scenarios; when none qualifies, the one with
  the smallest base drop. `current` keeps the library's defaults (results/dishes-tuning-
  sweep.md found no setting that moves it).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from eval_dishes import report_dishes, stores  # type: ignore[import-not-found]  # noqa: E402
from eval_personalization import (  # type: ignore[import-not-found]  # noqa: E402
    Model,
    check_against_predict,
    halves,
    held_out,
    ours,
    photos,
)

from healthyluncher.embedder import Embedder  # noqa: E402
from healthyluncher.examples import load_replay  # noqa: E402
from healthyluncher.records import BUNDLED_MODEL, BUNDLED_REPLAY, Base, load_base  # noqa: E402
from healthyluncher.settings import Hyperparameters  # noqa: E402
from healthyluncher.store import Files, ModelStore  # noqa: E402

FOOD = REPO.parent / "shared" / "food"
LABELS = ("healthy", "fast_food")
# Scenarios in eval_dishes.py's order: (K, new label?).
SCENARIOS = ((1, False), (5, False), (10, False), (10, True))


def scenario_name(k: int, new: bool) -> str:
    return "new label, 10 photos" if new else f"K={k}"


# ----------------------------------------------------------------------------- features


@dataclass
class Pair:
    """One base with its left-out dishes: features, base predictions, draws."""

    name: str
    base_dir: Path
    dishes: list[tuple[str, Path, str]]  # (dish, folder, its true label)
    labels: tuple[str, ...] = ()
    bank: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    index: dict[str, int] = field(default_factory=dict)  # photo path -> row of bank
    replay_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    replay_y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    base_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    base_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    base_truth: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    far_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    far_truth: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    draws: list[dict[str, Any]] = field(default_factory=list)
    seeded: list[ModelStore] = field(default_factory=list)
    base: Base | None = None


def sha_name(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def embed_all(
    store: ModelStore, base: Base, paths: list[Path], cache: Path, views: int = 1
) -> tuple[np.ndarray, str]:
    """Head inputs of `paths` (photos, views, features), the library's own views (the
    first is the photo itself), cached in `cache` per frozen part. Two bases built from
    one stock model share the frozen part; that is checked on 16 photos before a cache
    made with another base is used."""
    cache.mkdir(parents=True, exist_ok=True)
    names = [str(p) for p in paths]
    key = sha_name("\n".join(names) + f"\nviews={views}")[:16]
    embedder = Embedder(store, base, views)

    def run(chosen: list[Path]) -> np.ndarray:
        done, failures, _ = embedder.embed(chosen)
        if failures:
            raise SystemExit(f"cannot read {failures[0].path}: {failures[0].error}")
        return np.stack([v.reshape(len(v), -1) for _, _, v in done]).astype(np.float32)

    for file in sorted(cache.glob(f"features-{key}-*.npz")):
        with np.load(file, allow_pickle=False) as data:
            if list(data["paths"]) != names:
                continue
            feats = data["features"]
        probe = np.unique(np.linspace(0, len(paths) - 1, 16).astype(int))
        if np.allclose(run([paths[i] for i in probe]), feats[probe], atol=1e-4, rtol=1e-4):
            return feats, f"{file.name} (frozen part checked on 16 photos)"
    started = time.perf_counter()
    feats = run(paths)
    out = cache / f"features-{key}-{base.meta.sha256[:12]}.npz"
    np.savez(out, paths=np.array(names), features=feats)
    return feats, f"{out.name} (embedded in {time.perf_counter() - started:.0f} s)"


def setup_pair(pair: Pair, args: argparse.Namespace, far: dict[str, tuple[Path, str]]) -> None:
    model = pair.base_dir / BUNDLED_MODEL
    if not model.is_file() or not (pair.base_dir / BUNDLED_REPLAY).is_file():
        raise SystemExit(f"{pair.base_dir}: no {BUNDLED_MODEL} / {BUNDLED_REPLAY}")
    os.environ["LUNCHER_BUNDLED_MODEL"] = str(model)
    seeds = 1 if args.skip_current else args.seeds
    pair.seeded = stores(args.work / pair.name, seeds, Hyperparameters())
    store = pair.seeded[0]
    base = load_base(store, store.read_state())
    pair.base = base
    pair.labels = tuple(base.meta.labels)
    left = {d for d, _, _ in pair.dishes}
    full: list[tuple[Path, str]] = []
    for label in LABELS:
        for dish in sorted(p for p in (args.food / label).iterdir() if p.is_dir()):
            full.extend((p, label) for p in photos(dish))
    low: list[tuple[Path, str]] = []
    for folder, label in far.values():
        low.extend((p, label) for p in photos(folder))
    paths = [p for p, _ in full + low]
    feats3, how = embed_all(store, base, paths, args.cache)
    feats = feats3[:, 0]
    print(f"[{pair.name}] features: {how}", flush=True)
    replay = load_replay(base)
    assert replay is not None
    pair.bank = np.concatenate([replay[0].reshape(len(replay[0]), -1), feats]).astype(np.float32)
    pair.replay_rows = np.arange(len(replay[0]))
    pair.replay_y = replay[1]
    pair.index = {str(p): len(replay[0]) + i for i, p in enumerate(paths)}
    runner = Model(pair.labels, base.path / Files.HEAD, None)
    pair.base_pred = np.array(
        [pair.labels.index(x) for x in runner.predict(base, pair.bank)], np.int64
    )
    base_test = [(p, lab) for p, lab in full if p.parent.name not in left and held_out(p)]
    pair.base_rows = np.array([pair.index[str(p)] for p, _ in base_test])
    pair.base_truth = np.array([pair.labels.index(lab) for _, lab in base_test])
    pair.far_rows = np.array([pair.index[str(p)] for p, _ in low])
    pair.far_truth = np.array([pair.labels.index(lab) for _, lab in low])
    base_acc = float(np.mean(pair.base_pred[pair.base_rows] == pair.base_truth))
    print(f"[{pair.name}] base accuracy {base_acc:.4f} on {len(base_test)} photos", flush=True)

    # eval_dishes.py's draws, in its order, from one generator.
    rng = np.random.default_rng(0)
    for dish, folder, true_label in pair.dishes:
        pool, held = halves(photos(folder))
        held_rows = np.array([pair.index[str(p)] for p in held])
        calls = pair.base_pred[held_rows]
        majority = pair.labels[int(np.bincount(calls, minlength=len(pair.labels)).argmax())]
        target = "healthy" if majority == "fast_food" else "fast_food"
        for k, new in SCENARIOS:
            label = dish if new else target
            for draw in range(args.draws):
                chosen = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
                pair.draws.append(
                    {
                        "dish": dish,
                        "dish_label": true_label,
                        "label": label,
                        "new": new,
                        "k": k,
                        "draw": draw,
                        "photos": chosen,
                        "rows": np.array([pair.index[str(p)] for p in chosen]),
                        "held": held,
                        "held_rows": held_rows,
                        "pool_rows": np.array([pair.index[str(p)] for p in pool]),
                    }
                )
    # The library's augmented views of each drawn photo (as many as a retrain of K photos
    # gives each: Hyperparameters.views_for), appended to the bank.
    hp = Hyperparameters()
    for views in sorted({hp.views_for(d["k"]) for d in pair.draws}):
        wanted = sorted({p for d in pair.draws if hp.views_for(d["k"]) == views
                         for p in d["photos"]})  # fmt: skip
        got, how = embed_all(store, base, wanted, args.cache, views)
        print(f"[{pair.name}] {views} views of {len(wanted)} photos: {how}", flush=True)
        at = {str(p): len(pair.bank) + i * views for i, p in enumerate(wanted)}
        pair.bank = np.concatenate([pair.bank, got.reshape(-1, got.shape[-1])])
        for d in pair.draws:
            if hp.views_for(d["k"]) == views:
                d["view_rows"] = np.concatenate(
                    [np.arange(at[str(p)], at[str(p)] + views) for p in d["photos"]]
                )


# ----------------------------------------------------------------------------- scoring


def measure(pair: Pair, d: dict[str, Any], pred_held: np.ndarray, pred_base: np.ndarray,
            pred_far: np.ndarray, label_id: int) -> dict[str, float]:  # fmt: skip
    """Recall, precision, base drop and far drop of one run (predictions as class ids in
    the label space where `label_id` is the taught label)."""
    hits = int(np.sum(pred_held == label_id))
    given_base = pred_base == label_id
    given_far = pred_far == label_id
    right = int(np.sum(given_base & (pair.base_truth == label_id)))
    right += int(np.sum(given_far & (pair.far_truth == label_id)))
    wrong = int(np.sum(given_base & (pair.base_truth != label_id)))
    wrong += int(np.sum(given_far & (pair.far_truth != label_id)))
    base0 = np.mean(pair.base_pred[pair.base_rows] == pair.base_truth)
    far0 = np.mean(pair.base_pred[pair.far_rows] == pair.far_truth)
    return {
        "recall": hits / len(pred_held),
        "precision": (hits + right) / max(1, hits + right + wrong),
        "base_drop": float(100 * (base0 - np.mean(pred_base == pair.base_truth))),
        "far_drop": float(100 * (far0 - np.mean(pred_far == pair.far_truth))),
    }


def run_current(pair: Pair, seeds: int) -> list[dict[str, Any]]:
    """The library's retrain and memory, through the public API (eval_dishes.py's `ours`)."""
    assert pair.base is not None
    runs = []
    checked: set[str] = set()
    for d in pair.draws:
        for seed in range(seeds):
            store = pair.seeded[seed]
            model = ours(store, d["label"], d["photos"], None)
            if d["dish"] not in checked:
                check_against_predict(
                    store, model, pair.base, d["held"][:4], pair.bank[d["held_rows"][:4]]
                )
                checked.add(d["dish"])
            label_id = model.labels.index(d["label"])

            def ids(rows: np.ndarray, model: Model = model) -> np.ndarray:
                said = model.predict(pair.base, pair.bank[rows])
                return np.array([model.labels.index(x) for x in said])

            m = measure(pair, d, ids(d["held_rows"]), ids(pair.base_rows), ids(pair.far_rows),
                        label_id)  # fmt: skip
            runs.append({**key_of(d), "seed": seed, **m})
    return runs


def key_of(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("dish", "label", "new", "k", "draw")}


class Space:
    """The feature maps of one pair: centred (on the replay mean) and L2-normalised rows,
    raw L2-normalised rows, and per (seed, M) a random ReLU projection's kernel."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        bank = pair.bank.astype(np.float64)
        self.mean = bank[pair.replay_rows].mean(axis=0)
        self.centred = unit(bank - self.mean)
        self.raw = unit(bank)
        # Every row a test or a training row can come from.
        test = np.concatenate([pair.base_rows, pair.far_rows])
        users = np.unique(np.concatenate([np.r_[d["rows"], d["view_rows"]] for d in pair.draws]))
        helds = np.unique(np.concatenate([d["held_rows"] for d in pair.draws]))
        self.cols = np.concatenate([pair.replay_rows, users])  # training rows
        self.rows = np.unique(np.concatenate([test, helds, self.cols]))
        self.row_at = np.full(len(bank), -1)
        self.row_at[self.rows] = np.arange(len(self.rows))
        self.col_at = np.full(len(bank), -1)
        self.col_at[self.cols] = np.arange(len(self.cols))
        self._kernels: dict[tuple[int, int], np.ndarray] = {}
        self.fixed = np.concatenate([pair.base_rows, pair.far_rows])
        self._fixed: dict[tuple[int, int], np.ndarray] = {}

    def kernel(self, seed: int, dims: int) -> np.ndarray:
        """phi(rows) . phi(cols) + 1 (a bias feature), phi = the centred unit features, or
        ReLU of a fixed Gaussian projection of them to `dims` (RanPAC)."""
        key = (seed if dims else 0, dims)
        if key not in self._kernels:
            z = self.centred
            if dims:
                proj = np.random.default_rng(1000 + seed).standard_normal((z.shape[1], dims))
                phi_rows = np.maximum(z[self.rows] @ proj, 0) / np.sqrt(dims)
                phi_cols = phi_rows[self.row_at[self.cols]]
            else:
                phi_rows, phi_cols = z[self.rows], z[self.cols]
            self._kernels[key] = phi_rows @ phi_cols.T + 1.0
            # The test rows every draw shares, contiguous (a column gather per run).
            self._fixed[key] = np.ascontiguousarray(self._kernels[key][self.row_at[self.fixed]])
        return self._kernels[key]

    def test_kernel(self, seed: int, dims: int, held: np.ndarray, train: np.ndarray) -> np.ndarray:
        """kernel(held rows, then base and far test rows; train rows)."""
        kern = self.kernel(seed, dims)
        fixed = self._fixed[(seed if dims else 0, dims)]
        cols = self.col_at[train]
        return np.concatenate([kern[self.row_at[held]][:, cols], fixed[:, cols]])


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # type: ignore[no-any-return]


def ncm_scores(space: Space, centred: bool, user_rows: np.ndarray, rows: np.ndarray,
               classes: int) -> np.ndarray:  # fmt: skip
    """Cosine similarity to each base class's replay mean and to the user's mean (means of
    unit rows; cosine, not distance, so that a mean of one photo is not penalized for
    being longer than a mean of 200): (len(rows), classes + 1), the user group last."""
    z = space.centred if centred else space.raw
    pair = space.pair
    means = [z[pair.replay_rows[pair.replay_y == c]].mean(axis=0) for c in range(classes)]
    means.append(z[user_rows].mean(axis=0))
    m = unit(np.stack(means))
    return z[rows] @ m.T  # type: ignore[no-any-return]


def ridge_scores(space: Space, seed: int, dims: int, lam: float, weight: float,
                 user_rows: np.ndarray, rows: np.ndarray, classes: int) -> np.ndarray:  # fmt: skip
    """A ridge head over replay + user rows (dual form), its scores for `rows`:
    (len(rows), classes + 1), the user group last."""
    pair = space.pair
    kern = space.kernel(seed, dims)
    train = np.concatenate([pair.replay_rows, user_rows])
    y = np.concatenate([pair.replay_y, np.full(len(user_rows), classes)])
    w = np.ones(len(train))
    for c in range(classes + 1):
        w[y == c] = 1.0 / np.sum(y == c)
    w[y == classes] *= weight
    s = np.sqrt(w)
    targets = np.eye(classes + 1)[y] * s[:, None]
    k_tt = kern[space.row_at[train]][:, space.col_at[train]]
    scale = float(np.mean(np.diag(k_tt)[: len(pair.replay_rows)]))
    alpha = np.linalg.solve(s[:, None] * k_tt * s[None, :] + lam * scale * np.eye(len(train)),
                            targets)  # fmt: skip
    held = rows[: len(rows) - len(space.fixed)]
    assert np.array_equal(rows[len(held) :], space.fixed)
    return space.test_kernel(seed, dims, held, train) @ (s[:, None] * alpha)  # type: ignore[no-any-return]


# A method's scores: (space, draw, seed, setting, rows) -> (len(rows), base classes + 1),
# the user's group last, before the knob (a bonus added to the user group's score).
Scores = Callable[[Space, dict[str, Any], int, dict[str, Any], np.ndarray], np.ndarray]


def group_to_label(scores: np.ndarray, pair: Pair, d: dict[str, Any]) -> np.ndarray:
    """Argmax over base classes + user group, the user group mapped to its label."""
    classes = len(pair.labels)
    best = scores.argmax(axis=1)
    target = classes if d["new"] else pair.labels.index(d["label"])
    return np.where(best == classes, target, best)  # type: ignore[no-any-return]


def hybrid(scores: np.ndarray, pair: Pair, d: dict[str, Any], rows: np.ndarray) -> np.ndarray:
    """The user's label where the user group wins, the base head's answer elsewhere."""
    classes = len(pair.labels)
    target = classes if d["new"] else pair.labels.index(d["label"])
    mine = scores.argmax(axis=1) == classes
    return np.where(mine, target, pair.base_pred[rows])  # type: ignore[no-any-return]


def user_rows(d: dict[str, Any], s: dict[str, Any]) -> np.ndarray:
    return d["view_rows"] if s["views"] == "budget" else d["rows"]  # type: ignore[no-any-return]


def scores_ncm(centred: bool) -> Scores:
    def scores(space: Space, d: dict[str, Any], seed: int, s: dict[str, Any],
               rows: np.ndarray) -> np.ndarray:  # fmt: skip
        return ncm_scores(space, centred, user_rows(d, s), rows, len(space.pair.labels))

    return scores


def scores_ridge(space: Space, d: dict[str, Any], seed: int, s: dict[str, Any],
                 rows: np.ndarray) -> np.ndarray:  # fmt: skip
    return ridge_scores(space, seed, s["dims"], s["lam"], 1.0, user_rows(d, s), rows,
                        len(space.pair.labels))  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    scores: Scores
    combine: bool  # True: the base head decides every photo the user group does not win
    grid: dict[str, tuple[Any, ...]]  # every setting but the knob
    knob: str = "bonus"

    def settings(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, v, strict=True)) for v in itertools.product(*self.grid.values())]

    def seeded(self, setting: dict[str, Any]) -> bool:
        return bool(setting.get("dims"))


# "views": 1 (the photo only) or "budget" (the library's augmented views: 8 per photo at
# K=1, 3 at K=5, 1 at K=10). The knob, a bonus on the user group's score: cosines for the
# nearest-mean rules, one-hot units for ridge.
VIEWS = (1, "budget")
BONUS = (-0.3, -0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2)
NCM_GRID: dict[str, tuple[Any, ...]] = {"views": VIEWS}
RIDGE_GRID: dict[str, tuple[Any, ...]] = {
    "views": VIEWS,
    "dims": (0, 4096),
    "lam": (0.001, 0.01, 0.1),
}
METHODS = (
    Method("ncm", scores_ncm(centred=True), False, NCM_GRID),
    Method("simplecil", scores_ncm(centred=False), False, NCM_GRID),
    Method("ridge", scores_ridge, False, RIDGE_GRID),
    Method("hybrid-ncm", scores_ncm(centred=True), True, NCM_GRID),
    Method("hybrid-ridge", scores_ridge, True, RIDGE_GRID),
)


def run_method(space: Space, method: Method, setting: dict[str, Any], seeds: int,
               bonuses: tuple[float, ...]) -> dict[float, list[dict[str, Any]]]:  # fmt: skip
    """Runs for every value of the knob (the scores do not depend on it)."""
    return run_methods(space, [method], setting, seeds, {method.name: bonuses})[method.name]


Runs = dict[float, list[dict[str, Any]]]  # {bonus: runs}


def run_methods(space: Any, methods: Sequence[Any], setting: dict[str, Any], seeds: int,
                bonuses: dict[str, tuple[float, ...]]) -> dict[str, Runs]:  # fmt: skip
    """{method name: {bonus: runs}} for methods whose scores are the first one's (a ridge
    head and its hybrid form, say): the scores are computed once per draw and seed. `space`
    has the pair (a Space, or a script's own); each method has name, scores, combine and
    seeded, as Method has."""
    pair, first = space.pair, methods[0]
    out: dict[str, Runs] = {m.name: {b: [] for b in bonuses[m.name]} for m in methods}
    for d in pair.draws:
        label_id = len(pair.labels) if d["new"] else pair.labels.index(d["label"])
        rows = np.concatenate([d["held_rows"], pair.base_rows, pair.far_rows])
        cut = np.cumsum([len(d["held_rows"]), len(pair.base_rows)])
        for seed in range(seeds if first.seeded(setting) else 1):
            scores = first.scores(space, d, seed, setting, rows)
            for method in methods:
                for bonus in bonuses[method.name]:
                    shifted = scores.copy()
                    shifted[:, -1] += bonus
                    if method.combine:
                        pred = hybrid(shifted, pair, d, rows)
                    else:
                        pred = group_to_label(shifted, pair, d)
                    held, base, far = np.split(pred, cut)
                    m = measure(pair, d, held, base, far, label_id)
                    out[method.name][bonus].append({**key_of(d), "seed": seed, **m})
    return out


# ----------------------------------------------------------------------------- summaries


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario over both dishes: mean, worst seed (mean over dishes and draws of each
    seed, the worst), worst dish (its mean), worst run."""
    out = {}
    for k, new in SCENARIOS:
        mine = [r for r in runs if r["k"] == k and r["new"] == new]
        row: dict[str, Any] = {"runs": len(mine)}
        for key, worst in (("recall", min), ("precision", min), ("base_drop", max),
                           ("far_drop", max)):  # fmt: skip
            values = [r[key] for r in mine]
            seeds = sorted({r["seed"] for r in mine})
            dishes = sorted({r["dish"] for r in mine})
            row[key] = float(np.mean(values))
            row[f"{key}_worst_seed"] = worst(
                float(np.mean([r[key] for r in mine if r["seed"] == s])) for s in seeds
            )
            row[f"{key}_worst_dish"] = worst(
                float(np.mean([r[key] for r in mine if r["dish"] == x])) for x in dishes
            )
            row[f"{key}_worst_run"] = float(worst(values))
        out[scenario_name(k, new)] = row
    return out


def slim(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A tuning curve's point: means and worst runs only."""
    keep = ("runs", "recall", "precision", "base_drop", "far_drop")
    keep += ("recall_worst_run", "base_drop_worst_run")
    return {name: {k: s[k] for k in keep} for name, s in summary.items()}


def score_of(summary: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """(mean recall over the scenarios, the largest mean base drop of a scenario)."""
    recall = float(np.mean([s["recall"] for s in summary.values()]))
    return recall, max(s["base_drop"] for s in summary.values())


def choose(results: list[dict[str, Any]], max_drop: float) -> dict[str, Any]:
    ok = [r for r in results if score_of(r["summary"])[1] <= max_drop]
    if ok:
        return max(ok, key=lambda r: score_of(r["summary"])[0])
    return min(results, key=lambda r: score_of(r["summary"])[1])


def add_pair_arguments(parser: argparse.ArgumentParser, work: str) -> None:
    """The options that name the photos, the two pairs and their bases, and the caches."""
    parser.add_argument("--food", type=Path, default=FOOD)
    parser.add_argument("--tuning-base", type=Path, required=True)
    parser.add_argument("--tuning-dishes", default="fruit,beignets")
    parser.add_argument("--report-base", type=Path, required=True)
    parser.add_argument("--report-dishes", default="bibimbap,breakfast_burrito")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "eval-heads-cache"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / work)


def pairs_of(args: argparse.Namespace) -> list[Pair]:
    """The tuning pair, then the report pair, as the options name them."""
    pairs = []
    for name, base_dir, dishes in (
        ("tuning", args.tuning_base, args.tuning_dishes),
        ("report", args.report_base, args.report_dishes),
    ):
        wanted = set(dishes.split(","))
        found = [
            (folder.name, folder, label)
            for label in LABELS
            for folder in sorted((args.food / label).iterdir())
            if folder.name in wanted
        ]
        if len(found) != len(wanted):
            raise SystemExit(f"--{name}-dishes {dishes}: not all are dishes of {args.food}")
        pairs.append(Pair(name, base_dir, found))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser, "eval-heads-work")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-drop", type=float, default=0.5, help="selection rule, points")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "heads.md")
    parser.add_argument(
        "--skip-current", action="store_true", help="leave out the library's own retrain"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    far = report_dishes(args.food)
    pairs = pairs_of(args)
    results: dict[str, Any] = {"pairs": {}, "methods": {}}
    for pair in pairs:
        setup_pair(pair, args, far)
        results["pairs"][pair.name] = {
            "base": str(pair.base_dir),
            "dishes": [d for d, _, _ in pair.dishes],
            "base_test_photos": len(pair.base_rows),
            "base_accuracy": float(np.mean(pair.base_pred[pair.base_rows] == pair.base_truth)),
        }
    tuning, report = pairs
    if not args.skip_current:
        for pair in pairs:
            t = time.perf_counter()
            runs = run_current(pair, args.seeds)
            results["methods"].setdefault("current", {})[pair.name] = {
                "setting": "library defaults",
                "summary": summarize(runs),
                "runs": runs,
            }
            print(f"[{pair.name}] current: {time.perf_counter() - t:.0f} s", flush=True)
    spaces = {p.name: Space(p) for p in pairs}
    for method in METHODS:
        t = time.perf_counter()
        curve = []
        for setting in method.settings():
            by_bonus = run_method(spaces["tuning"], method, setting, args.seeds, BONUS)
            for bonus, runs in by_bonus.items():
                curve.append({"setting": {**setting, "bonus": bonus}, "summary": summarize(runs)})
        best = choose(curve, args.max_drop)
        curve = [{"setting": c["setting"], "summary": slim(c["summary"])} for c in curve]
        fixed = {k: v for k, v in best["setting"].items() if k != "bonus"}
        bonus = best["setting"]["bonus"]
        runs = run_method(spaces["report"], method, fixed, args.seeds, (bonus,))[bonus]
        results["methods"][method.name] = {
            "knob": method.knob,
            "tuning_curve": curve,
            "tuning": best,
            "report": {"setting": best["setting"], "summary": summarize(runs), "runs": runs},
        }
        print(f"{method.name}: {best['setting']} ({time.perf_counter() - t:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - started
    results["command"] = command_line(args)
    write(args, results)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python scripts/eval_heads.py", f"--tuning-base {args.tuning_base}",
             f"--report-base {args.report_base}"]  # fmt: skip
    if args.tuning_dishes != "fruit,beignets":
        parts.append(f"--tuning-dishes {args.tuning_dishes}")
    if args.report_dishes != "bibimbap,breakfast_burrito":
        parts.append(f"--report-dishes {args.report_dishes}")
    parts += [f"--draws {args.draws}", f"--seeds {args.seeds}", f"--max-drop {args.max_drop}"]
    if args.skip_current:
        parts.append("--skip-current")
    return " ".join(parts)


def fmt_setting(setting: Any) -> str:
    if isinstance(setting, str):
        return setting
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def table(summaries: list[tuple[str, str, dict[str, dict[str, Any]]]]) -> list[str]:
    lines = [
        "| method | setting | scenario | recall: mean (worst seed / worst dish / worst run) "
        "| precision: mean (worst run) | base drop pt: mean (worst seed / worst run) "
        "| far drop pt |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, setting, summary in summaries:
        for scenario, s in summary.items():
            lines.append(
                f"| {name} | {setting} | {scenario} | {s['recall']:.2f} "
                f"({s['recall_worst_seed']:.2f} / {s['recall_worst_dish']:.2f} / "
                f"{s['recall_worst_run']:.2f}) | {s['precision']:.2f} "
                f"({s['precision_worst_run']:.2f}) | {s['base_drop']:+.2f} "
                f"({s['base_drop_worst_seed']:+.2f} / {s['base_drop_worst_run']:+.2f}) | "
                f"{s['far_drop']:+.1f} |"
            )
    return lines


def rounded(value: Any) -> Any:
    """Floats to 4 decimals, for a smaller JSON file."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rounded(results), default=str) + "\n")
    pairs = results["pairs"]
    methods = results["methods"]
    lines = [
        "# Head designs for personalization on frozen features (issue 16)",
        "",
        f"Produced by `{results['command']}` in {results['seconds']:.0f} s; the protocol is "
        "in the script's docstring.",
        "",
    ]
    for name, p in pairs.items():
        lines.append(
            f"- {name} pair: {', '.join(p['dishes'])}, base `{p['base']}` built without them; "
            f"base accuracy {p['base_accuracy']:.4f} on its {p['base_test_photos']} held-out "
            "full-size photos (1 photo = "
            f"{100 / p['base_test_photos']:.2f} pt)."
        )
    lines += [
        "",
        f"Settings chosen on the tuning pair only (mean base drop <= {args.max_drop} pt in every "
        "scenario, then the highest mean recall over the four scenarios), then frozen.",
        "Nearest-mean rules and ridge without a projection (dims=0) have no randomness: one "
        "run per draw, so their worst seed is their mean. Worst dish: the worse dish's mean.",
        "",
        "## Report pair, settings frozen",
        "",
    ]

    def pair_rows(pair: str) -> list[Any]:
        rows = []
        if "current" in methods:
            rows.append(("current", "library defaults", methods["current"][pair]["summary"]))
        for method in METHODS:
            m = methods[method.name][pair]
            rows.append((method.name, fmt_setting(m["setting"]), m["summary"]))
        return rows

    lines += table(pair_rows("report"))
    lines += ["", "## Tuning pair, chosen settings", ""]
    lines += table(pair_rows("tuning"))
    lines += [
        "",
        "## Tuning pair: each method's knob (recall vs base accuracy lost)",
        "",
        "Other settings at their chosen values. Means over both dishes, draws and seeds.",
        "",
    ]
    for method in METHODS:
        lines += knob_table(method.name, method.knob, methods[method.name])
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def knob_table(name: str, knob: str, result: dict[str, Any]) -> list[str]:
    """A method's tuning curve along its knob, its other settings at their chosen values."""
    fixed = {k: v for k, v in result["tuning"]["setting"].items() if k != knob}
    lines = [
        f"### {name} (knob: {knob}; fixed: {fmt_setting(fixed) or 'none'})",
        "",
        f"| {knob} | K=1 | K=5 | K=10 | new label | new-label precision "
        "| base drop K=1 / 5 / 10 / new (pt) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = [scenario_name(k, n) for k, n in SCENARIOS]
    for point in result["tuning_curve"]:
        setting = point["setting"]
        if any(setting[k] != v for k, v in fixed.items()):
            continue
        s = point["summary"]
        lines.append(
            f"| {setting[knob]} | "
            + " | ".join(f"{s[n]['recall']:.2f}" for n in names)
            + f" | {s[names[3]]['precision']:.2f} | "
            + " / ".join(f"{s[n]['base_drop']:+.2f}" for n in names)
            + " |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    main()
