"""Measure `make-updatable --int8` on the shipped base: held-out accuracy and predict speed.

Run from the repository root (needs ../shared/food):

    .venv/bin/python scripts/eval_int8.py

Two models directories are made in a temporary directory with the real CLI: the shipped
base as it is (fp32), and the same file with `--int8 --calibration DIR`, where DIR links to
--calibration photos of the training split (the model card's split: make-updatable
--examples held out the photos whose content hash is 0 mod 5), drawn with seed 0 in equal
shares from every dish. Then, for the held-out full-size photos in
../shared/food/{healthy,fast_food}/*/:

- accuracy: the labels `luncher predict --json` prints, against the photo's folder, for
  int8 bases calibrated on --draws draws (seeds 0..N-1), since a change of one or two
  photos may be the draw's rather than int8's: the rule takes the worst draw;
- speed: the wall time of whole `luncher predict --json PHOTO...` processes over
  --timed-photos of those photos (spread evenly), one untimed warm-up each (so both read
  the photos from the page cache), then --runs rounds with fp32 and int8 (draw 0) side by
  side, alternating which goes first; the ratio of the medians is reported.

The versions of Python, numpy, onnx, ONNX Runtime and Pillow (which decodes and resizes
the photos) are recorded with the results.

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
from importlib.metadata import PackageNotFoundError, version
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
# The decision rule of issue 13: int8 becomes the default only if predict of 200 photos is
# at least this much faster and held-out accuracy drops by at most this many points on the
# worst of at least MIN_DRAWS calibration draws.
MIN_SPEEDUP = 1.6
MAX_ACCURACY_DROP_POINTS = 0.5
MIN_DRAWS = 3
RUNTIMES = ("onnxruntime-training-cpu", "onnxruntime")


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
    """A directory linking to `count` training-split photos drawn with `seed`, in equal
    shares from every dish (the first dishes take one more when `count` does not divide)."""
    rng = np.random.default_rng(seed)
    dishes: dict[Path, list[Photo]] = {}
    for photo in train:
        dishes.setdefault(photo.path.parent, []).append(photo)
    folder = work / f"calibration-{seed}"
    folder.mkdir()
    for rank, photos in enumerate(dishes.values()):
        share = count // len(dishes) + (rank < count % len(dishes))
        for index in rng.choice(len(photos), min(share, len(photos)), replace=False):
            photo = photos[index]
            link = folder / f"{photo.label}-{photo.path.parent.name}-{photo.path.name}"
            link.symlink_to(photo.path.resolve())
    return folder


def versions() -> dict[str, str]:
    """What the results depend on besides the code and the photos."""
    found = {"python": platform.python_version()}
    for name in ("numpy", "onnx", *RUNTIMES, "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def spread(photos: list[Photo], count: int) -> list[Photo]:
    """`count` of `photos`, evenly spaced over the list (every dish has its share)."""
    if count >= len(photos):
        return photos
    step = len(photos) / count
    return [photos[int(i * step)] for i in range(count)]


def scored(rows: dict[str, Any], truth: dict[str, str], name: str) -> int:
    """How many held-out photos predict labels correctly."""
    if set(rows) != set(truth):
        raise SystemExit(f"{name}: predict did not answer for every held-out photo")
    return sum(rows[path]["label"] == label for path, label in truth.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--food", type=Path, default=FOOD, help="The food photos.")
    parser.add_argument("--model", type=Path, default=MODEL, help="The base model.")
    parser.add_argument("--calibration", type=int, default=200, help="Calibration photos.")
    parser.add_argument("--runs", type=int, default=5, help="Timed predict runs of each.")
    parser.add_argument("--timed-photos", type=int, default=200, help="Photos per timed run.")
    parser.add_argument(
        "--draws", type=int, default=4, help="Calibration draws scored (seeds 0..N-1; 0 is timed)."
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "int8", help="No suffix.")
    args = parser.parse_args(argv)
    if args.draws < MIN_DRAWS:
        parser.error(f"the rule needs at least {MIN_DRAWS} calibration draws")

    train, held = food_photos(args.food.resolve())
    truth = {str(p.path): p.label for p in held}
    timed = spread(held, args.timed_photos)
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
        for name in variants:  # every held-out photo, to score; warms the page cache
            _, outputs[name] = timed_predict(work / name, held)
        for name in variants:  # warm-up of the timed photos
            timed_predict(work / name, timed)
        load = [os.getloadavg()[0]]  # other work on the machine stretches wall times
        for run in range(args.runs):
            for name in variants if run % 2 == 0 else variants[::-1]:
                timing, rows = timed_predict(work / name, timed)
                if any(rows[p]["label"] != outputs[name][p]["label"] for p in rows):
                    raise SystemExit(f"{name}: predict gave different labels from run to run")
                timings[name].append(timing)
        load.append(os.getloadavg()[0])
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
            "timed_photos": len(timed),
            "predict_seconds": wall,
            "predict_seconds_median": median,
            "predict_cpu_seconds": cpu,
            "predict_cpu_seconds_median": statistics.median(cpu),
            "photos_per_second": len(timed) / median,
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
    for draw in draws:
        draw["accuracy_change_points"] = 100 * (draw["correct"] - fp32["correct"]) / len(truth)
    changes = [draw["accuracy_change_points"] for draw in draws]
    drop = -min(changes)  # the worst draw
    default = speedup >= MIN_SPEEDUP and drop <= MAX_ACCURACY_DROP_POINTS
    defaults = {"runs": 5, "draws": 4, "calibration": 200, "timed_photos": 200}
    report = {
        "command": "python scripts/eval_int8.py"
        + "".join(
            f" --{key.replace('_', '-')} {getattr(args, key)}"
            for key, value in defaults.items()
            if getattr(args, key) != value
        ),
        "model": str(args.model.resolve().relative_to(REPO))
        if args.model.resolve().is_relative_to(REPO)
        else str(args.model),
        "held_out_photos": len(truth),
        "calibration_photos": calibrated["calibration_photos"],
        "results": results,
        "speedup": speedup,
        "cpu_time_ratio": cpu_ratio,
        "accuracy_drop_points": drop,
        "accuracy_drop_points_mean": -statistics.mean(changes),
        "labels_changed": [str(Path(p).relative_to(args.food)) for p in changed_paths],
        "probability_difference_max": max(gaps),
        "probability_difference_mean": float(np.mean(gaps)),
        "calibration_draws": draws,
        "int8_default": default,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min_before_after_timing": load,
        },
        "versions": versions(),
    }
    write(args.out, report)
    return 0


def write(out: Path, report: dict[str, Any]) -> None:
    results = report["results"]
    held = report["held_out_photos"]
    fp32 = results["fp32"]
    timed = fp32["timed_photos"]
    used = ", ".join(f"{name} {number}" for name, number in report["versions"].items())
    lines = [
        "# int8 frozen part (`make-updatable --int8`) on the shipped base",
        "",
        f"Produced by `{report['command']}` on {report['machine']['cpus']} CPUs "
        f"({report['machine']['platform']}) with {used}.",
        f"Model `{report['model']}`; int8: static QDQ, uint8 activations, int8 per-channel "
        f"weights, MinMax calibration on {report['calibration_photos']} training-split photos "
        "in equal shares from every dish (`--calibration`). Float32: the stem convolution "
        "(the first Conv the input reaches) and the trainable head.",
        f"Accuracy: the {held} held-out full-size photos (content hash 0 mod 5), labels of "
        "`luncher predict --json`, for int8 bases calibrated on "
        f"{len(report['calibration_draws'])} draws of photos. Speed: whole `luncher predict "
        f"--json` processes over {timed} of those photos (start-up, decoding and inference), "
        f"{len(fp32['predict_seconds'])} side-by-side runs after one warm-up each (load "
        "average over 1 minute before and after them: "
        + " and ".join(
            f"{x:.1f}" for x in report["machine"]["load_average_1min_before_after_timing"]
        )
        + ").",
        "",
        "| base | calibration draw (seed) | held-out accuracy | change | labels changed vs fp32 |",
        "|---|---:|---:|---:|---:|",
        f"| fp32 | - | {fp32['accuracy']:.4f} ({fp32['correct']}/{held}) | - | - |",
    ]
    draws = report["calibration_draws"]
    for d in draws:
        lines.append(
            f"| int8 | {d['seed']} | {d['correct'] / held:.4f} ({d['correct']}/{held}) | "
            f"{d['accuracy_change_points']:+.2f} pt | {d['labels_changed']} |"
        )
    lines += [
        "",
        f"Accuracy change over the draws: mean {-report['accuracy_drop_points_mean']:+.2f} "
        f"points, worst {-report['accuracy_drop_points']:+.2f}; one photo is "
        f"{100 / held:.2f} points.",
        "",
        f"| base | predict of {timed} photos, wall (median; runs) | photos/s | "
        "CPU time (median) | make-updatable |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        runs = ", ".join(f"{seconds:.2f}" for seconds in row["predict_seconds"])
        lines.append(
            f"| {name} | {row['predict_seconds_median']:.2f} s ({runs}) | "
            f"{row['photos_per_second']:.1f} | {row['predict_cpu_seconds_median']:.2f} s | "
            f"{row['make_updatable_seconds']:.1f} s |"
        )
    changed = report["labels_changed"]
    lines += [
        "",
        f"- speed-up of int8 (draw 0): **{report['speedup']:.2f}x** in wall time "
        f"({report['cpu_time_ratio']:.2f}x less CPU time)",
        f"- draw 0: {len(changed)} photo(s) change label"
        + (f" ({', '.join(f'`{c}`' for c in changed)})" if changed else "")
        + f"; probabilities differ by {report['probability_difference_mean']:.4f} on average, "
        f"{report['probability_difference_max']:.4f} at most",
        f"- rule (issue 13): int8 becomes the default only if predict of 200 photos is at least "
        f"{MIN_SPEEDUP}x faster and the worst of at least {MIN_DRAWS} calibration draws loses "
        f"at most {MAX_ACCURACY_DROP_POINTS} point of held-out accuracy. Verdict: "
        + (
            "**int8 is the default**."
            if report["int8_default"]
            else "**int8 stays opt-in** (`--int8 --calibration DIR`)."
        ),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
