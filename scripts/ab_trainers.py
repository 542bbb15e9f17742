"""A cached retrain, timed side by side with each trainer: numpy against ONNX Runtime.

    python scripts/ab_trainers.py PHOTOS_DIR [--pairs 40] [--epochs 10]

Sets up a scratch models directory from the shipped base, retrains the photos once (so that
every later retrain finds them in the cache), then runs `luncher retrain --label LABEL
--epochs E PHOTOS_DIR` as whole processes, LABEL fast_food and healthy in turn (taught again
with the label they have, the photos would change nothing and nothing would be retrained),
alternating LUNCHER_TRAINER=onnxruntime and =numpy (which goes first alternates too), and
reports medians and paired ratios. Compile the bytecode first (`python -m compileall
healthyluncher`) as `pip install` does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    luncher = shutil.which("luncher", path=str(Path(sys.executable).parent))
    if luncher is None:
        sys.exit("luncher is not installed in this environment")
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, LUNCHER_MODELS_DIR=str(Path(scratch) / "models"))

        def command(label: str) -> list[str]:
            return [luncher, "retrain", "--label", label, "--epochs", str(args.epochs), photos]

        photos = str(args.photos)
        subprocess.run(command("healthy"), env=env, check=True, stdout=subprocess.DEVNULL)
        wall: dict[str, list[float]] = {"onnxruntime": [], "numpy": []}
        labels = iter(["fast_food", "healthy"] * args.pairs)  # a change every time
        for i in range(args.pairs):
            for trainer in ("numpy", "onnxruntime") if i % 2 else ("onnxruntime", "numpy"):
                start = time.perf_counter()
                subprocess.run(
                    command(next(labels)),
                    env=dict(env, LUNCHER_TRAINER=trainer),
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                wall[trainer].append(time.perf_counter() - start)
    ratios = [n / o for n, o in zip(wall["numpy"], wall["onnxruntime"], strict=True)]
    for trainer, times in wall.items():
        print(f"{trainer}: median {statistics.median(times):.3f} s, min {min(times):.3f} s")
    faster = sum(r < 1 for r in ratios)
    print(
        f"numpy / onnxruntime, paired: median {statistics.median(ratios):.2f}x, "
        f"mean {statistics.mean(ratios):.2f}x, worst {max(ratios):.2f}x; "
        f"numpy faster in {faster} of {len(ratios)} pairs"
    )


if __name__ == "__main__":
    main()
