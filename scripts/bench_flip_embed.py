"""The cost of test-time flip averaging: one photo's head input with and without its mirror.

    .venv/bin/python scripts/bench_flip_embed.py --base /tmp/lobase-w-report

Through the library's own pipeline, per photo: read the file (photos.read_bytes),
imaging.decode, imaging.resize_and_crop, imaging.to_tensor, then the embedder's frozen part
(Embedder._run_frozen) on a batch of one (plain) or of two, the tensor and the tensor
flipped along its width axis, whose head inputs are averaged (flip). 50 full-size photos of
../shared/food (evenly spaced in the sorted list of healthy/ and fast_food/), both ways
measured photo by photo in one run, interleaved (the order alternating per photo), after a
warm-up of 3 photos; the median of each, for the whole pipeline and for the frozen part
alone. A fresh models directory under --work holds the base set up as eval_dishes.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from eval_dishes import stores  # type: ignore[import-not-found]  # noqa: E402

from healthyluncher import imaging  # noqa: E402
from healthyluncher.embedder import Embedder  # noqa: E402
from healthyluncher.photos import read_bytes  # noqa: E402
from healthyluncher.records import BUNDLED_MODEL, load_base  # noqa: E402
from healthyluncher.settings import Hyperparameters  # noqa: E402

PHOTOS, WARM = 50, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--food", type=Path, default=REPO.parent / "shared" / "food")
    parser.add_argument("--base", type=Path, required=True, help="a base model directory")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-flip")
    parser.add_argument("--out", type=Path, help="the timings as JSON")
    args = parser.parse_args()
    os.environ["LUNCHER_BUNDLED_MODEL"] = str(args.base / BUNDLED_MODEL)
    store = stores(args.work, 1, Hyperparameters())[0]
    base = load_base(store, store.read_state())
    prep = base.meta.preprocessing
    width = -1 if prep.layout == "NCHW" else -2
    embedder = Embedder(store, base, 1)
    every = sorted(p for label in ("healthy", "fast_food") for p in (args.food / label).rglob("*")
                   if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))  # fmt: skip
    if len(every) < PHOTOS + WARM:
        raise SystemExit(f"{args.food}: fewer than {PHOTOS + WARM} photos in healthy/, fast_food/")
    chosen = [every[i] for i in np.linspace(0, len(every) - 1, PHOTOS + WARM).astype(int)]

    def once(path: Path, flip: bool) -> tuple[float, float, np.ndarray]:
        started = time.perf_counter()
        image = imaging.decode(read_bytes(path), prep, name=str(path))
        pixels = imaging.to_tensor(imaging.resize_and_crop(image, prep), prep)[None]
        frozen = time.perf_counter()
        if flip:
            pixels = np.concatenate([pixels, np.flip(pixels, axis=width)])
        feats = embedder._run_frozen(np.ascontiguousarray(pixels)).reshape(len(pixels), -1)
        ended = time.perf_counter()
        return ended - started, ended - frozen, feats.mean(axis=0)

    times: dict[str, list[list[float]]] = {"plain": [], "flip": []}
    for i, path in enumerate(chosen):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {flip: once(path, flip) for flip in order}
        if i >= WARM:
            times["plain"].append(list(got[False][:2]))
            times["flip"].append(list(got[True][:2]))
    med = {k: np.median(np.array(v), axis=0) * 1000 for k, v in times.items()}
    print("| per photo (median of 50, ms) | whole pipeline | frozen part alone |")
    print("|---|---:|---:|")
    for k in ("plain", "flip"):
        print(f"| {k} | {med[k][0]:.1f} | {med[k][1]:.1f} |")
    ratio = med["flip"] / med["plain"]
    print(f"| flip / plain | {ratio[0]:.2f} | {ratio[1]:.2f} |")
    if args.out:
        summary = {
            k: {"pipeline_ms": float(v[0]), "frozen_ms": float(v[1])} for k, v in med.items()
        }
        args.out.write_text(json.dumps({"median": summary, "photos": PHOTOS, **times}) + "\n")


if __name__ == "__main__":
    main()
