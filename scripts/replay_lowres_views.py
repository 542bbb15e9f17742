"""Experiment: the shipped base with a replay set that also holds low-resolution views.

    .venv/bin/python scripts/replay_lowres_views.py /tmp/lowview
    LUNCHER_BUNDLED_MODEL=/tmp/lowview/healthyluncher-base.onnx \
        .venv/bin/python scripts/eval_dishes.py --out results/dishes-lowres-replay.md

Writes DIR/healthyluncher-base.onnx (the shipped model, unchanged) and DIR's replay set:
the shipped replay's 400 photos (chosen as `make-updatable --examples` chooses them: the
training split by content hash, spread evenly over each label's dishes; checked to be the
shipped rows exactly) plus the same 400 photos shrunk to 64 x 64, with the same labels.
`--leave-out DISHES` does the same for a base built without those dishes (named by
LUNCHER_BUNDLED_MODEL), for `eval_dishes.py --full-size`. The question it answers: do base
examples at low resolution stop blur from predicting a user's label (the far drop of
scripts/eval_dishes.py)?
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from healthyluncher import headfit  # noqa: E402
from healthyluncher.bases import UpdatableOptions, make_updatable  # noqa: E402
from healthyluncher.embedder import Embedder  # noqa: E402
from healthyluncher.records import BUNDLED_REPLAY, bundled_model, load_base  # noqa: E402
from healthyluncher.store import ModelStore  # noqa: E402

FOOD = REPO.parent / "shared" / "food"
SUFFIXES = {".jpg", ".jpeg", ".png"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--food", type=Path, default=FOOD)
    parser.add_argument("--size", type=int, default=64, help="side of the shrunk views")
    parser.add_argument(
        "--leave-out",
        default="",
        help="the dishes the base was built without (build_base_model.py --leave-out), "
        "for a base named by LUNCHER_BUNDLED_MODEL",
    )
    args = parser.parse_args()
    shipped = bundled_model()  # LUNCHER_BUNDLED_MODEL names another base
    left_out = set(filter(None, args.leave_out.split(",")))
    assert shipped is not None
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = ModelStore(Path(scratch) / "models")
        replay = shipped.with_name(BUNDLED_REPLAY)
        make_updatable(store, shipped, UpdatableOptions(replay=replay, force=True))
        base = load_base(store, store.read_state())
        rows = []
        for index, label in enumerate(("healthy", "fast_food")):
            for path in sorted((args.food / label).rglob("*")):
                if path.suffix.lower() in SUFFIXES and path.parent.name not in left_out:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    if int(digest[:8], 16) % headfit.HOLD_OUT != 0:
                        rows.append((path, label, index, path.parent.name, digest))
        chosen = headfit._replay(
            np.array([r[2] for r in rows]),
            np.array([r[4] for r in rows]),
            np.array([r[3] for r in rows], dtype=object),
        )
        picked = [rows[int(i)] for i in chosen]
        small = []
        for i, (path, *_rest) in enumerate(picked):
            target = Path(scratch) / f"{i:04d}.png"
            with Image.open(path) as image:
                image.convert("RGB").resize((args.size, args.size), Image.BILINEAR).save(target)
            small.append(target)
        embedded, failures, _ = Embedder(store, base, 1).embed([r[0] for r in picked] + small)
        if failures:
            raise SystemExit(f"cannot read {failures[0].path}")
        inputs = np.stack([views[0] for _, _, views in embedded]).astype(np.float32)
        labels = np.array([r[1] for r in picked] * 2)
        shipped_rows = np.load(replay)["inputs"]
        same = np.array_equal(np.sort(shipped_rows, axis=0), np.sort(inputs[: len(picked)], axis=0))
        if not same:
            raise SystemExit("the chosen photos are not the shipped replay set's")
    shutil.copyfile(shipped, args.out / shipped.name)
    np.savez(args.out / BUNDLED_REPLAY, inputs=inputs, labels=labels)
    print(f"{args.out}: {len(inputs)} replay rows ({len(picked)} photos, full size and small)")


if __name__ == "__main__":
    main()
