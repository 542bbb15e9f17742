"""Is a larger frozen backbone (EfficientNet-Lite1 / Lite2) worth adopting over Lite0?

Run with the project venv (onnxruntime, numpy, pillow; the project's own image code is
imported from the repository, so decoding and preprocessing are what `luncher` does):

    .venv-build/bin/python scripts/export_lite.py      # ONNX files
    P=.venv/bin/python; S=scripts/eval_backbones.py
    $P $S prepare-check   # preprocessed check photos for the torch comparison
    .venv-build/bin/python scripts/export_lite.py      # again: torch refs of them
    $P $S check           # ORT vs torch, top-5 ImageNet classes of food photos
    $P $S check-rates     # share of pizza/burrito/fruit/... photos with the matching class
    $P $S speed           # ms/photo, decode included, batch 1 and 32, alternating
    $P $S features        # cache /tmp/backbones/features-liteN.npz
    $P $S quality         # linear heads, few-shot nearest-mean transfer (about 7 min/backbone)
    $P $S bias            # setting A's 64 px accuracy per label and AUC
    $P $S report          # /tmp/backbones/results.md from the JSON files

Protocol, fixed before any result was seen:

- Preprocessing per backbone: RGB, short side to round(crop*256/224), centre crop `crop`
  (224 / 240 / 260), (x-127)/128, NCHW (healthyluncher.imaging.load with that Preprocessing).
  Features: the 1280-d pooled output of the exported ONNX graph. onnxruntime, 2 intra-op
  threads, 1 inter-op thread.
- Held out: int(sha256(file bytes)[:8], 16) % 5 == 0. CV folds (training photos only):
  int(sha256(file bytes)[8:16], 16) % 5.
- Linear head: features L2-normalised, then standardised with the training photos' mean and
  std; binary logistic regression (fast_food = 1), classes weighted to equal total weight,
  L2 penalty lam/2 |w|^2 (intercept free), fitted by L-BFGS in numpy. lam from
  10^{-6, -5.5, ..., 0} by 5-fold CV balanced accuracy on the training photos (ties: the
  larger lam), then refitted on all training photos.
- Setting A: train on full-size (healthy/, fast_food/) photos not held out. Report held-out
  full-size accuracy per dish and overall, all 28 lowres64 dishes per dish and overall,
  and (extra) the share of personal/pancakes called fast_food.
- Setting B: train also on the non-held-out photos of the 18 lowres64 dishes that are not
  left out. Left out (11): pancakes (personal/, counted as fast_food, what the base should
  call them), edamame, donuts, and eval_dishes.report_dishes()' 8. Report accuracy on the 11
  (all photos), on held-out 64 px photos of the 18 trained dishes, on held-out full size.
- Few-shot (setting C): base = setting A without bibimbap and breakfast_burrito (the linear
  head is retrained without them; its accuracy on them is reported). Features centred on
  the mean of the base's training features, then L2-normalised; prototypes = mean of each
  base class's training photos and the mean of the user's K photos (K=1, 5), the latter
  labelled the opposite of the dish's label (the user relabels the dish). A photo gets the
  label of its nearest prototype by cosine. Measured: the share of the dish's other photos
  (all its photos but the K) given the user's label; 5 draws per dish and K
  (np.random.default_rng([dish index, K, draw]) over the sorted photo list, the same draws
  for every backbone). Reported mean and worst over the 10 runs, per dish, and the
  nearest-mean accuracy on the base's held-out full-size photos with and without the
  user's prototype (collateral).
"""

from __future__ import annotations

import os
import tempfile

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "2"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

FOOD = REPO.parent / "shared" / "food"
OUT = Path(tempfile.gettempdir()) / "backbones"  # exports, features, results
LABELS = ("healthy", "fast_food")
MODELS = {"lite0": 224, "lite1": 240, "lite2": 260}
SUFFIXES = {".jpg", ".jpeg", ".png"}
DESIGN = ("pancakes", "edamame", "donuts")
FEWSHOT_DISHES = ("bibimbap", "breakfast_burrito")
KS = (1, 5)
DRAWS = 5
LAMS = [10.0**e for e in np.arange(-6, 0.01, 0.5)]
SYNSETS = REPO / ".venv-zoo/lib/python3.11/site-packages/timm/data/_info"
CHECK_PHOTOS = [
    "fast_food/pizza",
    "fast_food/breakfast_burrito",
    "fast_food/beignets",
    "healthy/fruit",
    "healthy/sushi",
    "healthy/beet_salad",
    "personal/pancakes",
    "lowres64/fast_food/hamburger",
]


def prep_for(model: str):
    from healthyluncher.settings import Preprocessing

    crop = MODELS[model]
    return Preprocessing(
        height=crop,
        width=crop,
        resize=round(crop * 256 / 224),
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        layout="NCHW",
        channels=3,
    )


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)


# ------------------------------------------------------------------------------ inventory


def inventory() -> list[dict]:
    """Every photo: rel path, group (full / personal / low), dish, label, held, fold."""
    cache = OUT / "inventory.json"
    if cache.exists():
        return json.loads(cache.read_text())
    rows = []

    def add(folder: Path, group: str, label: str) -> None:
        for p in photos(folder):
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            rows.append(
                {
                    "path": str(p.relative_to(FOOD)),
                    "group": group,
                    "dish": folder.name,
                    "label": label,
                    "held": int(sha[:8], 16) % 5 == 0,
                    "fold": int(sha[8:16], 16) % 5,
                }
            )

    for label in LABELS:
        for d in sorted(x for x in (FOOD / label).iterdir() if x.is_dir()):
            add(d, "full", label)
    add(FOOD / "personal" / "pancakes", "personal", "fast_food")
    for label in LABELS:
        for d in sorted(x for x in (FOOD / "lowres64" / label).iterdir() if x.is_dir()):
            add(d, "low", label)
    cache.write_text(json.dumps(rows))
    return rows


# ------------------------------------------------------------------------------- checks


def imagenet_names() -> list[str]:
    synsets = (SYNSETS / "imagenet_synsets.txt").read_text().split()
    lemma = dict(
        line.split("\t", 1)
        for line in (SYNSETS / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    return [lemma[s].split(",")[0] for s in synsets]


def check_files() -> list[Path]:
    return [photos(FOOD / c)[0] for c in CHECK_PHOTOS]


def cmd_prepare_check(_: argparse.Namespace) -> None:
    from healthyluncher.imaging import load

    for m in MODELS:
        arr = np.stack([load(p, prep_for(m)).array for p in check_files()])
        np.save(OUT / f"check-{m}.npy", arr)
        print(f"wrote check-{m}.npy {arr.shape}")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cmd_check(_: argparse.Namespace) -> None:
    names = imagenet_names()
    result: dict = {}
    lines = []
    for m in MODELS:
        ref = np.load(OUT / f"{m}-torch-ref.npz")
        sess = session(OUT / f"{m}-imagenet.onnx")
        fsess = session(OUT / f"{m}-features.onnx")
        entry: dict = {}
        for key in ("random", "photos"):
            if f"{key}_in" not in ref:
                continue
            feats, logits = sess.run(None, {"image": ref[f"{key}_in"]})
            ffeats = fsess.run(None, {"image": ref[f"{key}_in"]})[0]
            entry[f"{key}_max_abs_diff_features"] = float(
                np.abs(feats - ref[f"{key}_features"]).max()
            )
            entry[f"{key}_max_abs_diff_logits"] = float(np.abs(logits - ref[f"{key}_logits"]).max())
            entry[f"{key}_max_abs_diff_features_only_graph"] = float(
                np.abs(ffeats - ref[f"{key}_features"]).max()
            )
            entry[f"{key}_feature_scale"] = float(np.abs(ref[f"{key}_features"]).max())
        # top-5 with the project's own decoding (equal to photos_in)
        arr = np.load(OUT / f"check-{m}.npy")
        _, logits = sess.run(None, {"image": arr})
        probs = softmax(logits)
        tops = []
        for p, row in zip(check_files(), probs, strict=True):
            idx = np.argsort(-row)[:5]
            tops.append(
                {
                    "photo": str(p.relative_to(FOOD)),
                    "top5": [(names[i], round(float(row[i]), 3)) for i in idx],
                }
            )
        entry["top5"] = tops
        if m == "lite0":  # the stock export scripts/build_base_model.py --stock takes
            stock = session(OUT.parent / "stock.onnx")
            inp = stock.get_inputs()[0].name
            s_logits = stock.run(None, {inp: arr})[0]
            entry["stock_lite0_max_abs_diff_logits"] = float(np.abs(s_logits - logits).max())
        result[m] = entry
        lines.append(f"## {m}")
        for k, v in entry.items():
            if k != "top5":
                lines.append(f"{k}: {v:.3g}")
        for t in tops:
            lines.append(f"{t['photo']}: " + ", ".join(f"{n} {p:.2f}" for n, p in t["top5"]))
    (OUT / "check.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


RATE_TARGETS = {
    "fast_food/pizza": ["pizza"],
    "fast_food/breakfast_burrito": ["burrito"],
    "healthy/fruit": ["banana", "orange", "Granny Smith", "lemon", "pomegranate", "strawberry"],
    "lowres64/fast_food/hamburger": ["cheeseburger"],
    "lowres64/fast_food/hot_dog": ["hotdog"],
    "lowres64/healthy/guacamole": ["guacamole"],
}


def cmd_check_rates(_: argparse.Namespace) -> None:
    """Share of a dish's photos with the matching ImageNet class in the top 1 / top 5."""
    from healthyluncher.imaging import load

    names = imagenet_names()
    out: dict = {}
    for m in MODELS:
        sess = session(OUT / f"{m}-imagenet.onnx")
        prep = prep_for(m)
        out[m] = {}
        for folder, targets in RATE_TARGETS.items():
            ids = {names.index(t) for t in targets}
            paths = photos(FOOD / folder)[:100]
            top1 = top5 = 0
            for i in range(0, len(paths), 32):
                x = np.stack([load(p, prep).array for p in paths[i : i + 32]])
                logits = sess.run(None, {"image": x})[1]
                order = np.argsort(-logits, axis=1)
                top1 += sum(int(r[0] in ids) for r in order)
                top5 += sum(bool(ids & set(r[:5].tolist())) for r in order)
            out[m][folder] = {"n": len(paths), "top1": top1 / len(paths), "top5": top5 / len(paths)}
        print(m, out[m], flush=True)
    (OUT / "check_rates.json").write_text(json.dumps(out, indent=1))


# -------------------------------------------------------------------------------- speed


def cmd_speed(a: argparse.Namespace) -> None:
    from healthyluncher.imaging import load

    full = [FOOD / r["path"] for r in inventory() if r["group"] == "full"]
    step = len(full) // 64
    sample = full[::step][:64]
    sessions = {m: session(OUT / f"{m}-features.onnx") for m in MODELS}
    preps = {m: prep_for(m) for m in MODELS}

    def batch1(m: str, paths: list[Path]) -> float:
        t = time.perf_counter()
        for p in paths:
            sessions[m].run(None, {"image": load(p, preps[m]).array[None]})
        return (time.perf_counter() - t) * 1000 / len(paths)

    def batch32(m: str, paths: list[Path]) -> float:
        t = time.perf_counter()
        for i in range(0, len(paths), 32):
            x = np.stack([load(p, preps[m]).array for p in paths[i : i + 32]])
            sessions[m].run(None, {"image": x})
        return (time.perf_counter() - t) * 1000 / len(paths)

    def decode_only(m: str, paths: list[Path]) -> float:
        t = time.perf_counter()
        for p in paths:
            load(p, preps[m])
        return (time.perf_counter() - t) * 1000 / len(paths)

    for m in MODELS:  # warm-up
        batch32(m, sample[:32])
        batch1(m, sample[:4])
    models = list(MODELS)
    rounds: list[dict] = []
    for r in range(a.rounds):
        order = models[r % 3 :] + models[: r % 3]
        row: dict = {"order": order, "load1": os.getloadavg()[0]}
        for m in order:
            row[f"{m}_b1"] = batch1(m, sample[:32])
            row[f"{m}_b32"] = batch32(m, sample)
            row[f"{m}_decode"] = decode_only(m, sample[:32])
        rounds.append(row)
        print(
            r, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True
        )
    summary: dict = {"photos": len(sample), "rounds": a.rounds, "per_round": rounds}
    for m in models:
        for kind in ("b1", "b32", "decode"):
            vals = np.array([row[f"{m}_{kind}"] for row in rounds])
            ratios = np.array([row[f"{m}_{kind}"] / row[f"lite0_{kind}"] for row in rounds])
            summary[f"{m}_{kind}_median_ms"] = float(np.median(vals))
            summary[f"{m}_{kind}_min_ms"] = float(vals.min())
            summary[f"{m}_{kind}_ratio_median"] = float(np.median(ratios))
            summary[f"{m}_{kind}_ratio_range"] = [float(ratios.min()), float(ratios.max())]
        summary[f"{m}_bytes"] = (OUT / f"{m}-features.onnx").stat().st_size
        summary[f"{m}_imagenet_bytes"] = (OUT / f"{m}-imagenet.onnx").stat().st_size
    (OUT / "speed.json").write_text(json.dumps(summary, indent=1))
    for m in models:
        print(m, {k[len(m) + 1 :]: v for k, v in summary.items() if k.startswith(m + "_")})


# ----------------------------------------------------------------------------- features


def features(m: str, rows: list[dict]) -> np.ndarray:
    from healthyluncher.imaging import load

    cache = OUT / f"features-{m}.npz"
    model = OUT / f"{m}-features.onnx"
    paths = [r["path"] for r in rows]
    stamp = f"{model.stat().st_size}:{model.stat().st_mtime_ns}"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if list(z["paths"]) == paths and str(z["stamp"]) == stamp:
            return z["X"]
    sess = session(model)
    prep = prep_for(m)
    out = np.zeros((len(paths), 1280), np.float32)
    t = time.perf_counter()
    for i in range(0, len(paths), 32):
        x = np.stack([load(FOOD / p, prep).array for p in paths[i : i + 32]])
        out[i : i + len(x)] = sess.run(None, {"image": x})[0]
        if i % 1600 == 0:
            print(f"{m}: {i}/{len(paths)} {time.perf_counter() - t:.0f}s", flush=True)
    print(f"{m}: {len(paths)} photos in {time.perf_counter() - t:.0f}s", flush=True)
    np.savez(cache, paths=np.array(paths), X=out, stamp=np.array(stamp))
    return out


def cmd_features(_: argparse.Namespace) -> None:
    rows = inventory()
    for m in MODELS:
        features(m, rows)


# ------------------------------------------------------------------------ linear heads


def lbfgs(
    fg, x0: np.ndarray, iters: int = 3000, tol: float = 1e-7, mem: int = 10
) -> tuple[np.ndarray, int]:
    x = x0.copy()
    f, g = fg(x)
    S: list[np.ndarray] = []
    Y: list[np.ndarray] = []
    for it in range(iters):
        if np.abs(g).max() < tol:
            return x, it
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(S), reversed(Y), strict=True):
            rho = 1.0 / (y @ s)
            al = rho * (s @ q)
            alphas.append((al, rho, s, y))
            q -= al * y
        if S:
            q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
        else:
            q /= max(1.0, np.abs(g).max()) * 10
        for al, rho, s, y in reversed(alphas):
            b = rho * (y @ q)
            q += s * (al - b)
        d = -q
        gd = g @ d
        if gd >= 0:  # not a descent direction: reset
            S.clear(), Y.clear()
            d = -g
            gd = g @ d
        step = 1.0
        while True:
            xn = x + step * d
            fn, gn = fg(xn)
            if fn <= f + 1e-4 * step * gd or step < 1e-12:
                break
            step *= 0.5
        s, y = xn - x, gn - g
        if y @ s > 1e-12:
            S.append(s), Y.append(y)
            if len(S) > mem:
                S.pop(0), Y.pop(0)
        x, f, g = xn, fn, gn
    return x, iters


def fit_logreg(
    X: np.ndarray, y: np.ndarray, lam: float, theta0: np.ndarray | None = None
) -> np.ndarray:
    n, d = X.shape
    w = np.where(y == 1, 0.5 / max(1, (y == 1).sum()), 0.5 / max(1, (y == 0).sum()))

    def fg(theta: np.ndarray):
        beta, b = theta[:d], theta[d]
        z = X @ beta + b
        loss = np.sum(w * (np.logaddexp(0, z) - y * z)) + 0.5 * lam * beta @ beta
        r = w * (1 / (1 + np.exp(-z)) - y)
        return loss, np.concatenate([X.T @ r + lam * beta, [r.sum()]])

    theta, _ = lbfgs(fg, np.zeros(d + 1) if theta0 is None else theta0)
    return theta


class Head:
    """L2-normalise, standardise on the training rows, logistic regression with CV'd lam."""

    def __init__(self, X: np.ndarray, y: np.ndarray, folds: np.ndarray) -> None:
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        self.mu, self.sd = Xn.mean(0), Xn.std(0) + 1e-6
        Z = ((Xn - self.mu) / self.sd).astype(np.float64)
        cv = np.zeros(len(LAMS))
        for f in range(5):
            tr, va = folds != f, folds == f
            theta = None
            for j in range(len(LAMS) - 1, -1, -1):  # large lam first, warm starts
                theta = fit_logreg(Z[tr], y[tr], LAMS[j], theta)
                pred = (Z[va] @ theta[:-1] + theta[-1] > 0).astype(int)
                cv[j] += 0.5 * (np.mean(pred[y[va] == 1] == 1) + np.mean(pred[y[va] == 0] == 0)) / 5
        best = max(range(len(LAMS)), key=lambda j: (round(cv[j], 6), j))
        self.lam, self.cv = LAMS[best], cv
        self.theta = fit_logreg(Z, y, self.lam)

    def predict(self, X: np.ndarray) -> np.ndarray:
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        Z = (Xn - self.mu) / self.sd
        return (Z @ self.theta[:-1] + self.theta[-1] > 0).astype(int)


def accuracy_table(pred: np.ndarray, y: np.ndarray, dishes: list[str]) -> dict:
    out = {"overall": float(np.mean(pred == y)), "n": int(len(y)), "per_dish": {}}
    for d in sorted(set(dishes), key=dishes.index):
        mask = np.array([x == d for x in dishes])
        out["per_dish"][d] = {"acc": float(np.mean(pred[mask] == y[mask])), "n": int(mask.sum())}
    out["dish_mean"] = float(np.mean([v["acc"] for v in out["per_dish"].values()]))
    return out


def cmd_quality(a: argparse.Namespace) -> None:
    from eval_dishes import report_dishes

    rows = inventory()
    report = set(report_dishes(FOOD))
    left_out = set(DESIGN) | report
    assert len(left_out) == 11, left_out
    y = np.array([LABELS.index(r["label"]) for r in rows])
    group = np.array([r["group"] for r in rows])
    dish = [r["dish"] for r in rows]
    dish_arr = np.array(dish)
    held = np.array([r["held"] for r in rows])
    folds = np.array([r["fold"] for r in rows])
    full, low, pers = group == "full", group == "low", group == "personal"
    lo_mask = np.isin(dish_arr, sorted(left_out))
    results: dict = {"lams": LAMS, "left_out": sorted(left_out), "report_dishes": sorted(report)}
    for m in a.models:
        X = features(m, rows)
        t0 = time.perf_counter()
        res: dict = {}

        def sub(mask):
            idx = np.flatnonzero(mask)
            return idx, [dish[i] for i in idx]

        # --- setting A
        train = full & ~held
        head = Head(X[train], y[train], folds[train])
        A = {"lam": head.lam, "cv": head.cv.tolist(), "n_train": int(train.sum())}
        idx, ds = sub(full & held)
        A["full_held"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        idx, ds = sub(low)
        A["low_all"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        idx, _ = sub(pers)
        A["pancakes_fast_food_share"] = float(np.mean(head.predict(X[idx]) == 1))
        res["A"] = A
        print(m, "A", head.lam, A["full_held"]["overall"], A["low_all"]["overall"], flush=True)

        # --- setting B
        train = (full | (low & ~lo_mask)) & ~held
        head = Head(X[train], y[train], folds[train])
        B = {"lam": head.lam, "cv": head.cv.tolist(), "n_train": int(train.sum())}
        idx, ds = sub(lo_mask)
        B["left_out_11"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        idx, ds = sub(low & ~lo_mask & held)
        B["low_trained_held"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        idx, ds = sub(full & held)
        B["full_held"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        res["B"] = B
        print(
            m,
            "B",
            head.lam,
            B["left_out_11"]["overall"],
            B["low_trained_held"]["overall"],
            B["full_held"]["overall"],
            flush=True,
        )

        # --- setting C: few-shot nearest class mean
        fs = np.isin(dish_arr, FEWSHOT_DISHES)
        train = full & ~held & ~fs
        head = Head(X[train], y[train], folds[train])
        C: dict = {"lam": head.lam, "n_train": int(train.sum())}
        idx, ds = sub(full & fs)
        C["head_on_left_out_dishes"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        idx, ds = sub(full & held & ~fs)
        C["head_full_held_others"] = accuracy_table(head.predict(X[idx]), y[idx], ds)
        centre = X[train].mean(0)

        def norm(V, centre=centre):
            V = V - centre
            return V / np.linalg.norm(V, axis=1, keepdims=True)

        protos = np.stack([norm(X[train & (y == c)]).mean(0) for c in (0, 1)])
        base_test = np.flatnonzero(full & held & ~fs)

        def ncm(P, labels, V):
            P = P / np.linalg.norm(P, axis=1, keepdims=True)
            return np.array(labels)[np.argmax(norm(V) @ P.T, axis=1)]

        C["ncm_base_held_acc"] = float(np.mean(ncm(protos, [0, 1], X[base_test]) == y[base_test]))
        runs: dict = {}
        for di, d in enumerate(FEWSHOT_DISHES):
            didx = np.flatnonzero(full & (dish_arr == d))  # sorted photo order (inventory)
            true = int(y[didx[0]])
            chosen = 1 - true
            runs[d] = {"K=0": float(np.mean(ncm(protos, [0, 1], X[didx]) == chosen))}
            for k in KS:
                shares, collat = [], []
                for draw in range(DRAWS):
                    rng = np.random.default_rng([di, k, draw])
                    pick = rng.choice(len(didx), size=k, replace=False)
                    rest = np.delete(didx, pick)
                    user = norm(X[didx[pick]]).mean(0)
                    P = np.vstack([protos, user])
                    labs = [0, 1, chosen]
                    shares.append(float(np.mean(ncm(P, labs, X[rest]) == chosen)))
                    collat.append(float(np.mean(ncm(P, labs, X[base_test]) == y[base_test])))
                runs[d][f"K={k}"] = shares
                runs[d][f"K={k}_base_held_acc"] = collat
        C["runs"] = runs
        for k in KS:
            allr = [s for d in FEWSHOT_DISHES for s in runs[d][f"K={k}"]]
            C[f"K={k}_mean"] = float(np.mean(allr))
            C[f"K={k}_worst"] = float(np.min(allr))
            C[f"K={k}_base_held_acc_mean"] = float(
                np.mean([s for d in FEWSHOT_DISHES for s in runs[d][f"K={k}_base_held_acc"]])
            )
        res["C"] = C
        print(m, "C", {k: v for k, v in C.items() if k.startswith("K=")}, flush=True)
        res["seconds"] = time.perf_counter() - t0
        results[m] = res
        # merge into quality.json (other models' entries kept), after each model
        path = OUT / "quality.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(results)
        path.write_text(json.dumps(merged, indent=1))


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def cmd_bias(_: argparse.Namespace) -> None:
    """Setting A's head refitted once with the lam quality chose: the 64 px photos' accuracy
    per label and the threshold-free AUC (is the 64 px loss separability or a shifted bias?)."""
    rows = inventory()
    q = json.loads((OUT / "quality.json").read_text())
    y = np.array([LABELS.index(r["label"]) for r in rows])
    group = np.array([r["group"] for r in rows])
    held = np.array([r["held"] for r in rows])
    out: dict = {}
    for m in MODELS:
        X = features(m, rows)
        train = (group == "full") & ~held
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        mu, sd = Xn[train].mean(0), Xn[train].std(0) + 1e-6
        Z = (Xn - mu) / sd
        theta = fit_logreg(Z[train], y[train], q[m]["A"]["lam"])
        score = Z @ theta[:-1] + theta[-1]
        low = group == "low"
        fullh = (group == "full") & held
        best_t = max(np.unique(score[low]), key=lambda t: np.mean((score[low] > t) == y[low]))
        out[m] = {
            "low_acc": float(np.mean((score[low] > 0) == y[low])),
            "low_acc_healthy": float(np.mean(score[low & (y == 0)] <= 0)),
            "low_acc_fast_food": float(np.mean(score[low & (y == 1)] > 0)),
            "low_auc": auc(score[low], y[low]),
            "low_acc_best_threshold_oracle": float(np.mean((score[low] > best_t) == y[low])),
            "full_held_auc": auc(score[fullh], y[fullh]),
        }
        print(m, out[m], flush=True)
    (OUT / "bias.json").write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------- report


def cmd_report(_: argparse.Namespace) -> None:
    sp = json.loads((OUT / "speed.json").read_text())
    q = json.loads((OUT / "quality.json").read_text())
    ck = json.loads((OUT / "check.json").read_text())
    ms = list(MODELS)
    L = ["# Frozen backbone comparison: EfficientNet-Lite0 / Lite1 / Lite2", ""]
    if (OUT / "summary.md").exists():
        L += [(OUT / "summary.md").read_text().rstrip(), ""]
    L.append(
        "Scripts: scripts/export_lite.py (build venv), scripts/eval_backbones.py "
        "(project venv); the protocol is in eval_backbones.py's docstring. Raw numbers: "
        "check.json, speed.json, quality.json."
    )
    L += ["", "## Export checks", "", "| | " + " | ".join(ms) + " |", "|---|" + "---:|" * len(ms)]
    for key in (
        "random_max_abs_diff_features",
        "random_max_abs_diff_logits",
        "photos_max_abs_diff_features",
        "photos_max_abs_diff_logits",
        "photos_feature_scale",
    ):
        L.append(
            f"| {key} | " + " | ".join(f"{ck[m].get(key, float('nan')):.2g}" for m in ms) + " |"
        )
    L.append(
        f"\nLite0 export vs the stock export (stock.onnx), logits on the check photos: "
        "max abs diff "
        f"{ck['lite0']['stock_lite0_max_abs_diff_logits']:.2g}\n"
    )
    L.append("Top-3 ImageNet classes (project decoding and preprocessing):\n")
    L.append("| photo | " + " | ".join(ms) + " |")
    L.append("|---|" + "---|" * len(ms))
    for i, t in enumerate(ck["lite0"]["top5"]):
        cells = [", ".join(f"{n} {p:.2f}" for n, p in ck[m]["top5"][i]["top5"][:3]) for m in ms]
        L.append(f"| {t['photo'].split('/')[-2]} | " + " | ".join(cells) + " |")
    rates_path = OUT / "check_rates.json"
    if rates_path.exists():
        rt = json.loads(rates_path.read_text())
        L += [
            "",
            "Share of a dish's first 100 photos (sorted) whose matching ImageNet class is top-1 "
            "/ in the top 5:",
            "",
        ]
        L.append("| dish (classes) | " + " | ".join(ms) + " |")
        L.append("|---|" + "---:|" * len(ms))
        for folder, targets in RATE_TARGETS.items():
            L.append(
                f"| {folder} ({', '.join(targets)}; n={rt[ms[0]][folder]['n']}) | "
                + " | ".join(
                    f"{rt[m][folder]['top1']:.2f} / {rt[m][folder]['top5']:.2f}" for m in ms
                )
                + " |"
            )
    L += [
        "",
        f"## Speed ({sp['photos']} full-size photos, {sp['rounds']} alternating rounds, "
        "ORT 2 threads; "
        "ms per photo, decode included; ratio = per-round ratio to Lite0, median [min-max])",
        "",
    ]
    L.append("| | " + " | ".join(ms) + " |")
    L.append("|---|" + "---:|" * len(ms))
    for kind, name in (
        ("b1", "batch 1"),
        ("b32", "batch 32"),
        ("decode", "decode+preprocess only"),
    ):
        L.append(
            f"| {name}: ms (median) | "
            + " | ".join(f"{sp[f'{m}_{kind}_median_ms']:.1f}" for m in ms)
            + " |"
        )
        L.append(
            f"| {name}: ratio to Lite0 | "
            + " | ".join(
                f"{sp[f'{m}_{kind}_ratio_median']:.2f} "
                f"[{sp[f'{m}_{kind}_ratio_range'][0]:.2f}-{sp[f'{m}_{kind}_ratio_range'][1]:.2f}]"
                for m in ms
            )
            + " |"
        )
    L.append(
        "| features ONNX, MB | " + " | ".join(f"{sp[f'{m}_bytes'] / 1e6:.1f}" for m in ms) + " |"
    )
    L.append(
        "| with 1000-class fc, MB | "
        + " | ".join(f"{sp[f'{m}_imagenet_bytes'] / 1e6:.1f}" for m in ms)
        + " |"
    )

    def row(name, get):
        return f"| {name} | " + " | ".join(get(q[m]) for m in ms) + " |"

    def acc(t):
        return f"{t['overall']:.3f} (dish mean {t['dish_mean']:.3f}, n={t['n']})"

    L += [
        "",
        "## Base quality, linear head (logistic regression, lam by 5-fold CV on training photos)",
        "",
    ]
    L.append("| | " + " | ".join(ms) + " |")
    L.append("|---|" + "---|" * len(ms))
    L.append(row("A: lam", lambda r: f"{r['A']['lam']:.0e}"))
    L.append(row("A: full-size held-out", lambda r: acc(r["A"]["full_held"])))
    L.append(row("A: 64 px, all 28 dishes (none trained)", lambda r: acc(r["A"]["low_all"])))
    L.append(
        row("A: pancakes called fast_food", lambda r: f"{r['A']['pancakes_fast_food_share']:.3f}")
    )
    L.append(row("B: lam", lambda r: f"{r['B']['lam']:.0e}"))
    L.append(row("B: 11 left-out dishes", lambda r: acc(r["B"]["left_out_11"])))
    L.append(
        row("B: held-out 64 px of 18 trained dishes", lambda r: acc(r["B"]["low_trained_held"]))
    )
    L.append(row("B: full-size held-out", lambda r: acc(r["B"]["full_held"])))

    bias_path = OUT / "bias.json"
    if bias_path.exists():
        bj = json.loads(bias_path.read_text())
        L += [
            "",
            "Setting A on the 28 unseen 64 px dishes, split by label, and threshold-free (`bias`):",
            "",
        ]
        L.append("| | " + " | ".join(ms) + " |")
        L.append("|---|" + "---:|" * len(ms))
        for key, name in (
            ("low_acc_healthy", "healthy 64 px photos called healthy"),
            ("low_acc_fast_food", "fast-food 64 px photos called fast_food"),
            ("low_auc", "AUC, 64 px"),
            ("low_acc_best_threshold_oracle", "accuracy at the best threshold (oracle), 64 px"),
            ("full_held_auc", "AUC, full-size held-out"),
        ):
            L.append(f"| {name} | " + " | ".join(f"{bj[m][key]:.3f}" for m in ms) + " |")

    def per_dish(title, get):
        nonlocal L
        L += [
            "",
            f"### {title}",
            "",
            "| dish | " + " | ".join(ms) + " |",
            "|---|" + "---:|" * len(ms),
        ]
        for d in get(q[ms[0]])["per_dish"]:
            L.append(
                f"| {d} (n={get(q[ms[0]])['per_dish'][d]['n']}) | "
                + " | ".join(f"{get(q[m])['per_dish'][d]['acc']:.3f}" for m in ms)
                + " |"
            )

    per_dish("A: full-size held-out, per dish", lambda r: r["A"]["full_held"])
    per_dish("A: 64 px (none trained), per dish", lambda r: r["A"]["low_all"])
    per_dish("B: 11 left-out dishes, per dish", lambda r: r["B"]["left_out_11"])
    per_dish("B: held-out 64 px of trained dishes, per dish", lambda r: r["B"]["low_trained_held"])

    L += [
        "",
        "## Few-shot nearest class mean (bibimbap, breakfast_burrito left out of the base; "
        "share of the dish's other photos given the user's label)",
        "",
    ]
    L.append("| | " + " | ".join(ms) + " |")
    L.append("|---|" + "---|" * len(ms))
    L.append(
        row(
            "base head on the 2 left-out dishes (correct label)",
            lambda r: acc(r["C"]["head_on_left_out_dishes"]),
        )
    )
    L.append(
        row("base head, other held-out full size", lambda r: acc(r["C"]["head_full_held_others"]))
    )
    for d in FEWSHOT_DISHES:
        L.append(
            row(
                f"K=0 (base prototypes only): {d} already given the opposite label",
                lambda r, d=d: f"{r['C']['runs'][d]['K=0']:.3f}",
            )
        )
    for k in KS:
        L.append(
            row(
                f"K={k}: mean (worst) over 2 dishes x {DRAWS} draws",
                lambda r, k=k: f"{r['C'][f'K={k}_mean']:.3f} ({r['C'][f'K={k}_worst']:.3f})",
            )
        )
        for d in FEWSHOT_DISHES:
            L.append(
                row(
                    f"K={k}: {d} mean (worst)",
                    lambda r, k=k, d=d: (
                        f"{np.mean(r['C']['runs'][d][f'K={k}']):.3f} "
                        f"({np.min(r['C']['runs'][d][f'K={k}']):.3f})"
                    ),
                )
            )
    L.append(
        row(
            "nearest-mean acc. on base held-out full size, no user prototype",
            lambda r: f"{r['C']['ncm_base_held_acc']:.3f}",
        )
    )
    for k in KS:
        L.append(
            row(
                f"... with the K={k} prototype (mean)",
                lambda r, k=k: f"{r['C'][f'K={k}_base_held_acc_mean']:.3f}",
            )
        )
    (OUT / "results.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare-check")
    sub.add_parser("check")
    sub.add_parser("check-rates")
    s = sub.add_parser("speed")
    s.add_argument("--rounds", type=int, default=7)
    sub.add_parser("features")
    s = sub.add_parser("quality")
    s.add_argument("--models", nargs="+", default=list(MODELS))
    sub.add_parser("report")
    sub.add_parser("bias")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    {
        "prepare-check": cmd_prepare_check,
        "check": cmd_check,
        "check-rates": cmd_check_rates,
        "speed": cmd_speed,
        "features": cmd_features,
        "quality": cmd_quality,
        "report": cmd_report,
        "bias": cmd_bias,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
