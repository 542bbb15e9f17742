"""Another embedding for the memory only (the head keeps its 1280-d pooled input): step A.

Run from the repository root (needs ../shared/food and the tuning leave-out base):

    .venv/bin/python scripts/eval_memory_embeddings.py --tuning-base /tmp/lobase-w-tuning \\
        --out results/memory-embeddings.md

The plan, written before this ran, is results/memory-embeddings-plan.md. In short:

- Spaces, all from the frozen network of the base's own ONNX model (extra graph outputs):
  `avg` (the current head input: the last feature map F, 1280 x 7 x 7 after ReLU6,
  average-pooled), `gem3` (GeM, p = 3, of F), `max` (max pooling of F), `sqrt` (avg,
  signed square root), `cat320`, `cat320-192`, `cat320-192-112` (L2(avg F) concatenated
  with the L2-normalised average pools of the last MBConv stages' outputs: 320, 192, 112
  channels). Cosine on the L2-normalised vectors.
- The tuning base's replay set (400 training photos at full size and as 64 px
  thumbnails) is found again by matching its rows to the photos' `avg` embeddings, then
  embedded in every space. Photos are read by the library (`imaging.load`, the base's
  preprocessing; `small=64` for the thumbnails, as headfit does).
- Dishes: the tuning pair (fruit, beignets; left out of the base) decides; beet_salad,
  sushi and pizza (in the base) are a check. The report pair (bibimbap,
  breakfast_burrito) is never a dish here and never a margin photo.
- Per dish, 20 photos q of the pool half (eval_personalization.halves, rng seed 0), not
  replayed. r(q) = q's highest cosine to a replay row of the other label (the memory's
  ball). Coverage: the share of the held half (not replayed) with cosine to q above
  r(q). Margin proxy: the share of the base's held-out photos of the other label (other
  dishes than the two pairs') above r(q) - 0.05; the same on all the base's non-replayed
  photos of that label; and a scale-free diagnostic: coverage at the offset where that
  false capture equals the current space's at 0.05.
- Rule (the plan's): eligible if the mean margin proxy is at most avg's + 0.01; chosen:
  the highest mean coverage over the two tuning dishes; step B (eval_memory_rules.py)
  only if that beats avg by 0.05 or more and does not lose on the three check dishes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from eval_dishes import stores  # type: ignore[import-not-found]  # noqa: E402
from eval_personalization import halves, held_out, photos  # type: ignore[import-not-found]  # noqa: E402

from healthyluncher import imaging  # noqa: E402
from healthyluncher.examples import load_replay  # noqa: E402
from healthyluncher.photos import ImageFailure  # noqa: E402
from healthyluncher.records import BUNDLED_MODEL, load_base  # noqa: E402
from healthyluncher.settings import Hyperparameters  # noqa: E402

FOOD = REPO.parent / "shared" / "food"
LABELS = ("healthy", "fast_food")
TUNING = ("fruit", "beignets")
CHECK = ("beet_salad", "sushi", "pizza")
NEVER = ("bibimbap", "breakfast_burrito")  # the report pair
MAPS = {
    "F": "/_swish_1/Clip_output_0",
    "S7": "/_blocks.15/_project_conv/Conv_output_0",
    "S6": "/_blocks.14/Add_output_0",
    "S5": "/_blocks.10/Add_output_0",
}
SPACES = ("avg", "gem3", "max", "sqrt", "cat320", "cat320-192", "cat320-192-112")
MARGIN = 0.05
SMALL = 64  # headfit.REPLAY_SMALL_SIDE
Q_PER_DISH = 20


def session(model: Path) -> Any:
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model))
    names = {o for n in m.graph.node for o in n.output}
    for name in MAPS.values():
        assert name in names, name
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def pooled(sess: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
    names = ["logits", *MAPS]
    out = dict(zip(names, sess.run(["logits", *MAPS.values()], {"image": batch}), strict=True))
    f = out["F"]
    return {
        "avg": f.mean(axis=(2, 3)),
        "gem3": np.cbrt(np.mean(np.maximum(f, 0) ** 3, axis=(2, 3))),
        "max": f.max(axis=(2, 3)),
        **{f"avg{k}": out[k].mean(axis=(2, 3)) for k in ("S7", "S6", "S5")},
    }


def embed(
    sess: Any, paths: list[Path], prep: Any, small: int | None, fn: Any = pooled
) -> dict[str, np.ndarray]:
    """`fn(sess, batch)`: the arrays kept per photo (float16 ones stay float16)."""
    parts: list[dict[str, np.ndarray]] = []
    batch: list[np.ndarray] = []
    for item in imaging.load_many(paths, prep, small=small):
        if isinstance(item, ImageFailure):
            raise SystemExit(f"cannot read {item.path}: {item.error}")
        batch.append(item.array)
        if len(batch) == 16:
            parts.append(fn(sess, np.stack(batch)))
            batch = []
    if batch:
        parts.append(fn(sess, np.stack(batch)))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {k: v if v.dtype == np.float16 else v.astype(np.float32) for k, v in out.items()}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def space(p: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name in ("avg", "gem3", "max"):
        return unit(p[name])
    if name == "sqrt":
        return unit(np.sign(p["avg"]) * np.sqrt(np.abs(p["avg"])))
    stages = {"cat320": ("S7",), "cat320-192": ("S7", "S6"), "cat320-192-112": ("S7", "S6", "S5")}
    return unit(np.concatenate([unit(p["avg"])] + [unit(p[f"avg{s}"]) for s in stages[name]], 1))


def prepare(args: argparse.Namespace, fn: Any = pooled) -> dict[str, Any]:
    """The photos embedded by `fn` (cached in args.cache), the replay rows found again, the
    masks and each dish's q and held half (seed 0)."""
    model = args.tuning_base / BUNDLED_MODEL
    os.environ["LUNCHER_BUNDLED_MODEL"] = str(model)
    store = stores(args.work, 1, Hyperparameters())[0]
    base = load_base(store, store.read_state())
    prep = base.meta.preprocessing
    replay = load_replay(base)
    assert replay is not None
    r_in, r_y = replay[0].reshape(len(replay[0]), -1), replay[1]
    labels = tuple(base.meta.labels)

    full: list[tuple[Path, str, str]] = []  # (photo, label, dish)
    for label in LABELS:
        for dish in sorted(p for p in (args.food / label).iterdir() if p.is_dir()):
            full.extend((p, label, dish.name) for p in photos(dish))
    paths = [p for p, _, _ in full]
    args.cache.mkdir(parents=True, exist_ok=True)
    cached = args.cache / "full.npz"
    sess = session(model)
    t = time.perf_counter()
    if cached.is_file() and list(np.load(cached)["paths"]) == [str(p) for p in paths]:
        with np.load(cached) as data:
            emb = {k: data[k] for k in data.files if k != "paths"}
    else:
        emb = embed(sess, paths, prep, None, fn)
        np.savez(cached, paths=np.array([str(p) for p in paths]), **emb)
    print(f"{len(paths)} full-size photos in {time.perf_counter() - t:.0f} s", flush=True)

    # The replay rows' photos: full-size rows first, then the same photos as thumbnails.
    half = len(r_in) // 2
    cos = unit(r_in[:half]) @ unit(emb["avg"]).T
    match = cos.argmax(axis=1)
    worst_full = float(cos.max(axis=1).min())
    if worst_full < 0.9999:
        raise SystemExit(f"replay rows do not match the photos' avg embeddings ({worst_full})")
    diff_full = float(np.abs(r_in[:half] - emb["avg"][match]).max())
    t = time.perf_counter()
    thumbs = embed(sess, [paths[i] for i in match], prep, SMALL, fn)
    print(f"{half} thumbnails in {time.perf_counter() - t:.0f} s", flush=True)
    diff_small = float(np.abs(r_in[half:] - thumbs["avg"]).max())
    worst_small = float(np.min(np.sum(unit(r_in[half:]) * unit(thumbs["avg"]), axis=1)))
    if worst_small < 0.9999:
        raise SystemExit(f"thumbnail rows do not match ({worst_small})")
    print(f"replay matched: max |diff| {diff_full:.2e} full, {diff_small:.2e} thumbnails")
    replayed = set(match.tolist())
    replay_y = r_y
    replay_dishes = [full[i][2] for i in match]

    lab = np.array([labels.index(lb) for _, lb, _ in full])
    index = {str(p): i for i, p in enumerate(paths)}
    pair = set(TUNING) | set(NEVER)
    base_held = np.array([held_out(p) and d not in pair for p, _, d in full])
    base_rest = np.array([i not in replayed and d not in pair for i, (_, _, d) in enumerate(full)])

    rng = np.random.default_rng(0)
    plan: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for dish in TUNING + CHECK:
        folder = next(args.food / lb / dish for lb in LABELS if (args.food / lb / dish).is_dir())
        pool, held = halves(photos(folder))
        pool_i = np.array([index[str(p)] for p in pool if index[str(p)] not in replayed])
        held_i = np.array([index[str(p)] for p in held if index[str(p)] not in replayed])
        q = np.sort(rng.choice(pool_i, size=min(Q_PER_DISH, len(pool_i)), replace=False))
        plan[dish] = (q, held_i)
    return {
        "emb": emb,
        "thumbs": thumbs,
        "match": match,
        "replay_y": replay_y,
        "lab": lab,
        "base_held": base_held,
        "base_rest": base_rest,
        "plan": plan,
        "dishes": {d: {"q": len(q), "held": len(h)} for d, (q, h) in plan.items()},
        "replay": {
            "rows": len(r_in),
            "photos_per_dish": {d: replay_dishes.count(d) for d in sorted(set(replay_dishes))},
            "max_abs_diff_full": diff_full,
            "max_abs_diff_thumbnails": diff_small,
        },
    }


def cases(setup: dict[str, Any]) -> Any:
    """Per dish: (dish, q, held half, replay rows of the other label, held-out and all
    non-replayed base photos of the other label outside both pairs: masks)."""
    lab = setup["lab"]
    for dish, (q, held_i) in setup["plan"].items():
        c = int(lab[q[0]])
        other = setup["replay_y"] != c
        mh, mr = setup["base_held"] & (lab != c), setup["base_rest"] & (lab != c)
        yield dish, q, held_i, other, mh, mr


def measure(
    q: np.ndarray,
    held_i: np.ndarray,
    r: np.ndarray,
    to_held: np.ndarray,
    to_mh: np.ndarray,
    to_mr: np.ndarray,
    offsets: np.ndarray,
) -> dict[str, Any]:
    """One dish's numbers from q's similarities (rows) to its held half, the held-out and
    the non-replayed other-label photos, and its ball radii r."""
    cover = np.array([np.mean(to_held[i][held_i != q[i]] > r[i]) for i in range(len(q))])
    curve_c = np.array([[np.mean(to_held[i] > r[i] - o) for o in offsets]
                        for i in range(len(q))]).mean(0)  # fmt: skip
    curve_f = np.array([[np.mean(to_mr[i] > r[i] - o) for o in offsets]
                        for i in range(len(q))]).mean(0)  # fmt: skip
    return {
        "coverage": cover.tolist(),
        "margin_held": (to_mh > (r - MARGIN)[:, None]).mean(1).tolist(),
        "margin_rest": (to_mr > (r - MARGIN)[:, None]).mean(1).tolist(),
        "r": r.tolist(),
        "curve_cover": curve_c.tolist(),
        "curve_false": curve_f.tolist(),
        "n_margin_held": int(to_mh.shape[1]),
        "n_margin_rest": int(to_mr.shape[1]),
    }


def step_a_arguments(doc: str, name: str) -> argparse.Namespace:
    """The command line of a step-A script: results/NAME.md, its cache and work folders."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--food", type=Path, default=FOOD)
    parser.add_argument("--tuning-base", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "results" / f"{name}.md")
    tmp = Path(tempfile.gettempdir())
    parser.add_argument("--cache", type=Path, default=tmp / f"eval-{name}-cache")
    parser.add_argument("--work", type=Path, default=tmp / f"eval-{name}")
    return parser.parse_args()


def step_a_header(
    title: str, script: str, plan: str, args: argparse.Namespace, results: dict[str, Any]
) -> list[str]:
    """A step-A report's title, command, replay match and dishes."""
    return [
        f"# {title}",
        "",
        f"Produced by `.venv/bin/python scripts/{script} --food {args.food} "
        f"--tuning-base {args.tuning_base} --out {args.out}` in {results['seconds']:.0f} s. "
        f"Plan: {plan} (committed before this ran); protocol in the script's docstring.",
        "",
        f"Replay set found again: {results['replay']}.",
        "",
        "Dishes: "
        + ", ".join(f"{d} ({v['q']} q, {v['held']} held)" for d, v in results["dishes"].items())
        + ".",  # fmt: skip
    ]


def main() -> None:
    args = step_a_arguments(__doc__, "memory-embeddings")
    started = time.perf_counter()
    setup = prepare(args)
    emb, thumbs, match = setup["emb"], setup["thumbs"], setup["match"]

    offsets = np.round(np.arange(-0.10, 0.401, 0.0025), 4)
    results: dict[str, Any] = {"spaces": {}, "dishes": setup["dishes"]}
    for name in SPACES:
        x = space(emb, name)
        rx = np.concatenate([space({k: v[match] for k, v in emb.items()}, name),
                             space(thumbs, name)])  # fmt: skip
        per: dict[str, Any] = {}
        for dish, q, held_i, other, mh, mr in cases(setup):
            r = (x[q] @ rx[other].T).max(axis=1)  # (Q,)
            xq = x[q]
            per[dish] = measure(q, held_i, r, xq @ x[held_i].T, xq @ x[mh].T, xq @ x[mr].T, offsets)
        results["spaces"][name] = {"dims": int(x.shape[1]), "per_dish": per}
    results["offsets"] = offsets.tolist()
    results["replay"] = setup["replay"]
    summarize(results)
    results["seconds"] = time.perf_counter() - started
    write(args, results)


def summarize(results: dict[str, Any]) -> None:
    offsets = np.array(results["offsets"])
    ref = results["spaces"]["avg"]["per_dish"]
    for s in results["spaces"].values():
        per = s["per_dish"]
        s["dish_coverage"] = {d: float(np.mean(v["coverage"])) for d, v in per.items()}
        s["dish_margin"] = {d: float(np.mean(v["margin_held"])) for d, v in per.items()}
        s["dish_margin_rest"] = {d: float(np.mean(v["margin_rest"])) for d, v in per.items()}
        s["C"] = float(np.mean([s["dish_coverage"][d] for d in TUNING]))
        s["C_check"] = float(np.mean([s["dish_coverage"][d] for d in CHECK]))
        s["M"] = float(np.mean(np.concatenate([v["margin_held"] for v in per.values()])))
        s["M_rest"] = float(np.mean(np.concatenate([v["margin_rest"] for v in per.values()])))
        s["worst_dish_coverage"] = min(s["dish_coverage"].items(), key=lambda kv: kv[1])
        s["worst_dish_margin"] = max(s["dish_margin"].items(), key=lambda kv: kv[1])
        s["r_below_0.4"] = float(np.mean(np.concatenate([np.array(v["r"]) < 0.4
                                                          for v in per.values()])))  # fmt: skip
        # Scale-free: coverage where this space's false capture (non-replayed base photos of
        # the other label) equals avg's at offset MARGIN, per dish.
        matched = {}
        at = int(np.argmin(np.abs(offsets - MARGIN)))
        for d, v in per.items():
            target = ref[d]["curve_false"][at]
            f, c = np.array(v["curve_false"]), np.array(v["curve_cover"])
            matched[d] = float(np.interp(target, f, c))  # f rises with the offset
        s["matched_coverage"] = matched
        s["C_matched"] = float(np.mean([matched[d] for d in TUNING]))
        s["C_matched_check"] = float(np.mean([matched[d] for d in CHECK]))
    avg = results["spaces"]["avg"]
    eligible = [n for n, s in results["spaces"].items() if s["M"] <= avg["M"] + 0.01]
    chosen = max(eligible, key=lambda n: (results["spaces"][n]["C"],
                                          -results["spaces"][n]["dims"]))  # fmt: skip
    s = results["spaces"][chosen]
    results["rule"] = {
        "eligible": eligible,
        "chosen": chosen,
        "gain": s["C"] - avg["C"],
        "check_gain": s["C_check"] - avg["C_check"],
        "step_b": bool(s["C"] >= avg["C"] + 0.05 and s["C_check"] >= avg["C_check"]),
    }


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    spaces = results["spaces"]
    lines = [
        *step_a_header(
            "Another embedding for the memory only: step A (geometry proxy, tuning base)",
            "eval_memory_embeddings.py",
            "results/memory-embeddings-plan.md",
            args,
            results,
        ),
        "",
        "| space | dims | coverage tuning (fruit, beignets) | coverage check (beet, sushi, "
        "pizza) | worst dish coverage | margin proxy held-out | worst dish margin | margin "
        "proxy non-replayed | coverage at avg's false capture, tuning / check | r(q) < 0.4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in spaces.items():
        dc = s["dish_coverage"]
        lines.append(
            f"| {name} | {s['dims']} | {s['C']:.3f} ({dc['fruit']:.2f}, {dc['beignets']:.2f}) "
            f"| {s['C_check']:.3f} ({dc['beet_salad']:.2f}, {dc['sushi']:.2f}, "
            f"{dc['pizza']:.2f}) | {s['worst_dish_coverage'][1]:.3f} "
            f"({s['worst_dish_coverage'][0]}) | {s['M']:.3f} | "
            f"{s['worst_dish_margin'][1]:.3f} ({s['worst_dish_margin'][0]}) | "
            f"{s['M_rest']:.3f} | {s['C_matched']:.3f} / {s['C_matched_check']:.3f} | "
            f"{s['r_below_0.4']:.2f} |"
        )
    rule = results["rule"]
    lines += [
        "",
        f"Rule: eligible (margin proxy <= avg's + 0.01): {', '.join(rule['eligible'])}. "
        f"Chosen: {rule['chosen']}, coverage gain on the tuning dishes {rule['gain']:+.3f}, "
        f"on the check dishes {rule['check_gain']:+.3f}. Step B: "
        f"{'yes' if rule['step_b'] else 'no (gain < 0.05 or a loss on the check dishes)'}.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    slim = json.loads(json.dumps(results))
    for s in slim["spaces"].values():
        for v in s["per_dish"].values():
            for key in ("curve_cover", "curve_false"):
                v[key] = [round(x, 4) for x in v[key]]
    args.out.with_suffix(".json").write_text(json.dumps(slim, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
