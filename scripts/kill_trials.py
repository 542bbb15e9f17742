"""kill -9 at random moments: the real `luncher` command, the shipped base, real timing.

    python scripts/kill_trials.py [--trials 100] [--seed 0]

`tests/test_crash_consistency.py` kills every command before each of its write steps, on a
tiny model. This script does what a user's machine does instead: it starts a real `luncher`
process (retrain, a new label, forget, undo, reset, reset --purge, import) on a models
directory set up from the shipped base (the test suite also covers import --rebuild and
make-updatable, which need a second base),
sends it SIGKILL after a random delay between the start-up and the end of that command
(as timed on an uninterrupted run), and checks the
same things as the test suite (the old or the new state, exactly; no example without its
thumbnail; `predict` works; after the next command, nothing left over). Prints a table per
command and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_crash_consistency import (  # noqa: E402
    _check_after_crash,
    _check_cleaned,
    _snapshot,
)

COMMANDS = {
    "retrain": ["retrain", "--label", "healthy", "{red}"],
    "new label": ["retrain", "--label", "dessert", "--new-label", "{green}"],
    "forget": ["forget", "{red0}"],
    "undo": ["undo"],
    "reset": ["reset", "--yes"],
    "reset --purge": ["reset", "--purge", "--yes"],
    "import": ["import", "{backup}"],
}


def photos(folder: Path, count: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 40, (120, 160, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{seed}-{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        made.append(path)
    return made


def luncher(models_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LUNCHER_MODELS_DIR": str(models_dir)}
    command = [sys.executable, "-m", "healthyluncher", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        red, green = photos(work / "red", 4, 1), photos(work / "green", 4, 2)
        start = work / "start"
        luncher(start, "retrain", "--label", "fast_food", *map(str, red))
        luncher(start, "retrain", "--label", "healthy", str(green[0]))
        backup = work / "backup.tar.gz"
        luncher(start, "export", str(backup))
        values = {
            "red": [str(p) for p in red[:2]],
            "green": [str(p) for p in green[1:3]],
            "red0": [str(red[0])],
            "backup": [str(backup)],
        }

        def argv(name: str) -> list[str]:
            out: list[str] = []
            for part in COMMANDS[name]:
                key = part.strip("{}")
                out.extend(values[key] if part.startswith("{") else [part])
            return out

        # Each command once, to its end: the new state, and how long it takes.
        outcome: dict[str, tuple[tuple[object, ...], float]] = {}
        for name in COMMANDS:
            clean = work / "clean" / name.replace(" ", "_")
            shutil.copytree(start, clean)
            began = time.perf_counter()
            luncher(clean, *argv(name))
            outcome[name] = (_snapshot(clean), time.perf_counter() - began)
        # Starting Python and importing take a good part of each command, and a kill then
        # proves little: the kills fall between the start-up (measured with `status`,
        # which only imports and reads) and the end of the command.
        began = time.perf_counter()
        luncher(start, "status")
        startup = time.perf_counter() - began
        before = _snapshot(start)
        results: dict[str, list[str]] = {name: [] for name in COMMANDS}
        for trial in range(args.trials):
            name = rng.choice(list(COMMANDS))
            after, seconds = outcome[name]
            models = work / f"trial{trial}"
            shutil.copytree(start, models)
            env = {**os.environ, "LUNCHER_MODELS_DIR": str(models)}
            process = subprocess.Popen(
                [sys.executable, "-m", "healthyluncher", *argv(name)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(min(startup, seconds) * 0.8, seconds))
            process.send_signal(signal.SIGKILL)
            process.wait()
            try:
                _check_after_crash(models, before, after, red[0])
                repaired = luncher(models, "repair", check=False)
                assert repaired.returncode == 0, repaired.stderr
                _check_after_crash(models, before, after, red[0])
                state = _snapshot(models)
                forgotten = set()
                if name == "forget" and state == after:
                    from healthyluncher.photos import digest_of

                    forgotten = {digest_of(red[0].read_bytes())}
                _check_cleaned(models, forgotten)
                results[name].append("old" if state == before else "new")
            except AssertionError as exc:
                results[name].append(f"FAILED: {exc}")
            shutil.rmtree(models, ignore_errors=True)
    failures = 0
    print(f"{args.trials} kill -9 trials (seed {args.seed}):")
    print("| command | trials | killed before the switch | after it | failures |")
    print("|---|---:|---:|---:|---:|")
    for name, marks in results.items():
        failed = [m for m in marks if m.startswith("FAILED")]
        failures += len(failed)
        print(
            f"| {name} | {len(marks)} | {marks.count('old')} | {marks.count('new')} "
            f"| {len(failed)} |"
        )
        for message in failed[:2]:
            print("   ", message)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
