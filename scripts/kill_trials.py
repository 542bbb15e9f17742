"""kill -9 at many moments: the real `luncher` command, the shipped base, real timing.

    python scripts/kill_trials.py [--trials 100] [--seed 0]      # random moments
    python scripts/kill_trials.py --sweep 12                     # 12 moments per command
    python scripts/kill_trials.py --trials 0 --concurrent 40     # two commands at once

`tests/test_crash_consistency.py` kills every command before each of its write steps, on a
tiny model. This script does what a user's machine does instead: it starts a real `luncher`
process (retrain, a new label, forget, undo, reset, reset --purge, import, labels rename,
labels remove, export, make-updatable --keep-personalization and --force with a second
base) on a models directory set up from the shipped base, sends it SIGKILL after a delay
between the start-up and the end of that command (as timed on an uninterrupted run): a
random one (`--trials`), or `--sweep N` evenly spaced ones per command. It checks the same
things as the test suite: the old or the new state, exactly; no example without its
thumbnail; `predict` works and gives the old or the new probabilities; after the next
command, nothing left over. An export must
leave either no archive or a complete one, and after the next export nothing beside it.

`--concurrent N` starts two commands at once (two retrains, a retrain during an import,
an export during a forget...), and in half the trials kills one of them at a random moment:
the other must end as it would alone (the lock is never left held), no example taught by a
command that succeeded may be lost, and the directory must pass the same checks. Prints a
table and exits 1 on any failure.
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
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from healthyluncher.photos import digest_of  # noqa: E402
from tests.models import pytorch_style  # noqa: E402
from tests.test_crash_consistency import (  # noqa: E402
    _check_after_crash,
    _check_cleaned,
    _kept_digests,
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
    "labels rename": ["labels", "rename", "soup", "soups"],
    "labels remove": ["labels", "remove", "soup"],
    "export": ["export", "{export}"],
    "make-updatable --keep-personalization": [
        "make-updatable",
        "{other_model}",
        "--keep-personalization",
    ],
    "make-updatable --force": ["make-updatable", "{other_model}", "--force"],
}
# Pairs started at once by --concurrent (the second a moment after the first).
PAIRS = [
    ("retrain", "new label"),
    ("retrain", "import"),
    ("import", "retrain"),
    ("forget", "export"),
    ("export", "retrain"),
    ("undo", "retrain"),
    ("labels rename", "new label"),
    ("reset", "import"),
    ("make-updatable --keep-personalization", "retrain"),
    ("import", "import"),
]


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


def start(models_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "LUNCHER_MODELS_DIR": str(models_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "healthyluncher", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def predictions(models_dir: Path, probes: list[Path]) -> np.ndarray:
    """What the models directory says about the probe photos, label by label."""
    import healthyluncher

    found = healthyluncher.open(str(models_dir)).predict(probes)
    return np.array([[p.probabilities[x] for x in sorted(p.probabilities)] for p in found])


class World:
    """The starting models directory, the inputs of every command, and their outcomes."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.red, self.green = photos(work / "red", 4, 1), photos(work / "green", 4, 2)
        self.soup = photos(work / "soup", 2, 3)
        self.start = work / "start"
        luncher(self.start, "retrain", "--label", "fast_food", *map(str, self.red))
        luncher(self.start, "retrain", "--label", "healthy", str(self.green[0]))
        self.backup = work / "backup.tar.gz"
        luncher(self.start, "export", str(self.backup))
        luncher(self.start, "retrain", "--label", "soup", "--new-label", *map(str, self.soup))
        self.values = {
            "red": [str(p) for p in self.red[:2]],
            "green": [str(p) for p in self.green[1:3]],
            "red0": [str(self.red[0])],
            "backup": [str(self.backup)],
            "other_model": [str(pytorch_style(work / "other.onnx", seed=5))],
        }
        self.probes = [self.red[0], self.green[1], self.soup[0]]
        self.before = _snapshot(self.start)
        self.predicted = {self.before: predictions(self.start, self.probes)}
        # Each command once, to its end: the new state, and how long it takes.
        self.outcome: dict[str, tuple[tuple[Any, ...], float]] = {}
        for name in COMMANDS:
            clean = work / "clean" / name.replace(" ", "_")
            shutil.copytree(self.start, clean)
            began = time.perf_counter()
            done = luncher(clean, *self.argv(name, clean.parent / "export.tar.gz"), check=False)
            assert done.returncode == 0, (name, done.stderr)
            self.outcome[name] = (_snapshot(clean), time.perf_counter() - began)
            self.predicted[self.outcome[name][0]] = predictions(clean, self.probes)
        # Starting Python and importing take a good part of each command, and a kill then
        # proves little: the kills fall between the start-up (measured with `status`,
        # which only imports and reads) and the end of the command.
        began = time.perf_counter()
        luncher(self.start, "status")
        self.startup = time.perf_counter() - began

    def argv(self, name: str, export: Path) -> list[str]:
        out: list[str] = []
        for part in COMMANDS[name]:
            key = part.strip("{}")
            if part == "{export}":
                out.append(str(export))
            else:
                out.extend(self.values[key] if part.startswith("{") else [part])
        return out

    def window(self, name: str) -> tuple[float, float]:
        seconds = self.outcome[name][1]
        return min(self.startup, seconds) * 0.8, seconds


def check_export(target: Path, models_dir: Path) -> None:
    """No archive or a complete one; the next export leaves nothing else beside it."""
    from healthyluncher.archive import read_backup

    if target.exists():
        with tempfile.TemporaryDirectory() as scratch:
            read_backup(target, Path(scratch))  # raises on a torn or damaged archive
    again = target.with_name("again.tar.gz")
    done = luncher(models_dir, "export", str(again), check=False)
    assert done.returncode == 0, done.stderr
    left = {p.name for p in target.parent.iterdir()} - {target.name, again.name, "models"}
    assert not left, f"left beside the archive: {sorted(left)}"


def killed_trial(world: World, name: str, delay: float, models: Path) -> str:
    """One command killed after `delay` seconds; 'old', 'new' or 'FAILED: ...'."""
    shutil.copytree(world.start, models)
    export = models.parent / "export.tar.gz"
    process = start(models, *world.argv(name, export))
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    after = world.outcome[name][0]
    try:
        probe = world.red[0]
        _check_after_crash(models, world.before, after, probe)
        if name == "export":
            check_export(export, models)
        repaired = luncher(models, "repair", check=False)
        assert repaired.returncode == 0, repaired.stderr
        _check_after_crash(models, world.before, after, probe)
        state = _snapshot(models)
        forgotten = set()
        if name == "forget" and state == after:
            forgotten = {digest_of(probe.read_bytes())}
        _check_cleaned(models, forgotten)
        now, expected = predictions(models, world.probes), world.predicted[state]
        assert now.shape == expected.shape and np.allclose(now, expected, atol=1e-6), (
            f"predictions {now.round(4).tolist()}, not {expected.round(4).tolist()}"
        )
        return "old" if state == world.before else "new"
    except AssertionError as exc:
        return f"FAILED: {exc}"


def taught_by(world: World, name: str) -> set[str]:
    """The digests a command that succeeded must leave among the examples, whatever ran
    beside it (a retrain's photos; none for commands that replace or remove examples)."""
    if name in ("retrain", "new label"):
        key = "red" if name == "retrain" else "green"
        return {digest_of(Path(p).read_bytes()) for p in world.values[key]}
    return set()


def concurrent_trial(world: World, pair: tuple[str, str], kill: bool, rng: random.Random) -> str:
    """Two commands at once, one of them killed if `kill`; 'ok' or 'FAILED: ...'."""
    models = world.work / "concurrent" / "models"
    shutil.rmtree(models.parent, ignore_errors=True)
    shutil.copytree(world.start, models)
    exports = [models.parent / f"export{i}.tar.gz" for i in range(2)]
    first = start(models, *world.argv(pair[0], exports[0]))
    time.sleep(rng.uniform(0, 0.5))
    second = start(models, *world.argv(pair[1], exports[1]))
    victim = rng.randrange(2) if kill else None
    if victim is not None:
        low, high = world.window(pair[victim])
        time.sleep(rng.uniform(low, high))
        (first, second)[victim].send_signal(signal.SIGKILL)
    results = [process.communicate(timeout=300) for process in (first, second)]
    codes = [first.returncode, second.returncode]
    try:
        survivors = [i for i in range(2) if i != victim]
        for i in survivors:
            assert codes[i] == 0, f"{pair[i]} failed beside {pair[1 - i]}: {results[i][1]}"
        examples = {d for d, _ in _snapshot(models)[2]}
        # A later command of the pair may remove what an earlier one taught: only a pair
        # of retrains must keep both.
        if all(name in ("retrain", "new label") for name in pair):
            for i in survivors:
                lost = taught_by(world, pair[i]) - examples
                assert not lost, f"{pair[i]}'s photos were lost: {sorted(lost)}"
        _check_after_crash(models, _snapshot(models), _snapshot(models), world.red[0])
        repaired = luncher(models, "repair", check=False)
        assert repaired.returncode == 0, repaired.stderr
        _check_cleaned(models, set())
        assert _kept_digests(models) >= examples
        for export in exports:
            if export.exists():
                check_export(export, models)
        return "ok"
    except AssertionError as exc:
        return f"FAILED: {exc}"


def report(title: str, results: dict[str, list[str]], columns: list[str]) -> int:
    print(title)
    print("| trial | count | " + " | ".join(columns) + " | failures |")
    print("|---|---:|" + "---:|" * len(columns) + "---:|")
    failures = 0
    for name, marks in results.items():
        failed = [m for m in marks if m.startswith("FAILED")]
        failures += len(failed)
        counts = " | ".join(str(marks.count(c)) for c in columns)
        print(f"| {name} | {len(marks)} | {counts} | {len(failed)} |")
        for message in failed[:2]:
            print("   ", message)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="random kills in all")
    parser.add_argument("--sweep", type=int, default=0, help="evenly spaced kills per command")
    parser.add_argument("--concurrent", type=int, default=0, help="trials of two commands")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        world = World(Path(scratch))
        results: dict[str, list[str]] = {name: [] for name in COMMANDS}
        plan = [
            (name, rng.uniform(*world.window(name)))
            for name in (rng.choice(list(COMMANDS)) for _ in range(args.trials))
        ]
        for name in COMMANDS:
            low, high = world.window(name)
            steps = max(args.sweep - 1, 1)
            plan += [(name, low + (high - low) * i / steps) for i in range(args.sweep)]
        for trial, (name, delay) in enumerate(plan):
            models = world.work / f"trial{trial}" / "models"
            results[name].append(killed_trial(world, name, delay, models))
            shutil.rmtree(models.parent, ignore_errors=True)
        if plan:
            title = f"{len(plan)} kill -9 trials (seed {args.seed}, sweep {args.sweep}):"
            failures += report(title, results, ["old", "new"])
        together: dict[str, list[str]] = {}
        for trial in range(args.concurrent):
            pair = PAIRS[trial % len(PAIRS)]
            kill = trial // len(PAIRS) % 2 == 1
            key = f"{pair[0]} + {pair[1]}" + (", one killed" if kill else "")
            together.setdefault(key, []).append(concurrent_trial(world, pair, kill, rng))
        if together:
            failures += report(f"{args.concurrent} concurrent trials:", together, ["ok"])
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
