"""What the frozen features allow: personalization from half of a dish's photos (issue 16).

Run from the repository root (needs ../shared/food and the leave-out bases of
scripts/eval_heads.py):

    .venv/bin/python scripts/eval_ceiling.py --tuning-base /tmp/lobaseB \\
        --report-base /tmp/lobase --out results/ceiling.md

Issue 16 asks for K=5 photos to move at least 0.95 of a dish's held-out photos, and a new
label from 10 photos to reach 0.80 recall, at most 1 point of the base's accuracy lost. This
asks how far from that a user would be who gave far more than 10 photos: every photo of
the teaching half of each left-out dish (about 150; eval_dishes.py's halves, the other half
held out), on the same bases, test photos and measures as scripts/eval_heads.py:

- `library`: the shipped retrain and memory through the public API, with every photo of
  the half (`--seeds` training seeds);
- `probe`: a linear probe fitted in closed form on every training photo of the base (the
  photos make-updatable trained it on, the left-out dishes excluded) and the half:
  features centred on the replay mean and L2-normalised, ridge to one-hot targets with
  each class the same total weight, the user's photos a class of their own mapped to the
  taught label, weighed 1x to 100x a base class: the whole trade-off curve, as issue 16's
  own probe table. The ridge penalty is chosen by 5-fold cross-validation on the base's
  training photos alone (no user photo, no test photo).

No other setting is chosen: the probe's curve is reported whole, the library at its
defaults. The probe sees more than a user's machine has (the base's training photos, not
its 400 replayed examples): it bounds what a linear decision on these features can do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import eval_heads as heads_eval  # type: ignore[import-not-found]  # noqa: E402
from eval_dishes import report_dishes  # type: ignore[import-not-found]  # noqa: E402
from eval_personalization import (  # type: ignore[import-not-found]  # noqa: E402
    halves,
    held_out,
    ours,
    photos,
)

WEIGHTS = (1, 3, 10, 30, 100)
LAMBDAS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # ridge, relative to the gram's mean diagonal


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_ridge(z: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float, classes: int) -> Any:
    """Ridge coefficients (D+1, classes) for unit rows z with a bias feature."""
    xb = np.concatenate([z, np.ones((len(z), 1), np.float32)], axis=1)
    gram = (xb * w[:, None]).T @ xb
    gram += lam * np.trace(gram) / len(gram) * np.eye(len(gram))
    return np.linalg.solve(gram, (xb * w[:, None]).T @ np.eye(classes)[y])


def ridge_says(z: np.ndarray, coef: np.ndarray) -> Any:
    return (np.concatenate([z, np.ones((len(z), 1), np.float32)], axis=1) @ coef).argmax(axis=1)


def base_training(pair: Any, food: Path) -> tuple[np.ndarray, np.ndarray]:
    """Bank rows and class ids of the base's training photos (full size, not held out,
    the pair's dishes excluded)."""
    left = {d for d, _, _ in pair.dishes}
    rows, ys = [], []
    for label in heads_eval.LABELS:
        for folder in sorted(p for p in (food / label).iterdir() if p.is_dir()):
            if folder.name in left:
                continue
            for photo in photos(folder):
                if not held_out(photo):
                    rows.append(pair.index[str(photo)])
                    ys.append(pair.labels.index(label))
    return np.array(rows), np.array(ys)


def choose_lambda(z: np.ndarray, y: np.ndarray) -> float:
    """The ridge penalty with the best 5-fold accuracy on the base's training photos."""
    folds = np.arange(len(y)) % 5
    np.random.default_rng(0).shuffle(folds)
    scores = {}
    for lam in LAMBDAS:
        right = 0
        for f in range(5):
            w = 1.0 / np.bincount(y[folds != f])[y[folds != f]]
            coef = fit_ridge(z[folds != f], y[folds != f], w, lam, int(y.max()) + 1)
            right += int(np.sum(ridge_says(z[folds == f], coef) == y[folds == f]))
        scores[lam] = right
    return max(LAMBDAS, key=lambda lam: (scores[lam], lam))


def probe(
    z: np.ndarray, base: tuple[np.ndarray, np.ndarray], user: np.ndarray, label_id: int,
    weight: float, lam: float,
) -> Any:  # fmt: skip
    """Class ids (the base's, or label_id for the user's group) the weighted ridge probe
    gives every row of z."""
    classes = int(base[1].max()) + 2  # the base's classes, then the user's group
    y = np.concatenate([base[1], np.full(len(user), classes - 1)])
    w = 1.0 / np.bincount(y, minlength=classes)[y]  # each class the same total weight...
    w[y == classes - 1] *= weight  # ...then the user's weighed `weight` times over
    coef = fit_ridge(z[np.concatenate([base[0], user])], y, w, lam, classes)
    said = ridge_says(z, coef)
    return np.where(said == classes - 1, label_id, said)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    heads_eval.add_pair_arguments(parser, "eval-ceiling")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "ceiling.md")
    args = parser.parse_args()
    args.draws, args.skip_current = 1, False
    started = time.perf_counter()
    far = report_dishes(args.food)
    rows: list[dict[str, Any]] = []
    lambdas: dict[str, dict[str, float]] = {}
    for pair in heads_eval.pairs_of(args):
        heads_eval.setup_pair(pair, args, far)
        centred = pair.bank - pair.bank[pair.replay_rows].mean(axis=0)
        z = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
        base = base_training(pair, args.food)
        lam = choose_lambda(z[base[0]], base[1])
        alone = ridge_says(z, fit_ridge(z[base[0]], base[1], 1.0 / np.bincount(base[1])[base[1]],
                                        lam, len(pair.labels)))  # fmt: skip
        truth = pair.base_truth
        lambdas[pair.name] = {
            "ridge penalty": lam,
            "probe alone, base accuracy": round(float(np.mean(alone[pair.base_rows] == truth)), 4),
            "base head": round(float(np.mean(pair.base_pred[pair.base_rows] == truth)), 4),
        }
        for d in pair.draws:
            if d["k"] != 10:
                continue  # one scenario per dish and label kind: relabel, new label
            pool, _ = halves(photos(next(f for n, f, _ in pair.dishes if n == d["dish"])))
            label = d["dish"] if d["new"] else d["label"]
            # A new label is the user's group itself; a relabel maps it to the taught label.
            label_id = len(pair.labels) if d["new"] else pair.labels.index(label)
            common = {"pair": pair.name, "dish": d["dish"], "new": d["new"], "photos": len(pool)}
            for seed in range(args.seeds):
                model = ours(pair.seeded[seed], label, pool, None)
                said = model.predict(pair.base, pair.bank)
                ids = np.array([model.labels.index(s) for s in said])
                ids = np.where(ids == model.labels.index(label), label_id, ids)
                m = heads_eval.measure(pair, d, ids[d["held_rows"]], ids[pair.base_rows],
                                       ids[pair.far_rows], label_id)  # fmt: skip
                rows.append({**common, "method": "library", "seed": seed, **m})
            user = d["pool_rows"]
            for weight in WEIGHTS:
                ids = probe(z, base, user, label_id, weight, lam)
                m = heads_eval.measure(pair, d, ids[d["held_rows"]], ids[pair.base_rows],
                                       ids[pair.far_rows], label_id)  # fmt: skip
                rows.append({**common, "method": f"probe {weight}x", "seed": 0, **m})
            print(f"[{pair.name}] {d['dish']} new={d['new']}: {len(pool)} photos", flush=True)
    write(args, rows, lambdas, time.perf_counter() - started)


def write(
    args: argparse.Namespace, rows: list[dict[str, Any]], lambdas: dict[str, Any], seconds: float
) -> None:
    lines = [
        "# What the frozen features allow: half of a dish's photos taught (issue 16)",
        "",
        f"Produced by `python scripts/eval_ceiling.py --tuning-base {args.tuning_base} "
        f"--report-base {args.report_base} --seeds {args.seeds} --out {args.out}` in "
        f"{seconds:.0f} s; the protocol is in the script's docstring. Each row: one dish, "
        "every photo of its teaching half; library rows are the mean over seeds (worst seed "
        "in brackets). Base drop is against the base head; the probe's ridge penalty "
        "(chosen by cross-validation on the base's training photos) and its own accuracy "
        f"without the user's photos: {json.dumps(lambdas)}.",
        "",
        "| pair | dish | scenario | photos | method | recall | precision | base drop (pt) | "
        "far drop (pt) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]

    def order(k: tuple[str, str, bool, str]) -> tuple[bool, str, bool, int]:
        weight = 0 if k[3] == "library" else int(k[3].split()[1][:-1])
        return (k[0] != "tuning", k[1], k[2], weight)

    keys = sorted({(r["pair"], r["dish"], r["new"], r["method"]) for r in rows}, key=order)
    for key in keys:
        cell = [r for r in rows if (r["pair"], r["dish"], r["new"], r["method"]) == key]
        recall = [r["recall"] for r in cell]
        base = [r["base_drop"] for r in cell]
        worst = f" ({min(recall):.2f})" if len(cell) > 1 else ""
        worst_drop = f" ({max(base):+.2f})" if len(cell) > 1 else ""
        lines.append(
            f"| {key[0]} | {key[1]} | {'new label' if key[2] else 'relabel'} | "
            f"{cell[0]['photos']} | {key[3]} | {np.mean(recall):.2f}{worst} | "
            f"{np.mean([r['precision'] for r in cell]):.2f} | {np.mean(base):+.2f}{worst_drop} | "
            f"{np.mean([r['far_drop'] for r in cell]):+.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
