"""Two versions of luncher side by side on one models-directory size: retrain time and disk.

    git worktree add --detach /tmp/old d26db8c
    python3 -m venv /tmp/old/.venv && /tmp/old/.venv/bin/pip install /tmp/old
    .venv/bin/python scripts/bench_scale.py --sizes 5000 --runs 1   # makes the photo pool
    .venv/bin/python scripts/ab_scale.py --old /tmp/old/.venv/bin/python --size 5000

Each version builds its own models directory from the same `--size` photos of the pool that
`scripts/bench_scale.py` makes (`--pool`), through its own API, as that bench does (batches
of 250, one label per batch, one view per photo). Then, `--runs` times, each version
retrains 5 new photos (pancakes from personal/) in a fresh copy of its directory (`cp -a`,
which keeps hard links), as a whole `luncher` process run from outside the repository (so
each version imports its own package); which version goes first alternates. It prints
medians of wall and CPU time (user + sys, which a shared machine moves less), their
ratios, and each directory's size on disk (a file with several links counted
once).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import disk_mb  # scripts/ is this script's first import path

REPO = Path(__file__).resolve().parent.parent
BUILD = """
import sys, healthyluncher
lun = healthyluncher.open(sys.argv[1])
for label in ("healthy", "fast_food"):
    mine = [p for p in sys.argv[2:] if p.endswith(label + ".jpg")]
    for i in range(0, len(mine), 250):
        lun.retrain(label, mine[i : i + 250], views=1)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the other version's python")
    parser.add_argument("--new", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "food")
    work = Path(tempfile.gettempdir()) / "luncher-scale"
    parser.add_argument("--pool", type=Path, default=work / "pool")
    parser.add_argument("--work", type=Path, default=work / "ab")
    args = parser.parse_args()
    pool = sorted(str(p) for p in args.pool.glob("*.jpg"))[: args.size]
    if len(pool) < args.size:
        raise SystemExit(f"{args.pool} holds {len(pool)} photos; run scripts/bench_scale.py")
    pancakes = sorted(str(p) for p in (args.photos / "personal" / "pancakes").iterdir())
    versions = {"old": args.old, "new": args.new}
    env = {k: v for k, v in os.environ.items() if k != "LUNCHER_MODELS_DIR"}
    built = {}
    for name, python in versions.items():
        built[name] = args.work / f"{name}-{args.size}"
        shutil.rmtree(built[name], ignore_errors=True)
        built[name].parent.mkdir(parents=True, exist_ok=True)
        command = [python, "-c", BUILD, str(built[name]), *pool]
        subprocess.run(command, check=True, env=env, cwd=tempfile.gettempdir())
    times: dict[str, list[float]] = {name: [] for name in versions}
    cpu: dict[str, list[float]] = {name: [] for name in versions}
    for r in range(args.runs):
        order = list(versions.items())
        for name, python in order if r % 2 == 0 else order[::-1]:
            copy = args.work / f"run-{name}"
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["cp", "-a", str(built[name]), str(copy)], check=True)
            photos = pancakes[5 * r : 5 * r + 5]
            command = [python, "-m", "healthyluncher", "retrain", "--label", "healthy", *photos]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(
                command,
                check=True,
                capture_output=True,
                env={**env, "LUNCHER_MODELS_DIR": str(copy)},
                cwd=tempfile.gettempdir(),
            )
            times[name].append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    for name in versions:
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(
            f"{args.size} examples, {name}: retrain 5 photos median "
            f"{statistics.median(times[name]):.3f} s ({runs}), CPU "
            f"{statistics.median(cpu[name]):.3f} s; "
            f"models directory {disk_mb(built[name]):.0f} MB"
        )
    ratio = statistics.median(times["new"]) / statistics.median(times["old"])
    cpu_ratio = statistics.median(cpu["new"]) / statistics.median(cpu["old"])
    print(f"new / old: {ratio:.3f}x (CPU {cpu_ratio:.3f}x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
