"""Distribution calibration for the user's group, on eval_heads.py's draws (issue 16).

Run from the repository root (the same two leave-out bases as scripts/eval_heads.py):

    .venv/bin/python scripts/eval_heads_dc.py --tuning-base /tmp/lobase-w-tuning \\
        --report-base /tmp/lobase-w-report --food ../shared/food

The lever measured: "Free Lunch for Few-shot Learning: Distribution Calibration" (Yang, Liu,
Xu, ICLR 2021). The user's 1 to 10 photos do not describe how a dish's photos spread; the
base's data does describe how its dishes spread, so each user photo borrows the spread of
the base's dishes nearest to it, and the classifier trains on features sampled from that
calibrated distribution as well as on the real ones.

Protocol: scripts/eval_heads.py's, unchanged and imported from it: the same pairs, bases,
scenarios, draws (draw for draw), measures (recall, precision, base drop, far drop),
summaries (mean, worst seed, worst dish, worst run) and selection rule (per method, on the
tuning pair only: mean base drop <= `--max-drop` points in every scenario, then the
highest mean recall over the four scenarios; the report pair is run once with the setting
frozen). Every cell is `--draws` draws x `--seeds` seeds (the seed draws the synthetic
features); `current` (the library) is not rerun here: results/heads.md and
results/dishes-full-size.md have it on the same draws and seeds.

Methods, all on the base's frozen head inputs and its shipped replay set (400 photos,
each also as a 64 px thumbnail: the only base data a user's machine has):

- **Tukey's power transform** x -> x^`tukey` (the head inputs are averages of ReLU6
  outputs, so never negative; clipped at 0 all the same). tukey=1 is no transform.
- **Pseudo-classes.** The replay set names no dishes, so within each label its transformed
  rows are clustered by k-means (`clusters` per label; k-means++ from a fixed seed). Each
  pseudo-class has a mean and a covariance (kept as its centred rows: rank < its size).
- **Calibration** of each user photo x (the photo itself, not its augmented views): the
  `k` pseudo-classes whose means are nearest to x (Euclidean, any label), calibrated mean
  = the mean of their means and x, calibrated covariance = the mean of their covariances
  + `alpha` times the replay set's mean per-dimension variance (alpha is relative, so it
  means the same for every tukey). `samples` features per photo are drawn from that
  Gaussian (exactly, through the pseudo-classes' centred rows: no 1280 x 1280 matrix).
- **The classifier** is eval_heads.py's ridge head without a projection (dims=0, `lam`):
  transformed features centred on the replay mean and L2-normalised, one-hot targets over
  the replay rows (two base classes) and the user's group (its real rows, the library's
  augmented views, and the synthetic rows, each row the same weight), each class the same
  total weight, a bias feature. `dc-ridge` lets it decide every class; `dc-hybrid` uses it
  only to decide whether a photo is the user's group, the base head's answer otherwise.
  `tukey-ridge` / `tukey-hybrid` are the same with samples=0 (no calibration): the control
  that says what the synthetic features add. With tukey=1 they are eval_heads.py's
  ridge / hybrid-ridge at dims=0 (checked: the same scores to 1e-6).
- **`rp-tukey-ridge`, `dc-ridge-rp`, `dc-ridge-rp-full`**: the same with RanPAC's fixed
  random ReLU projection to `dims`=4096 (eval_heads.py's ridge as results/heads.md chose
  it, lam=0.001; dual form): the control (samples=0), a 4-setting calibration grid and the
  full one. They were added after the first run (see results/heads-dc.md). With tukey=1
  the control is eval_heads.py's ridge at dims=4096 (checked: to 1.5e-6, float32 here).
- **`dc-gauss`** (the cheaper variant, a hybrid): the user's group is a Gaussian with
  the calibrated mean (the mean of its photos' calibrated means) and the borrowed
  covariance (the mean of the pseudo-classes' covariances the photos chose, shrunk by
  `alpha`); each pseudo-class is a Gaussian with its own covariance shrunk the same way.
  A photo joins the user's group when its log-density there, per dimension, beats its
  best pseudo-class's (plus the knob); the base head's answer stands otherwise.

Each method's knob is the bonus on the user group's score (one-hot units for the ridge
heads, log-density per dimension for dc-gauss), swept on the tuning pair as eval_heads.py
sweeps it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import eval_heads as eh  # type: ignore[import-not-found]  # noqa: E402
from eval_dishes import report_dishes  # type: ignore[import-not-found]  # noqa: E402

RIDGE_BONUS = eh.BONUS
GAUSS_BONUS = (-1.0, -0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------- features


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster ids of the rows of x (k-means++ then Lloyd's; an emptied cluster takes the
    row farthest from its centre)."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    c = np.array(centres)
    ids = np.zeros(len(x), np.int64)
    for _ in range(iters):
        d2 = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
        new = d2.argmin(axis=1)
        for j in range(k):
            if not np.any(new == j):
                far = int(d2[np.arange(len(x)), new].argmax())
                new[far] = j
        if np.array_equal(new, ids):
            break
        ids = new
        c = np.stack([x[ids == j].mean(axis=0) for j in range(k)])
    return ids


@dataclass
class Pseudo:
    """The pseudo-classes of one (tukey, clusters): means, centred rows / sqrt(n - 1)."""

    means: np.ndarray  # (C, D)
    factors: list[np.ndarray]  # C arrays (n_c, D): F^T F is the covariance
    labels: np.ndarray  # (C,) the label of each


class DCSpace:
    """One pair's transformed features, per tukey, and its pseudo-classes."""

    def __init__(self, pair: eh.Pair) -> None:
        self.pair = pair
        self.base = eh.Space(pair)  # eval_heads.py's rows and columns
        bank = pair.bank.astype(np.float64)
        if float(bank.min()) < 0:
            print(f"[{pair.name}] head inputs reach {bank.min():.3g} < 0: clipped", flush=True)
        self.nonneg = np.maximum(bank, 0.0)
        self.min_value = float(bank.min())
        self._t: dict[float, dict[str, Any]] = {}
        self._pseudo: dict[tuple[float, int], Pseudo] = {}
        self.rp: dict[tuple[float, int, int], dict[str, Any]] = {}

    def tukey(self, lam: float) -> dict[str, Any]:
        """Transformed bank, its replay mean, replay per-dimension variance, the unit
        centred rows of eval_heads.py's Space.rows, and the replay part of the Gram."""
        if lam not in self._t:
            t = self.nonneg**lam
            pair = self.pair
            mean = t[pair.replay_rows].mean(axis=0)
            z = eh.unit(t - mean)
            za = np.concatenate([z, np.ones((len(z), 1))], axis=1)
            gram = np.zeros((za.shape[1], za.shape[1]))
            cross = np.zeros((za.shape[1], len(pair.labels) + 1))
            for c in range(len(pair.labels)):
                rows = za[pair.replay_rows[pair.replay_y == c]]
                gram += rows.T @ rows / len(rows)
                cross[:, c] = rows.sum(axis=0) / len(rows)
            self._t[lam] = {
                "t": t,
                "mean": mean,
                "var": float(t[pair.replay_rows].var(axis=0).mean()),
                "za": za,
                "gram": gram,
                "cross": cross,
                "scale": float(np.mean((za[pair.replay_rows] ** 2).sum(axis=1))),
            }
        return self._t[lam]

    def pseudo(self, lam: float, clusters: int) -> Pseudo:
        key = (lam, clusters)
        if key not in self._pseudo:
            t = self.tukey(lam)["t"]
            pair = self.pair
            means, factors, labels = [], [], []
            for c in range(len(pair.labels)):
                x = t[pair.replay_rows[pair.replay_y == c]]
                ids = kmeans(x, clusters, seed=c)
                for j in range(ids.max() + 1):
                    part = x[ids == j]
                    means.append(part.mean(axis=0))
                    centred = part - part.mean(axis=0)
                    factors.append(centred / np.sqrt(max(1, len(part) - 1)))
                    labels.append(c)
            self._pseudo[key] = Pseudo(np.stack(means), factors, np.array(labels))
        return self._pseudo[key]


def calibrate(space: DCSpace, s: dict[str, Any], x: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The calibrated mean of one transformed photo and its k nearest pseudo-classes."""
    ps = space.pseudo(s["tukey"], s["clusters"])
    near = np.argsort(((ps.means - x) ** 2).sum(axis=1))[: s["k"]]
    return (ps.means[near].sum(axis=0) + x) / (len(near) + 1), [int(i) for i in near]


def synthetic(space: DCSpace, d: dict[str, Any], seed: int, s: dict[str, Any]) -> np.ndarray:
    """`samples` features per user photo from its calibrated Gaussian (transformed space)."""
    if not s["samples"]:
        return np.zeros((0, space.pair.bank.shape[1]))
    tk = space.tukey(s["tukey"])
    ps = space.pseudo(s["tukey"], s["clusters"])
    rng = np.random.default_rng([seed, d["k"], int(d["new"]), d["draw"], sum(map(ord, d["dish"]))])
    alpha = s["alpha"] * tk["var"]
    out = []
    for row in d["rows"]:
        mu, near = calibrate(space, s, tk["t"][row])
        n = s["samples"]
        x = mu.astype(np.float32) + np.float32(np.sqrt(alpha)) * rng.standard_normal(
            (n, len(mu)), dtype=np.float32
        )
        for j in near:
            f = ps.factors[j].astype(np.float32)
            x += rng.standard_normal((n, len(f)), dtype=np.float32) @ f / np.sqrt(len(near))
        out.append(x)
    return np.concatenate(out)


# ----------------------------------------------------------------------------- scores


def ridge_dc_scores(space: DCSpace, d: dict[str, Any], seed: int, s: dict[str, Any],
                    rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """Scores of the ridge head over replay + the user's real and synthetic rows:
    (len(rows), classes + 1), the user group last (eval_heads.py's ridge_scores, primal)."""
    pair = space.pair
    classes = len(pair.labels)
    tk = space.tukey(s["tukey"])
    real = tk["za"][eh.user_rows(d, s)]
    syn = synthetic(space, d, seed, s)
    count = len(real) + len(syn)
    gram = tk["gram"] + real.T @ real / count
    cross = tk["cross"].copy()
    cross[:, classes] = real.sum(axis=0) / count
    if len(syn):
        z = eh.unit(syn - tk["mean"].astype(np.float32))
        z = np.concatenate([z, np.ones((len(z), 1), np.float32)], axis=1)
        gram += (z.T @ z).astype(np.float64) / count
        cross[:, classes] += z.sum(axis=0, dtype=np.float64) / count
    gram[np.diag_indices_from(gram)] += s["lam"] * tk["scale"]
    w = np.linalg.solve(gram, cross)
    return tk["za"][rows] @ w  # type: ignore[no-any-return]


def projection(space: DCSpace, lam: float, seed: int, dims: int) -> dict[str, Any]:
    """RanPAC's fixed random ReLU projection (eval_heads.py's: the same generator per seed)
    of the transformed, centred unit rows of Space.rows, with the replay rows' kernels."""
    key = (lam, seed, dims)
    if key not in space.rp:
        pair = space.pair
        z = space.tukey(lam)["za"][:, :-1]
        proj = np.random.default_rng(1000 + seed).standard_normal((z.shape[1], dims))
        proj = proj.astype(np.float32)
        rows = space.base.rows
        phi = np.maximum(z[rows].astype(np.float32) @ proj, 0) / np.float32(np.sqrt(dims))
        rep = phi[space.base.row_at[pair.replay_rows]]
        fixed = phi[space.base.row_at[space.base.fixed]]
        space.rp[key] = {
            "proj": proj,
            "phi": phi,
            "rep": rep,
            "fixed": fixed,
            "k_rr": rep @ rep.T + 1.0,
            "k_fr": fixed @ rep.T + 1.0,
        }
    return space.rp[key]


def ridge_rp_scores(space: DCSpace, d: dict[str, Any], seed: int, s: dict[str, Any],
                    rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """eval_heads.py's ridge_scores with dims > 0 (dual form), on transformed features,
    the user group's rows being its real views and its synthetic rows."""
    pair = space.pair
    classes = len(pair.labels)
    tk = space.tukey(s["tukey"])
    p = projection(space, s["tukey"], seed, s["dims"])
    user = p["phi"][space.base.row_at[eh.user_rows(d, s)]]
    syn = synthetic(space, d, seed, s)
    if len(syn):
        z = eh.unit(syn - tk["mean"].astype(np.float32)).astype(np.float32)
        phi_syn = np.maximum(z @ p["proj"], 0) / np.float32(np.sqrt(s["dims"]))
        user = np.concatenate([user, phi_syn])
    rep = p["rep"]
    k_ru = rep @ user.T + 1.0
    k_tt = np.block([[p["k_rr"], k_ru], [k_ru.T, user @ user.T + 1.0]]).astype(np.float64)
    y = np.concatenate([pair.replay_y, np.full(len(user), classes)])
    w = np.ones(len(y))
    for c in range(classes + 1):
        w[y == c] = 1.0 / np.sum(y == c)
    sw = np.sqrt(w)
    targets = np.eye(classes + 1)[y] * sw[:, None]
    scale = float(np.mean(np.diag(p["k_rr"])))
    alpha = np.linalg.solve(sw[:, None] * k_tt * sw[None, :] + s["lam"] * scale * np.eye(len(y)),
                            targets)  # fmt: skip
    held = rows[: len(rows) - len(space.base.fixed)]
    assert np.array_equal(rows[len(held) :], space.base.fixed)
    h = p["phi"][space.base.row_at[held]]
    k_test = np.concatenate(
        [
            np.concatenate([h @ rep.T + 1.0, h @ user.T + 1.0], axis=1),
            np.concatenate([p["k_fr"], p["fixed"] @ user.T + 1.0], axis=1),
        ]
    ).astype(np.float64)
    return k_test @ (sw[:, None] * alpha)  # type: ignore[no-any-return]


def woodbury_terms(f: np.ndarray, alpha: float, v: np.ndarray) -> tuple[np.ndarray, float]:
    """Squared Mahalanobis distances of the rows of v under F^T F + alpha I, and its log
    determinant (through the small n x n matrix)."""
    small = f @ f.T + alpha * np.eye(len(f))
    proj = v @ f.T  # (m, n)
    sol = np.linalg.solve(small, proj.T).T
    d2 = ((v**2).sum(axis=1) - (proj * sol).sum(axis=1)) / alpha
    eig = np.linalg.eigvalsh(f @ f.T)
    logdet = float(np.sum(np.log(np.maximum(eig, 0) + alpha))) + (v.shape[1] - len(f)) * np.log(
        alpha
    )
    return d2, logdet


class GaussCache:
    """Per pair and (tukey, clusters, alpha): every pseudo-class's log-density per
    dimension at every row of eval_heads.py's Space.rows, max over them."""

    def __init__(self) -> None:
        self.best: dict[tuple[str, float, int, float], np.ndarray] = {}


GAUSS = GaussCache()


def gauss_scores(space: DCSpace, d: dict[str, Any], seed: int, s: dict[str, Any],
                 rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """(len(rows), classes + 1): each base label's best pseudo-class log-density per
    dimension, and the user group's (calibrated mean, borrowed shrunk covariance) last."""
    pair = space.pair
    classes = len(pair.labels)
    tk = space.tukey(s["tukey"])
    ps = space.pseudo(s["tukey"], s["clusters"])
    alpha = s["alpha"] * tk["var"]
    dim = tk["t"].shape[1]
    key = (pair.name, s["tukey"], s["clusters"], s["alpha"])
    all_rows = space.base.rows
    if key not in GAUSS.best:
        x = tk["t"][all_rows]
        best = np.full((len(all_rows), classes), -np.inf)
        for j, f in enumerate(ps.factors):
            d2, logdet = woodbury_terms(f, alpha, x - ps.means[j])
            ll = -0.5 * (d2 + logdet) / dim
            c = ps.labels[j]
            best[:, c] = np.maximum(best[:, c], ll)
        GAUSS.best[key] = best
    base = GAUSS.best[key][space.base.row_at[rows]]
    mus, near = [], []
    for row in d["rows"]:
        mu, n = calibrate(space, s, tk["t"][row])
        mus.append(mu)
        near.extend(n)
    mu = np.mean(mus, axis=0)
    chosen = sorted(set(near))
    f = np.concatenate([ps.factors[j] for j in chosen]) / np.sqrt(len(chosen))
    d2, logdet = woodbury_terms(f, alpha, tk["t"][rows] - mu)
    user = -0.5 * (d2 + logdet) / dim
    return np.concatenate([base, user[:, None]], axis=1)


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class DCMethod:
    name: str
    scores: Any
    combine: bool
    grid: dict[str, tuple[Any, ...]]
    bonuses: tuple[float, ...]
    knob: str = "bonus"

    def settings(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, v, strict=True)) for v in itertools.product(*self.grid.values())]

    def seeded(self, setting: dict[str, Any]) -> bool:
        return bool(setting.get("samples") or setting.get("dims"))


DC_GRID: dict[str, tuple[Any, ...]] = {
    "views": ("budget",),
    "lam": (0.1,),
    "tukey": (0.5, 1.0),
    "clusters": (8, 32),
    "k": (2, 5),
    "alpha": (0.1, 0.5),
    "samples": (25, 100),
}
CONTROL_GRID: dict[str, tuple[Any, ...]] = {
    "views": ("budget",),
    "lam": (0.1,),
    "tukey": (0.5, 1.0),
    "samples": (0,),
}
GAUSS_GRID: dict[str, tuple[Any, ...]] = {
    "tukey": (0.5, 1.0),
    "clusters": (8, 32),
    "k": (2, 5),
    "alpha": (0.1, 0.5),
}
# With RanPAC's projection (eval_heads.py's ridge as results/heads.md chose it: dims=4096,
# lam=0.001); a smaller calibration grid, added after the run above (see the results file).
RP_GRID: dict[str, tuple[Any, ...]] = {
    "views": ("budget",),
    "dims": (4096,),
    "lam": (0.001,),
    "tukey": (0.5, 1.0),
    "clusters": (8,),
    "k": (2,),
    "alpha": (0.1, 0.5),
    "samples": (25,),
}
RP_CONTROL_GRID: dict[str, tuple[Any, ...]] = {
    "views": ("budget",),
    "dims": (4096,),
    "lam": (0.001,),
    "tukey": (0.5, 1.0),
    "samples": (0,),
}
METHODS = (
    DCMethod("tukey-ridge", ridge_dc_scores, False, CONTROL_GRID, RIDGE_BONUS),
    DCMethod("tukey-hybrid", ridge_dc_scores, True, CONTROL_GRID, RIDGE_BONUS),
    DCMethod("dc-gauss", gauss_scores, True, GAUSS_GRID, GAUSS_BONUS),
    DCMethod("dc-ridge", ridge_dc_scores, False, DC_GRID, RIDGE_BONUS),
    DCMethod("dc-hybrid", ridge_dc_scores, True, DC_GRID, RIDGE_BONUS),
    DCMethod("rp-tukey-ridge", ridge_rp_scores, False, RP_CONTROL_GRID, RIDGE_BONUS),
    DCMethod("dc-ridge-rp", ridge_rp_scores, False, RP_GRID, RIDGE_BONUS),
    DCMethod(
        "dc-ridge-rp-full",
        ridge_rp_scores,
        False,
        {**DC_GRID, "dims": (4096,), "lam": (0.001,)},
        RIDGE_BONUS,
    ),
)


def check_control(space: DCSpace) -> float:
    """tukey=1, samples=0 is eval_heads.py's ridge at dims=0: the largest score difference
    over the first draws."""
    worst = 0.0
    s = {"views": "budget", "lam": 0.1, "tukey": 1.0, "samples": 0}
    for d in space.pair.draws[:: max(1, len(space.pair.draws) // 4)]:
        rows = np.concatenate([d["held_rows"], space.pair.base_rows, space.pair.far_rows])
        ours = ridge_dc_scores(space, d, 0, s, rows)
        theirs = eh.ridge_scores(space.base, 0, 0, 0.1, 1.0, eh.user_rows(d, s), rows,
                                 len(space.pair.labels))  # fmt: skip
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def check_control_rp(space: DCSpace) -> float:
    """tukey=1, samples=0 with the projection is eval_heads.py's ridge at dims=4096 (float32
    features here): the largest score difference over a few draws."""
    worst = 0.0
    s = {"views": "budget", "lam": 0.001, "dims": 4096, "tukey": 1.0, "samples": 0}
    for d in space.pair.draws[:: max(1, len(space.pair.draws) // 3)]:
        rows = np.concatenate([d["held_rows"], space.pair.base_rows, space.pair.far_rows])
        ours = ridge_rp_scores(space, d, 0, s, rows)
        theirs = eh.ridge_scores(space.base, 0, 4096, 0.001, 1.0, eh.user_rows(d, s), rows,
                                 len(space.pair.labels))  # fmt: skip
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    eh.add_pair_arguments(parser, "eval-heads-dc-work")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-drop", type=float, default=0.5, help="selection rule, points")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "heads-dc.md")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS))
    parser.add_argument(
        "--gauss-bonus",
        help="dc-gauss's knob values, comma-separated (default: "
        + ",".join(map(str, GAUSS_BONUS))
        + ")",
    )
    args = parser.parse_args()
    args.skip_current = True
    started = time.perf_counter()
    far = report_dishes(args.food)
    pairs = eh.pairs_of(args)
    wanted = args.methods.split(",")
    methods = [m for m in METHODS if m.name in wanted]
    if args.gauss_bonus:
        values = tuple(float(v) for v in args.gauss_bonus.split(","))
        methods = [replace(m, bonuses=values) if m.name == "dc-gauss" else m for m in methods]
    results: dict[str, Any] = {"pairs": {}, "methods": {}, "checks": {}}
    spaces = {}
    for pair in pairs:
        eh.setup_pair(pair, args, far)
        spaces[pair.name] = DCSpace(pair)
        results["pairs"][pair.name] = {
            "base": str(pair.base_dir),
            "dishes": [d for d, _, _ in pair.dishes],
            "base_test_photos": len(pair.base_rows),
            "base_accuracy": float(np.mean(pair.base_pred[pair.base_rows] == pair.base_truth)),
            "head_input_min": spaces[pair.name].min_value,
            "replay_rows": len(pair.replay_rows),
        }
        diff = check_control(spaces[pair.name])
        results["checks"][pair.name] = {"control_vs_eval_heads_ridge_max_abs": diff}
        print(f"[{pair.name}] tukey=1, samples=0 against eval_heads ridge: {diff:.2e}", flush=True)
        if any(m.scores is ridge_rp_scores for m in methods):
            rp = check_control_rp(spaces[pair.name])
            results["checks"][pair.name]["rp_control_vs_eval_heads_ridge"] = rp
            print(
                f"[{pair.name}] rp control against eval_heads ridge dims=4096: {rp:.2e}", flush=True
            )
    # Methods sharing a grid and scores run together.
    groups: dict[tuple[Any, ...], list[DCMethod]] = {}
    for m in methods:
        groups.setdefault((m.scores, tuple(m.grid.items())), []).append(m)
    for group in groups.values():
        t = time.perf_counter()
        curves: dict[str, list[dict[str, Any]]] = {m.name: [] for m in group}
        bonuses = {m.name: m.bonuses for m in group}
        for setting in group[0].settings():
            tt = time.perf_counter()
            by = eh.run_methods(spaces["tuning"], group, setting, args.seeds, bonuses)
            for m in group:
                for bonus, runs in by[m.name].items():
                    curves[m.name].append(
                        {"setting": {**setting, "bonus": bonus}, "summary": eh.summarize(runs)}
                    )
            print(f"  {setting}: {time.perf_counter() - tt:.0f} s", flush=True)
        for m in group:
            best = eh.choose(curves[m.name], args.max_drop)
            fixed = {k: v for k, v in best["setting"].items() if k != "bonus"}
            bonus = best["setting"]["bonus"]
            runs = eh.run_methods(spaces["report"], [m], fixed, args.seeds, {m.name: (bonus,)})
            runs = runs[m.name][bonus]
            results["methods"][m.name] = {
                "knob": m.knob,
                "tuning_curve": [
                    {"setting": c["setting"], "summary": eh.slim(c["summary"])}
                    for c in curves[m.name]
                ],
                "tuning": best,
                "report": {
                    "setting": best["setting"],
                    "summary": eh.summarize(runs),
                    "runs": runs,
                },  # fmt: skip
            }
            print(f"{m.name}: {best['setting']}", flush=True)
        print(f"{[m.name for m in group]}: {time.perf_counter() - t:.0f} s", flush=True)
        results["seconds"] = time.perf_counter() - started
        results["command"] = command_line(args)
        write(args, results, methods)
    results["seconds"] = time.perf_counter() - started
    write(args, results, methods)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python scripts/eval_heads_dc.py", f"--tuning-base {args.tuning_base}",
             f"--report-base {args.report_base}", f"--food {args.food}"]  # fmt: skip
    parts += [f"--draws {args.draws}", f"--seeds {args.seeds}", f"--max-drop {args.max_drop}"]
    if args.methods != ",".join(m.name for m in METHODS):
        parts.append(f"--methods {args.methods}")
    if args.gauss_bonus:
        parts.append(f"--gauss-bonus={args.gauss_bonus}")
    return " ".join(parts)


def write(args: argparse.Namespace, results: dict[str, Any], methods: list[DCMethod]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(eh.rounded(results), default=str) + "\n")
    done = [m for m in methods if m.name in results["methods"]]
    lines = [
        "# Distribution calibration for the user's group (issue 16)",
        "",
        f"Produced by `{results['command']}` in {results['seconds']:.0f} s; the protocol is "
        "in the script's docstring (eval_heads.py's, imported from it).",
        "",
    ]
    for name, p in results["pairs"].items():
        lines.append(
            f"- {name} pair: {', '.join(p['dishes'])}, base `{p['base']}` built without them; "
            f"base accuracy {p['base_accuracy']:.4f} on its {p['base_test_photos']} held-out "
            f"full-size photos; replay rows {p['replay_rows']}, smallest head input "
            f"{p['head_input_min']:.3g}; the control (tukey=1, samples=0) against "
            "eval_heads.py's ridge at dims=0: largest score difference "
            f"{results['checks'][name]['control_vs_eval_heads_ridge_max_abs']:.1e}"
            + (
                f"; with the projection (tukey=1, samples=0, dims=4096) against its ridge at "
                f"dims=4096: {results['checks'][name]['rp_control_vs_eval_heads_ridge']:.1e} "
                "(float32 projection here)."
                if "rp_control_vs_eval_heads_ridge" in results["checks"][name]
                else "."
            )
        )
    lines += [
        "",
        f"Settings chosen on the tuning pair only (mean base drop <= {args.max_drop} pt in every "
        "scenario, then the highest mean recall over the four scenarios), then frozen.",
        "",
        "## Report pair, settings frozen",
        "",
    ]

    def rows(pair: str) -> list[Any]:
        return [
            (m.name, eh.fmt_setting(results["methods"][m.name][pair]["setting"]),
             results["methods"][m.name][pair]["summary"])
            for m in done
        ]  # fmt: skip

    lines += eh.table(rows("report"))
    lines += ["", "## Tuning pair, chosen settings", ""]
    lines += eh.table(
        [
            (
                m.name,
                eh.fmt_setting(results["methods"][m.name]["tuning"]["setting"]),
                results["methods"][m.name]["tuning"]["summary"],
            )
            for m in done
        ]  # fmt: skip
    )
    lines += ["", "## Tuning pair: each method's knob at its chosen setting", ""]
    names = [eh.scenario_name(k, n) for k, n in eh.SCENARIOS]
    for m in done:
        lines += eh.knob_table(m.name, m.knob, results["methods"][m.name])
    lines += ["## Tuning pair: every setting's best point under the rule", ""]
    lines += [
        "For each setting (knob aside): the highest mean recall over the four scenarios among "
        "its knob values with every mean base drop <= the rule's limit (none: '-').",
        "",
        "| method | setting | mean recall | K=1 | K=5 | K=10 | new | largest base drop (pt) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in done:
        by_setting: dict[str, list[dict[str, Any]]] = {}
        for point in results["methods"][m.name]["tuning_curve"]:
            fixed = {k: v for k, v in point["setting"].items() if k != m.knob}
            by_setting.setdefault(eh.fmt_setting(fixed), []).append(point)
        for name, points in by_setting.items():
            ok = [p for p in points if eh.score_of(p["summary"])[1] <= args.max_drop]
            if not ok:
                lines.append(f"| {m.name} | {name} | - | | | | | |")
                continue
            p = max(ok, key=lambda p: eh.score_of(p["summary"])[0])
            rec, drop = eh.score_of(p["summary"])
            lines.append(
                f"| {m.name} | {name}, bonus={p['setting']['bonus']} | {rec:.3f} | "
                + " | ".join(f"{p['summary'][n]['recall']:.2f}" for n in names)
                + f" | {drop:+.2f} |"
            )
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
