"""Readers against writers: predicts while retrain, undo, forget and reset switch the state.

    python scripts/reader_race.py [--predicts 500]

One process cycles `retrain`, `undo`, `retrain`, `forget` and `reset` + `undo` on the
shipped base in a scratch models directory, as fast as it can; this process meanwhile loads
the current model and predicts, `--predicts` times, as every `luncher predict` does. A
writer removes the directories of the state it replaced right after switching, so a reader
that read state.json just before may find them gone. Prints how many predicts failed, with
the first errors; exits 1 if any did.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def photos(folder: Path, count: int, seed: int) -> list[Path]:
    """Textured synthetic photos (the race does not depend on what they show)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        path = folder / f"{seed}-{i}.png"
        Image.fromarray(pixels).save(path)
        made.append(path)
    return made


def writer(models_dir: str, work: str, stop: multiprocessing.synchronize.Event) -> None:
    import healthyluncher

    lun = healthyluncher.open(models_dir)
    first = photos(Path(work) / "a", 2, 1)
    second = photos(Path(work) / "b", 2, 2)
    while not stop.is_set():
        lun.retrain("healthy", first, epochs=1, views=1)
        lun.undo()
        lun.retrain("fast_food", second, epochs=1, views=1)
        lun.forget(second[:1])
        lun.reset()
        lun.undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predicts", type=int, default=500)
    args = parser.parse_args()
    import healthyluncher
    from healthyluncher.errors import LuncherError
    from healthyluncher.predictor import Predictor
    from healthyluncher.store import ModelStore

    with tempfile.TemporaryDirectory() as scratch:
        models_dir = str(Path(scratch) / "models")
        lun = healthyluncher.open(models_dir)
        probe = photos(Path(scratch) / "probe", 1, 3)
        lun.retrain("healthy", probe, epochs=1, views=1)  # sets the shipped base up
        stop = multiprocessing.Event()
        process = multiprocessing.Process(target=writer, args=(models_dir, scratch, stop))
        process.start()
        store = ModelStore(Path(models_dir))
        failures: list[str] = []
        start = time.perf_counter()
        try:
            for _ in range(args.predicts):
                try:
                    Predictor(store).predict(probe).__next__()
                except (LuncherError, OSError) as exc:
                    failures.append(str(exc))
        finally:
            stop.set()
            process.join(timeout=120)
        seconds = time.perf_counter() - start
    print(
        f"{args.predicts} predicts in {seconds:.0f} s during retrain/undo/forget/reset "
        f"cycles: {len(failures)} failed"
    )
    for message in failures[:3]:
        print("  " + message)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
