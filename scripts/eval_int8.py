"""Measure `make-updatable --int8` on the shipped base: held-out accuracy and predict speed.

Run from the repository root (needs ../shared/food):

    .venv/bin/python scripts/eval_int8.py

Two models directories are made in a temporary directory with the real CLI: the shipped
base as it is (fp32), and the same file with `--int8 --calibration DIR`, where DIR links to
100 photos of the training split (the model card's split: make-updatable --examples held out
the photos whose content hash is 0 mod 5; the 100 are drawn with seed 0).
Then, for the held-out full-size photos in ../shared/food/{healthy,fast_food}/*/:

- accuracy: the labels `luncher predict --json` prints, against the photo's folder;
- speed: the wall time of whole `luncher predict --json PHOTO...` processes, one untimed
  warm-up each (so both read the photos from the page cache), then --runs rounds with
  fp32 and int8 side by side, alternating which goes first; the median is reported;
- the accuracy of int8 bases calibrated on other draws of 100 photos (--draws), since a
  change of one or two photos out of 291 may be the draw's rather than int8's.

Writes results/int8.md and results/int8.json (see --out). The photos are linked from the
temporary directory, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from healthyluncher.photos import find_images  # noqa: E402

FOOD = REPO.parent / "shared" / "food"
MODEL = REPO / "models" / "healthyluncher-base.onnx"
LABELS = ("healthy", "fast_food")
LUNCHER = Path(sys.executable).parent / "luncher"
# The decision rule of issue 6: int8 becomes the default only if predict is at least this
# much faster and held-out accuracy drops by at most this many points.
MIN_SPEEDUP = 1.5
MAX_ACCURACY_DROP_POINTS = 0.5


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str


def food_photos(food: Path) -> tuple[list[Photo], list[Photo]]:
    """(training split, held out) of the full-size photos, each in sorted order."""
    from build_base_model import held_out  # type: ignore[import-not-found]

    train: list[Photo] = []
    held: list[Photo] = []
    for label in LABELS:
        for path in find_images([food / label]):
            (held if held_out(path) else train).append(Photo(path, label))
    return train, held


def luncher(models_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LUNCHER_MODELS_DIR=str(models_dir))
    command = [str(LUNCHER), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed:\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # user + system seconds of the process: less sensitive to a busy machine


def timed_predict(models_dir: Path, photos: list[Photo]) -> tuple[Timing, dict[str, Any]]:
    """Time one whole `luncher predict --json` process; its rows by path."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = luncher(models_dir, "predict", "--json", *(p.path for p in photos))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return Timing(elapsed, cpu), {row["path"]: row for row in rows}


def calibration_dir(work: Path, train: list[Photo], count: int, seed: int) -> Path:
    """A directory linking to `count` training-split photos drawn with `seed`."""
    rng = np.random.default_rng(seed)
    folder = work / f"calibration-{seed}"
    folder.mkdir()
    for index in rng.choice(len(train), count, replace=False):
        photo = train[index]
        link = folder / f"{photo.label}-{photo.path.parent.name}-{photo.path.name}"
        link.symlink_to(photo.path)
    return folder


def scored(rows: dict[str, Any], truth: dict[str, str], name: str) -> int:
    """How many held-out photos predict labels correctly."""
    if set(rows) != set(truth):
        raise SystemExit(f"{name}: predict did not answer for every held-out photo")
    return sum(rows[path]["label"] == label for path, label in truth.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--food", type=Path, default=FOOD, help="The food photos.")
    parser.add_argument("--model", type=Path, default=MODEL, help="The base model.")
    parser.add_argument("--calibration", type=int, default=100, help="Calibration photos.")
    parser.add_argument("--runs", type=int, default=3, help="Timed predict runs of each.")
    parser.add_argument(
        "--draws", type=int, default=4, help="Calibration draws scored (seeds 0..N-1; 0 is timed)."
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "int8", help="No suffix.")
    args = parser.parse_args(argv)

    train, held = food_photos(args.food)
    truth = {str(p.path): p.label for p in held}
    variants = ("fp32", "int8")
    setup_seconds: dict[str, float] = {}
    timings: dict[str, list[Timing]] = {name: [] for name in variants}
    outputs: dict[str, dict[str, Any]] = {}
    draws: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="luncher-int8-eval-") as tmp:
        work = Path(tmp)
        for name in variants:
            extra: list[str | Path] = []
            if name == "int8":
                extra = [
                    "--int8",
                    "--calibration",
                    calibration_dir(work, train, args.calibration, 0),
                ]
            started = time.perf_counter()
            luncher(work / name, "make-updatable", args.model, *extra)
            setup_seconds[name] = time.perf_counter() - started
        for name in variants:  # warm-up: page cache, and the outputs to score
            _, outputs[name] = timed_predict(work / name, held)
        for run in range(args.runs):
            for name in variants if run % 2 == 0 else variants[::-1]:
                timing, rows = timed_predict(work / name, held)
                if {p: r["label"] for p, r in rows.items()} != {
                    p: r["label"] for p, r in outputs[name].items()
                }:
                    raise SystemExit(f"{name}: predict gave different labels from run to run")
                timings[name].append(timing)
        calibrated = json.loads(next((work / "int8").glob("base-*/meta.json")).read_text())
        # Other draws of calibration photos: how much of the accuracy change is the draw's.
        for seed in range(args.draws):
            rows = outputs["int8"]
            if seed > 0:
                folder = calibration_dir(work, train, args.calibration, seed)
                luncher(
                    work / f"int8-{seed}",
                    "make-updatable",
                    args.model,
                    "--int8",
                    "--calibration",
                    folder,
                )
                _, rows = timed_predict(work / f"int8-{seed}", held)
            changed = sum(rows[p]["label"] != outputs["fp32"][p]["label"] for p in truth)
            draws.append(
                {
                    "seed": seed,
                    "correct": scored(rows, truth, f"int8 seed {seed}"),
                    "labels_changed": changed,
                }
            )

    results: dict[str, dict[str, Any]] = {}
    for name in variants:
        correct = scored(outputs[name], truth, name)
        wall = [t.wall for t in timings[name]]
        cpu = [t.cpu for t in timings[name]]
        median = statistics.median(wall)
        results[name] = {
            "correct": correct,
            "accuracy": correct / len(truth),
            "predict_seconds": wall,
            "predict_seconds_median": median,
            "predict_cpu_seconds": cpu,
            "predict_cpu_seconds_median": statistics.median(cpu),
            "photos_per_second": len(truth) / median,
            "make_updatable_seconds": setup_seconds[name],
        }
    changed_paths = [
        path for path in truth if outputs["fp32"][path]["label"] != outputs["int8"][path]["label"]
    ]
    gaps = [
        abs(outputs["fp32"][path]["probabilities"][k] - outputs["int8"][path]["probabilities"][k])
        for path in truth
        for k in LABELS
    ]
    fp32, int8 = results["fp32"], results["int8"]
    speedup = fp32["predict_seconds_median"] / int8["predict_seconds_median"]
    cpu_ratio = fp32["predict_cpu_seconds_median"] / int8["predict_cpu_seconds_median"]
    drop = 100 * (fp32["accuracy"] - int8["accuracy"])
    default = speedup >= MIN_SPEEDUP and drop <= MAX_ACCURACY_DROP_POINTS
    for draw in draws:
        draw["accuracy_change_points"] = 100 * (draw["correct"] - fp32["correct"]) / len(truth)
    report = {
        "command": "python scripts/eval_int8.py"
        + ("" if args.runs == 3 else f" --runs {args.runs}")
        + ("" if args.draws == 4 else f" --draws {args.draws}")
        + ("" if args.calibration == 100 else f" --calibration {args.calibration}"),
        "model": str(args.model.resolve().relative_to(REPO))
        if args.model.resolve().is_relative_to(REPO)
        else str(args.model),
        "held_out_photos": len(truth),
        "calibration_photos": calibrated["calibration_photos"],
        "results": results,
        "speedup": speedup,
        "cpu_time_ratio": cpu_ratio,
        "accuracy_drop_points": drop,
        "labels_changed": [str(Path(p).relative_to(args.food)) for p in changed_paths],
        "probability_difference_max": max(gaps),
        "probability_difference_mean": float(np.mean(gaps)),
        "calibration_draws": draws,
        "int8_default": default,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime-training-cpu": version("onnxruntime-training-cpu"),
            "platform": platform.platform(),
        },
    }
    write(args.out, report)
    return 0


def write(out: Path, report: dict[str, Any]) -> None:
    results = report["results"]
    machine = report["machine"]
    lines = [
        "# int8 frozen part (`make-updatable --int8`) on the shipped base",
        "",
        f"Produced by `{report['command']}` on {machine['cpus']} CPUs (Python "
        f"{machine['python']}, onnxruntime-training-cpu {machine['onnxruntime-training-cpu']}).",
        f"Model `{report['model']}`; int8: static QDQ, uint8 activations, int8 per-channel "
        f"weights, MinMax calibration on {report['calibration_photos']} training-split photos "
        "(`--calibration`). The head stays float32.",
        f"Scored on the {report['held_out_photos']} held-out full-size photos "
        "(`sha256(file name) % 5 == 0`) with the labels `luncher predict --json` prints. "
        "Speed: whole `luncher predict --json` processes over those photos (start-up, "
        "decoding and inference), median of "
        f"{len(results['fp32']['predict_seconds'])} side-by-side runs after one warm-up each.",
        "",
        "| base | held-out accuracy | predict wall time (median; runs) | photos/s | "
        "predict CPU time (median) | make-updatable |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        runs = ", ".join(f"{s:.2f}" for s in row["predict_seconds"])
        lines.append(
            f"| {name} | {row['accuracy']:.4f} ({row['correct']}/{report['held_out_photos']}) "
            f"| {row['predict_seconds_median']:.2f} s ({runs}) | {row['photos_per_second']:.1f} "
            f"| {row['predict_cpu_seconds_median']:.2f} s | {row['make_updatable_seconds']:.1f} s |"
        )
    changed = report["labels_changed"]
    lines += [
        "",
        f"- speed-up of int8: **{report['speedup']:.2f}x** in wall time "
        f"({report['cpu_time_ratio']:.2f}x less CPU time); accuracy change: "
        f"**{-report['accuracy_drop_points']:+.2f} points**",
        f"- {len(changed)} photo(s) change label"
        + (f": {', '.join(f'`{c}`' for c in changed)}" if changed else "")
        + f"; probabilities differ by {report['probability_difference_mean']:.4f} on average, "
        f"{report['probability_difference_max']:.4f} at most",
        f"- rule: int8 becomes the default only if it is at least {MIN_SPEEDUP}x faster and "
        f"loses at most {MAX_ACCURACY_DROP_POINTS} point of held-out accuracy. Verdict: "
        + (
            "**int8 is the default**."
            if report["int8_default"]
            else "**int8 stays opt-in** (`--int8 --calibration DIR`)."
        ),
    ]
    draws = report["calibration_draws"]
    if len(draws) > 1:
        changes = [d["accuracy_change_points"] for d in draws]
        lines += [
            "",
            f"The accuracy change depends on which {report['calibration_photos']} photos "
            "calibrate (int8 bases made the same way from other draws, scored once):",
            "",
            "| calibration draw (seed) | held-out accuracy | change | labels changed vs fp32 |",
            "|---:|---:|---:|---:|",
        ]
        for d in draws:
            lines.append(
                f"| {d['seed']} | {d['correct'] / report['held_out_photos']:.4f} "
                f"({d['correct']}/{report['held_out_photos']}) | "
                f"{d['accuracy_change_points']:+.2f} pt | {d['labels_changed']} |"
            )
        lines += [
            "",
            f"Mean change {statistics.mean(changes):+.2f} points (from {min(changes):+.2f} to "
            f"{max(changes):+.2f}); one photo is {100 / report['held_out_photos']:.2f} points. "
            "The verdict above is taken on draw 0, the draw of bench-results/quantize.md, "
            "fixed before these runs.",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
