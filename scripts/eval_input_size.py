"""Does a 64 px photo give better frozen features at a smaller input than 224 px?

Issue 16 asks for 0.85 on 64 px photos of dishes the base never trained on; the base reads
every photo at 224 px (short side to 256, centre crop 224), so a 64 px photo is upscaled 4x
and blurred. EfficientNet-Lite0 is fully convolutional with a global pool, so it also runs
at 96, 128 or 160 px. This measures whether feeding 64 px photos at such a size helps.

    .venv-build/bin/python scripts/eval_input_size.py export   # lite0 with dynamic H and W
    .venv/bin/python scripts/eval_input_size.py run 224 128 96 160

Protocol (scripts/eval_backbones.py's settings A and B, its photos, hold-out and folds, its
linear head with the penalty chosen by 5-fold CV): full-size photos always at 224 px; every
64 px photo at S px (short side round(S*256/224), centre crop S). A: the head trained on
full-size photos; its accuracy on all 28 dishes of 64 px photos and on the 10 that B
leaves out (edamame, donuts and eval_dishes.report_dishes()' 8). B: also trained on the 64
px photos of the other 18 dishes (not held out); accuracy on the 10 left-out dishes (the
measure issue 16 asks about), on held-out 64 px photos of
the trained dishes, and on held-out full-size photos. A size would be chosen by B's
trained-held column (dishes it trained on), never by the left-out one.

Features go to /tmp/input-size/low-S.npy (64 px rows, in eval_backbones' inventory order).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = Path("/tmp/input-size")
MODEL = OUT / "lite0-dyn.onnx"


def export() -> None:
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    from export_lite import build

    backbone, wrap = build(0)
    model = wrap(backbone, False).eval()
    OUT.mkdir(exist_ok=True)
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 224, 224),),
        str(MODEL),
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {0: "batch", 2: "h", 3: "w"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def run(sizes: list[int]) -> None:
    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    import eval_backbones as eb
    from eval_dishes import report_dishes

    from healthyluncher.imaging import load
    from healthyluncher.settings import Preprocessing

    rows = eb.inventory()
    x224 = eb.features("lite0", rows)
    group = np.array([r["group"] for r in rows])
    low, full = group == "low", group == "full"
    lidx = np.flatnonzero(low)
    y = np.array([eb.LABELS.index(r["label"]) for r in rows])
    dish = np.array([r["dish"] for r in rows])
    held = np.array([r["held"] for r in rows])
    folds = np.array([r["fold"] for r in rows])
    left = np.isin(dish, sorted(set(eb.DESIGN) | set(report_dishes(eb.FOOD))))
    sess = None

    def low_features(size: int) -> np.ndarray:
        nonlocal sess
        cache = OUT / f"low-{size}.npy"
        if cache.exists():
            return np.load(cache)
        sess = sess or eb.session(MODEL)
        prep = Preprocessing(
            height=size,
            width=size,
            resize=round(size * 256 / 224),
            mean=(127.0,) * 3,
            std=(128.0,) * 3,
            layout="NCHW",
            channels=3,
        )
        out = np.zeros((len(lidx), 1280), np.float32)
        for i in range(0, len(lidx), 64):
            batch = [load(eb.FOOD / rows[j]["path"], prep).array for j in lidx[i : i + 64]]
            out[i : i + len(batch)] = sess.run(None, {"image": np.stack(batch)})[0]
        np.save(cache, out)
        return out

    def acc(head, mask) -> float:
        return float(np.mean(head.predict(x[mask]) == y[mask]))

    lines = [
        "| input size of 64 px photos | A: 28 dishes | A: 10 left out | B: 10 left out "
        "| B: held-out 64 px, trained dishes | B: held-out full size |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        t = time.perf_counter()
        x = x224.copy()
        x[lidx] = low_features(size)
        a = eb.Head(x[full & ~held], y[full & ~held], folds[full & ~held])
        train = (full | (low & ~left)) & ~held
        b = eb.Head(x[train], y[train], folds[train])
        cells = [
            acc(a, low),
            acc(a, low & left),
            acc(b, low & left),
            acc(b, low & ~left & held),
            acc(b, full & held),
        ]
        lines.append(f"| {size} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        print(lines[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    (OUT / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        export()
    else:
        run([int(s) for s in sys.argv[2:]])
