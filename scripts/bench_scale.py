"""Years of lunches: what a models directory with 100, 1,000 or 5,000 examples costs.

    .venv/bin/python scripts/bench_scale.py --photos ../shared/food --out bench-results/scale.md

For each size N the bench builds its own models directory as a user would: N augmented
copies of the shared photos (random crop, mirror, colour jitter, each a new JPEG with its
own content hash) taught through the public API in batches of 250, one label per batch.
Then it times whole `luncher` processes, side by side for every size (ascending, then
descending, turn about), `--runs` times, and reports medians:

- `retrain --label healthy` of 5 new photos (pancakes from personal/, which the base calls
  fast food), then whether all 5 took the label (their "after" probability above 0.5);
- `predict` of 200 other photos, against `predict --base` of the same photos (the base's
  own time, measured in the same run);
- `status`, `undo` (of that retrain), `export` (time and archive size);
- the models directory's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import healthyluncher  # noqa: E402

SUFFIXES = {".jpg", ".jpeg", ".png"}
BATCH = 250
LUNCHER = [sys.executable, "-m", "healthyluncher"]


def sources(food: Path) -> list[tuple[Path, str]]:
    found = []
    for label in ("healthy", "fast_food"):
        for root in (food / label, food / "lowres64" / label):
            found += [(p, label) for p in sorted(root.rglob("*")) if p.suffix.lower() in SUFFIXES]
    order = np.random.default_rng(0).permutation(len(found))
    return [found[i] for i in order]


def augmented(source: Path, target: Path, rng: np.random.Generator) -> None:
    with Image.open(source) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = rng.uniform(0.7, 1.0)
        w, h = max(16, int(width * scale)), max(16, int(height * scale))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = image.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
        image.thumbnail((320, 320))
        image.save(target, quality=88)


def make_pool(food: Path, count: int, folder: Path) -> list[tuple[Path, str]]:
    """`count` augmented photos (made once, reused by every size)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = sources(food)
    rng = np.random.default_rng(1)
    made = []
    for i in range(count):
        source, label = pool[i % len(pool)]
        target = folder / f"{i:05d}-{label}.jpg"
        if not target.exists():
            augmented(source, target, rng)
        made.append((target, label))
    return made


def build(models: Path, photos: list[tuple[Path, str]]) -> float:
    """Teach the photos through the API, BATCH at a time, one label per batch."""
    started = time.perf_counter()
    lun = healthyluncher.open(models)
    for label in ("healthy", "fast_food"):
        mine = [p for p, lab in photos if lab == label]
        for i in range(0, len(mine), BATCH):
            lun.retrain(label, mine[i : i + BATCH], views=1)
    return time.perf_counter() - started


def run(command: list[str], models: Path) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of one whole luncher process."""
    env = dict(os.environ, LUNCHER_MODELS_DIR=str(models))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(LUNCHER + command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0,):
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.stdout


def disk_mb(folder: Path) -> float:
    """Every file's bytes, a file with several hard links counted once (as `du`)."""
    sizes = {}
    for path in folder.rglob("*"):
        if path.is_file():
            info = path.stat()
            sizes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(sizes.values()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "food")
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "luncher-scale")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "scale.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    pool = make_pool(args.photos, max(sizes), args.work / "pool")
    pancakes = sorted(p for p in (args.photos / "personal" / "pancakes").iterdir())
    probe = [p for p, _ in sources(args.photos)[-200:]]  # never in any pool below 6,000
    dirs: dict[int, Path] = {}
    built: dict[int, float] = {}
    for size in sizes:
        models = args.work / f"models-{size}"
        shutil.rmtree(models, ignore_errors=True)
        built[size] = build(models, pool[:size])
        dirs[size] = models
        print(f"built {size} examples in {built[size]:.0f} s", flush=True)
    keys = ("retrain5", "predict200", "predict200_base", "status", "undo", "export")
    samples: dict[int, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in sizes}
    took: dict[int, list[int]] = {s: [] for s in sizes}
    export_mb: dict[int, float] = {}
    for r in range(args.runs):
        new = [str(p) for p in pancakes[5 * r : 5 * r + 5]]
        # Side by side: every size in each run, the order reversed every other run (the
        # first process of a run reads the new photos from disk for the others).
        for size in sizes if r % 2 == 0 else sizes[::-1]:
            models = dirs[size]
            wall, _, out = run(["retrain", "--label", "healthy", "--json", *new], models)
            samples[size]["retrain5"].append(wall)
            summary = json.loads(out.splitlines()[0])
            took[size].append(sum(p["after"] > 0.5 for p in summary["photos"]))
            paths = [str(p) for p in probe]
            samples[size]["predict200"].append(run(["predict", "--json", *paths], models)[0])
            base = run(["predict", "--base", "--json", *paths], models)[0]
            samples[size]["predict200_base"].append(base)
            samples[size]["status"].append(run(["status", "--json"], models)[0])
            archive = args.work / f"export-{size}.tar.gz"
            archive.unlink(missing_ok=True)
            samples[size]["export"].append(run(["export", str(archive)], models)[0])
            export_mb[size] = archive.stat().st_size / 1e6
            samples[size]["undo"].append(run(["undo"], models)[0])
            latest = {k: v[-1] for k, v in samples[size].items()}
            print(f"run {r + 1} size {size}: {json.dumps(latest)}", flush=True)
    report: dict[str, Any] = {"sizes": sizes, "runs": args.runs, "rows": {}}
    for size in sizes:
        med = {k: statistics.median(v) for k, v in samples[size].items()}
        report["rows"][size] = {
            **{k: round(v, 3) for k, v in med.items()},
            "took_label": f"{sum(took[size])}/{5 * args.runs}",
            "export_mb": round(export_mb[size], 1),
            "disk_mb": round(disk_mb(dirs[size]), 1),
            "build_s": round(built[size], 1),
        }
    write(args, report)


def write(args: argparse.Namespace, report: dict[str, Any]) -> None:
    sizes = report["sizes"]
    rows = report["rows"]
    first = rows[sizes[0]]
    lines = [
        "# Scale: models directories with many examples",
        "",
        f"Produced by `python scripts/bench_scale.py --sizes {args.sizes} --runs {args.runs}`"
        " (whole `luncher` processes, every size in each run, medians).",
        "",
        "| examples | retrain 5 photos (s) | vs smallest | 5 new photos took the label | "
        "predict 200 (s) | vs the base's predict | status (s) | undo (s) | export (s) | "
        "archive (MB) | models dir (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        r = rows[size]
        lines.append(
            f"| {size} | {r['retrain5']:.2f} | {r['retrain5'] / first['retrain5']:.2f}x | "
            f"{r['took_label']} | {r['predict200']:.2f} | "
            f"{r['predict200'] / r['predict200_base']:.2f}x | {r['status']:.2f} | "
            f"{r['undo']:.2f} | {r['export']:.2f} | {r['export_mb']} | {r['disk_mb']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
