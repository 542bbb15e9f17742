"""A base that knows more lunches: which recipe for the base's head, chosen by cross-validation.

Issue 16, item 3. The shipped base's head (one linear layer on the frozen EfficientNet-Lite0)
is trained by `make-updatable --examples` on the 7 full-size dishes only. This script asks
which recipe with the 64 px dishes of ../shared/food/lowres64 does best, without ever touching
the photos it reports on::

    .venv/bin/python scripts/eval_base.py featurize   # once: every photo through the frozen part
    .venv/bin/python scripts/eval_base.py cv          # settings scored by cross-validation
    .venv/bin/python scripts/eval_base.py report --setting NAME   # once, the setting frozen

Protocol (results/base-broader.md):

- Report sets, never trained on and never used to choose: the 64 px dishes of
  `build_base_model.left_out()` ("never trained on"), the photos held out by content hash
  (`int(sha256[:8], 16) % 5 == 0`) of the full-size dishes and of the other 64 px dishes.
- Cross-validation uses only the rest (the "training pool"): the 64 px training dishes are
  split into FOLDS groups (by the sha256 of their names, within each label); fold k trains
  without group k's dishes and scores on them ("unseen" proxy), and also leaves out the
  photos with `int(sha256[8:16], 16) % FOLDS == k` of the full-size and other 64 px dishes,
  scored as the "full" and "seen 64 px" proxies.
- The criterion, fixed before any run: the worst margin over the three targets,
  min(unseen - 0.85, seen - 0.85, full - 0.97), on the photos pooled over folds.

Heads are fitted with the project's own numpy trainer (`numpy_trainer.train_linear`: the
same steps as make-updatable's ORT training) from make-updatable's class-mean start, so a
setting here is a setting `scripts/build_base_model.py` can build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

FOOD = REPO.parent / "shared" / "food"
WORK = Path("/tmp/base64-work")
FEATURES = "features.npz"
LABELS = ("healthy", "fast_food")
FOLDS = 4
SUFFIXES = {".jpg", ".jpeg", ".png"}
TARGETS = {"unseen64": 0.85, "seen64": 0.85, "full": 0.97}


def held_out(path: Path) -> bool:
    return int(hashlib.sha256(path.read_bytes()).hexdigest()[:8], 16) % 5 == 0


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def featurize(food: Path, work: Path) -> None:
    """Every photo's head input (the first view, what predict computes), through the shipped
    base's frozen part (the stock backbone's, unchanged), with the shipped head's weights."""
    from build_base_model import downscale  # type: ignore[import-not-found]

    from healthyluncher.bases import UpdatableOptions, make_updatable
    from healthyluncher.embedder import Embedder
    from healthyluncher.records import BUNDLED_REPLAY, bundled_model, load_base
    from healthyluncher.store import ModelStore
    from healthyluncher.training import linear_head, start_params

    rows: list[tuple[Path, str, str, str]] = []  # path, label, dish, kind
    for label in LABELS:
        for dish in sorted(p for p in (food / label).iterdir() if p.is_dir()):
            rows += [(p, label, dish.name, "full") for p in photos(dish)]
        for dish in sorted(p for p in (food / "lowres64" / label).iterdir() if p.is_dir()):
            rows += [(p, label, dish.name, "low") for p in photos(dish)]
    rows += [(p, "fast_food", "pancakes", "pancakes") for p in photos(food / "personal")]
    # 64 px copies of every full-size photo (held-out ones too: their copies are never
    # trained on, see pool()), written outside the repository.
    down = work / "down64"
    for path, label, dish, kind in list(rows):
        if kind != "full":
            continue
        target = down / label / dish / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(downscale(path.read_bytes()))  # the build's own copies
        rows.append((target, label, dish, "down"))

    store = ModelStore(work / "store")
    shipped = bundled_model()
    assert shipped is not None
    make_updatable(
        store, shipped, UpdatableOptions(replay=shipped.with_name(BUNDLED_REPLAY), force=True)
    )
    base = load_base(store, store.read_state())
    started = time.perf_counter()
    embedded, failures, ran = Embedder(store, base, 1).embed([r[0] for r in rows])
    if failures:
        raise SystemExit(f"cannot read {failures[0].path}: {failures[0].error}")
    print(
        f"embedded {len(rows)} photos ({ran} through the frozen part) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    spec = linear_head(base.meta, base.path)
    assert spec is not None and spec.trans_b and spec.alpha == 1.0 and spec.bias is not None
    params = start_params(base.path, base.meta, spec)
    # Which original photo a row is (a 64 px copy shares its original's split).
    originals = {}
    for path, _, _, kind in rows:
        if kind != "down":
            originals[(path.parent.name, path.name)] = hashlib.sha256(path.read_bytes()).hexdigest()
    digests = [originals[(p.parent.name, p.name)] for p, *_ in rows]
    np.savez(
        work / FEATURES,
        inputs=np.stack([views[0] for _, _, views in embedded]).astype(np.float32),
        label=np.array([LABELS.index(r[1]) for r in rows]),
        dish=np.array([r[2] for r in rows]),
        kind=np.array([r[3] for r in rows]),
        digest=np.array(digests),
        path=np.array([str(r[0]) for r in rows]),
        shipped_weight=params[spec.weight].reshape(len(LABELS), -1),
        shipped_bias=params[spec.bias].reshape(-1),
    )


class Data:
    """The cached features with each photo's split."""

    def __init__(self, path: Path, food: Path) -> None:
        from build_base_model import left_out  # type: ignore[import-not-found]

        with np.load(path, allow_pickle=False) as z:
            self.x = z["inputs"]
            self.y = z["label"]
            self.dish = z["dish"]
            self.kind = z["kind"]
            digest = z["digest"]
            paths = z["path"]
            self.shipped = (z["shipped_weight"], z["shipped_bias"])
        self.held = np.array([int(d[:8], 16) % 5 == 0 for d in digest])
        self.inner = np.array([int(d[8:16], 16) % FOLDS for d in digest])
        # A 64 px copy is a photo of its own to make-updatable, which holds it out by its
        # own hash: never trained on, as in the build.
        self.copy_held = np.zeros(len(digest), bool)
        for i in np.flatnonzero(self.kind == "down"):
            self.copy_held[i] = held_out(Path(str(paths[i])))
        skip = left_out(food)
        self.left_out = (self.kind == "low") & np.isin(self.dish, sorted(skip))
        low_dishes = sorted(set(self.dish[(self.kind == "low") & ~self.left_out].tolist()))
        # Fold groups: each label's training 64 px dishes by the sha256 of their names,
        # dealt round-robin.
        self.group: dict[str, int] = {}
        for c in range(len(LABELS)):
            names = sorted(
                {d for d in low_dishes if self.y[(self.dish == d) & (self.kind == "low")][0] == c},
                key=lambda d: hashlib.sha256(d.encode()).hexdigest(),
            )
            for i, name in enumerate(names):
                self.group[name] = (i + c) % FOLDS
        self.train_low_dishes = low_dishes

    def pool(self) -> np.ndarray:
        """Photos cross-validation may use: no report photo, no copy of one."""
        return ~self.held & ~self.left_out & (self.kind != "pancakes")


def accuracy(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    logits = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    return int((logits.argmax(axis=1) == y).sum()), len(y)


def cross_validate(data: Data, name: str, seed: int = 0) -> dict[str, Any]:
    """One setting over the FOLDS folds: photos correct and scored per proxy, pooled."""
    from base_recipes import SETTINGS, fit  # type: ignore[import-not-found]

    counts = {k: [0, 0] for k in TARGETS}
    per_dish: dict[str, list[int]] = {}
    pool = data.pool()
    for k in range(FOLDS):
        unseen_dishes = [d for d, g in data.group.items() if g == k]
        unseen = pool & (data.kind == "low") & np.isin(data.dish, unseen_dishes)
        inner = pool & (data.inner == k) & ~unseen
        train = pool & ~unseen & ~inner
        weight, bias = fit(SETTINGS[name], data, train, seed)
        for key, mask in (
            ("unseen64", unseen),
            ("seen64", inner & (data.kind == "low")),
            ("full", inner & (data.kind == "full")),
        ):
            right, n = accuracy(weight, bias, data.x[mask], data.y[mask])
            counts[key][0] += right
            counts[key][1] += n
        for d in unseen_dishes:
            m = unseen & (data.dish == d)
            right, n = accuracy(weight, bias, data.x[m], data.y[m])
            per_dish[d] = [right, n]
    scores = {k: c[0] / c[1] for k, c in counts.items()}
    margin = min(scores[k] - TARGETS[k] for k in TARGETS)
    return {
        "setting": name,
        "seed": seed,
        **scores,
        "margin": margin,
        "photos": {k: c[1] for k, c in counts.items()},
        "unseen_per_dish": per_dish,
    }


def run_cv(data: Data, args: argparse.Namespace) -> None:
    from base_recipes import SETTINGS  # type: ignore[import-not-found]

    out = args.work / "cv.json"
    done = json.loads(out.read_text()) if out.exists() else []
    names = [n for n in args.settings.split(",") if n] or list(SETTINGS)
    print("fold groups:", json.dumps(data.group))
    for name in names:
        for seed in range(args.seeds):
            if any(r["setting"] == name and r["seed"] == seed for r in done):
                continue
            started = time.perf_counter()
            row = cross_validate(data, name, seed)
            row["seconds"] = round(time.perf_counter() - started, 1)
            done.append(row)
            out.write_text(json.dumps(done, indent=1) + "\n")
            print(
                f"{name:24s} seed {seed}  unseen {row['unseen64']:.3f}  seen "
                f"{row['seen64']:.3f}  full {row['full']:.3f}  margin {row['margin']:+.3f}"
                f"  ({row['seconds']} s)",
                flush=True,
            )


def report_sets(data: Data) -> dict[str, np.ndarray]:
    """The report's photo sets: (set name, dish) -> mask."""
    sets = {}
    for d in sorted(set(data.dish.tolist())):
        full = data.held & (data.kind == "full") & (data.dish == d)
        if full.any():
            sets[f"full|{d}"] = full
        low = (data.kind == "low") & (data.dish == d)
        if (low & data.left_out).any():
            sets[f"unseen64|{d}"] = low
        elif low.any():
            sets[f"seen64|{d}"] = low & data.held
        down = data.held & (data.kind == "down") & (data.dish == d)
        if down.any():  # a diagnostic: does blur alone move a full-size dish's label?
            sets[f"down64|{d}"] = down
    sets["pancakes|pancakes"] = data.kind == "pancakes"
    return sets


def evaluate_head(data: Data, weight: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    per: dict[str, list[int]] = {}
    for key, mask in report_sets(data).items():
        per[key] = list(accuracy(weight, bias, data.x[mask], data.y[mask]))
    overall = {}
    for kind in ("full", "seen64", "unseen64", "down64", "pancakes"):
        right = sum(v[0] for k, v in per.items() if k.startswith(kind + "|"))
        n = sum(v[1] for k, v in per.items() if k.startswith(kind + "|"))
        overall[kind] = [right, n, right / n]
    return {"overall": overall, "per_dish": per}


def run_report(data: Data, args: argparse.Namespace) -> None:
    """The chosen setting once, trained on the whole training pool, against the shipped
    head and the earlier union recipe; every seed's numbers (seed 0 is the build's)."""
    from base_recipes import fit, frozen_setting  # type: ignore[import-not-found]

    assert args.setting, "report needs --setting (the one cross-validation chose)"
    result: dict[str, Any] = {"shipped head": evaluate_head(data, *data.shipped)}
    for name in ("union", args.setting):
        for seed in range(args.seeds):
            weight, bias = fit(frozen_setting(name), data, data.pool(), seed)
            result[f"{name} seed {seed}"] = evaluate_head(data, weight, bias)
    (args.work / f"report-{args.setting}.json").write_text(json.dumps(result, indent=1) + "\n")
    for key, row in result.items():
        o = row["overall"]
        print(f"{key:28s} " + "  ".join(f"{k} {v[2]:.4f} ({v[0]}/{v[1]})" for k, v in o.items()))


def render(args: argparse.Namespace, out: Path) -> None:
    """results/base-broader.json from the cross-validation, the report and the build."""
    cv = json.loads((args.work / "cv.json").read_text())
    by: dict[str, list[dict[str, Any]]] = {}
    for row in cv:
        by.setdefault(row["setting"], []).append(row)
    table = []
    for name, rows in by.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in (*TARGETS, "margin")}
        table.append(
            {
                "setting": name,
                "seeds": len(rows),
                **mean,
                "worst_margin": min(r["margin"] for r in rows),
            }
        )
    table.sort(key=lambda r: -r["margin"])
    report = json.loads((args.work / f"report-{args.setting}.json").read_text())
    build = Path("/tmp/base64-final/base-eval.json")
    result = {
        "fold_groups": Data(args.work / FEATURES, args.food).group,
        "cross_validation": table,
        "chosen": args.setting,
        "report_numpy": report,
        "build": json.loads(build.read_text()) if build.exists() else None,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("featurize", "cv", "report", "render"))
    parser.add_argument("--food", type=Path, default=FOOD)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--setting", help="report: the setting cross-validation chose")
    parser.add_argument("--settings", default="", help="cv: these settings only (comma-separated)")
    parser.add_argument("--seeds", type=int, default=1, help="sampling seeds per setting")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "featurize":
        featurize(args.food, args.work)
        return
    data = Data(args.work / FEATURES, args.food)
    if args.step == "render":
        render(args, REPO / "results" / "base-broader.json")
    elif args.step == "cv":
        run_cv(data, args)
    else:
        run_report(data, args)


if __name__ == "__main__":
    main()
