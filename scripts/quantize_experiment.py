"""Experiment: int8 quantization of the frozen part (frozen.onnx), speed and accuracy vs fp32.

The base is made updatable in a temporary models directory (`luncher make-updatable`), and
its frozen part (image -> `features`, everything before the final Gemm) is quantized with
onnxruntime.quantization, which ships inside onnxruntime-training-cpu and imports without
torch. Variants: static (uint8 activations, int8 per-channel weights, MinMax calibration on
~100 photos from the training side of the split) in QDQ and in QOperator format, and
dynamic (uint8 weights, ConvInteger: ORT has no CPU kernel for int8-weight ConvInteger).

Measured for each variant against fp32, in the same process and interleaved:

- speed: median latency of one image (batch 1) and throughput at batch 16;
- features: cosine similarity to the fp32 features, per held-out photo;
- accuracy on held-out photos (the model card's split by file name): with the model's own head if it
  is trained, and with a ridge-regression head fitted on fp32 training features either way
  (so the effect is measurable before a trained base exists).

Usage (from the repository root)::

    .venv/bin/python scripts/quantize_experiment.py
    .venv/bin/python scripts/quantize_experiment.py --model models/healthyluncher-base.onnx

Writes bench-results/quantize.md and bench-results/quantize.json (see --out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "healthyluncher-base.onnx"
DEFAULT_PHOTOS = REPO.parent / "shared" / "food"
DEFAULT_OUT = REPO / "bench-results" / "quantize"
LABELS = ("healthy", "fast_food")
SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
BATCH = 16


@dataclass(frozen=True)
class Photo:
    path: Path
    label: int  # index into LABELS
    held_out: bool


def photos_under(root: Path, limit: int | None) -> list[Photo]:
    """healthy/ and fast_food/ photos; about one in five held out, chosen by file name."""
    found = []
    for index, label in enumerate(LABELS):
        for path in sorted((root / label).rglob("*")):
            if path.suffix.lower() in SUFFIXES:
                # The split of models/MODEL_CARD.md, so the shipped head never saw these.
                held = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 5 == 0
                found.append(Photo(path, index, held))
    if limit is not None and len(found) > limit:
        step = len(found) / limit
        found = [found[int(i * step)] for i in range(limit)]
    return found


def base_directory(model: Path, work: Path) -> Path:
    """Make the model updatable in a fresh models directory; return its base-* directory."""
    models_dir = work / "models"
    env = dict(os.environ, LUNCHER_MODELS_DIR=str(models_dir))
    luncher = Path(sys.executable).parent / "luncher"
    subprocess.run(
        [str(luncher), "make-updatable", str(model)], env=env, check=True, capture_output=True
    )
    state = json.loads((models_dir / "state.json").read_text())
    return models_dir / state["base"]


def batches(
    photos: list[Photo], prep: Any, size: int = BATCH
) -> Iterator[tuple[list[Photo], np.ndarray]]:
    """(photos, (N, C, H, W) float32) with the library's own preprocessing."""
    from healthyluncher.imaging import load

    for start in range(0, len(photos), size):
        chunk = photos[start : start + size]
        yield chunk, np.stack([load(p.path, prep).array for p in chunk])


class Calibration:
    """Feeds calibration photos to quantize_static one at a time (the Percentile and
    Entropy calibrators stack every batch, so a short last batch would break them)."""

    def __init__(self, photos: list[Photo], prep: Any, input_name: str) -> None:
        self._batches = batches(photos, prep, size=1)
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._batches, None)
        return None if item is None else {self._input: item[1]}


def quantize_variants(
    frozen: Path, work: Path, calibration: list[Photo], prep: Any, input_name: str
) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.inner = Calibration(calibration, prep, input_name)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.inner.get_next()

    prepared = work / "frozen-pre.onnx"
    quant_pre_process(str(frozen), str(prepared), skip_symbolic_shape=True)
    out: dict[str, Path] = {}
    # Percentile and Entropy calibration fail in ORT 1.19 with numpy 2 (np.histogram on a
    # NaN range inside HistogramCollector), so both static variants use MinMax.
    for name, fmt in (
        ("int8 static QDQ, MinMax", QuantFormat.QDQ),
        ("int8 static QOperator, MinMax", QuantFormat.QOperator),
    ):
        target = work / f"frozen-{fmt.name.lower()}.onnx"
        started = time.perf_counter()
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=fmt,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        out[name] = target
    target = work / "frozen-dynamic.onnx"
    # ORT's CPU ConvInteger has no int8-weight kernel ("Could not find an implementation
    # for ConvInteger(10)"), so dynamic quantization needs uint8 weights.
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QUInt8, per_channel=True)
    out["uint8 dynamic (ConvInteger)"] = target
    return out


def session(path: Path) -> Any:
    from healthyluncher.runtime import inference_session

    return inference_session(path)


def timing(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]], sample: np.ndarray, rounds: int
) -> dict[str, dict[str, float]]:
    """Median ms per image at batch 1 and at batch 16; variants interleaved per round."""
    single: dict[str, list[float]] = {name: [] for name in runners}
    batched: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        run(sample[:1])
        run(sample)
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            for i in range(8):
                run(sample[i : i + 1])
            single[name].append((time.perf_counter() - started) / 8 * 1000)
            started = time.perf_counter()
            run(sample)
            batched[name].append((time.perf_counter() - started) / len(sample) * 1000)
    return {
        name: {
            "ms_per_image_batch1": statistics.median(single[name]),
            "ms_per_image_batch16": statistics.median(batched[name]),
        }
        for name in runners
    }


def ridge_head(features: np.ndarray, labels: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """A linear classifier on [features, 1]: least squares to +-1 targets, L2-regularized."""
    x = np.hstack([features, np.ones((len(features), 1), features.dtype)]).astype(np.float64)
    y = np.where(labels == 0, 1.0, -1.0)
    gram = x.T @ x + strength * len(x) * np.eye(x.shape[1]) * np.mean(np.diag(x.T @ x)) / len(x)
    return np.asarray(np.linalg.solve(gram, x.T @ y))


def ridge_predict(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    x = np.hstack([features, np.ones((len(features), 1), features.dtype)])
    return np.where(x @ weights > 0, 0, 1)


def model_head(base_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(weight, bias) of the model's own head, or None if it is untrained (all zeros)."""
    import onnx
    from onnx import numpy_helper

    head = onnx.load(str(base_dir / "head.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in head.graph.initializer}
    gemm = next(n for n in head.graph.node if n.op_type == "Gemm")
    weight, bias = arrays[gemm.input[1]], arrays[gemm.input[2]]
    trans_b = any(a.name == "transB" and a.i == 1 for a in gemm.attribute)
    weight = weight if trans_b else weight.T
    if not np.any(weight):
        return None
    return weight, bias


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None, help="Base ONNX model.")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="Food photos.")
    parser.add_argument("--calibration", type=int, default=100, help="Calibration photos.")
    parser.add_argument("--limit", type=int, default=None, help="At most this many photos.")
    parser.add_argument("--rounds", type=int, default=7, help="Timing rounds.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Output path, no suffix.")
    args = parser.parse_args(argv)
    model = args.model or DEFAULT_MODEL
    photos = photos_under(args.photos, args.limit)
    if not photos:
        raise SystemExit(f"no photos under {args.photos}/healthy or fast_food")
    train = [p for p in photos if not p.held_out]
    held = [p for p in photos if p.held_out]
    rng = np.random.default_rng(0)
    calibration = [train[i] for i in rng.choice(len(train), args.calibration, replace=False)]

    from healthyluncher.runtime import runtime
    from healthyluncher.settings import Preprocessing

    runtime()
    with tempfile.TemporaryDirectory(prefix="luncher-quant-") as tmp:
        work = Path(tmp)
        base_dir = base_directory(model.resolve(), work)
        meta = json.loads((base_dir / "meta.json").read_text())
        prep = Preprocessing.from_json(meta["preprocessing"])
        frozen = base_dir / "frozen.onnx"
        variants = {"fp32": frozen}
        variants.update(quantize_variants(frozen, work, calibration, prep, meta["input_name"]))
        sessions = {name: session(path) for name, path in variants.items()}
        input_name = meta["input_name"]

        def runner(s: Any) -> Callable[[np.ndarray], np.ndarray]:
            return lambda x: np.asarray(s.run(None, {input_name: x})[0], np.float32)

        runners = {name: runner(s) for name, s in sessions.items()}
        _, sample = next(batches(held[:BATCH], prep))
        speed = timing(runners, sample, args.rounds)

        features: dict[str, list[np.ndarray]] = {name: [] for name in runners}
        labels, held_flags = [], []
        started = time.perf_counter()
        for chunk, tensor in batches(photos, prep):
            for name, run in runners.items():
                features[name].append(run(tensor))
            labels.extend(p.label for p in chunk)
            held_flags.extend(p.held_out for p in chunk)
        print(f"features of {len(photos)} photos: {time.perf_counter() - started:.0f} s")
        y = np.array(labels)
        is_held = np.array(held_flags)
        stacked = {name: np.concatenate(parts) for name, parts in features.items()}
        reference = stacked["fp32"]
        ridge = ridge_head(reference[~is_held], y[~is_held])
        own = model_head(base_dir)
        results: dict[str, Any] = {}
        for name, feats in stacked.items():
            a, b = reference[is_held], feats[is_held]
            cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            row: dict[str, Any] = {
                "file_mb": variants[name].stat().st_size / 2**20,
                **speed[name],
                "cosine_mean": float(np.mean(cosine)),
                "cosine_min": float(np.min(cosine)),
                "cosine_p5": float(np.percentile(cosine, 5)),
                "ridge_accuracy": float(np.mean(ridge_predict(ridge, b) == y[is_held])),
                "ridge_agreement_with_fp32": float(
                    np.mean(ridge_predict(ridge, b) == ridge_predict(ridge, a))
                ),
            }
            if own is not None:
                weight, bias = own
                predicted = np.argmax(b @ weight.T + bias, axis=1)
                row["own_head_accuracy"] = float(np.mean(predicted == y[is_held]))
            results[name] = row

    report = {
        "model": _shown(model),
        "photos": {"total": len(photos), "held_out": len(held), "calibration": len(calibration)},
        "own_head": own is not None,
        "threads": "ORT default (all cores)",
        "cpus": os.cpu_count(),
        "results": results,
    }
    lines = [
        "# Quantizing the frozen part (frozen.onnx)",
        "",
        f"- model `{_shown(model)}`; head "
        + ("trained" if own is not None else "untrained (all zeros)"),
        f"- {len(photos)} photos ({len(held)} held out by file name); calibration "
        f"{len(calibration)} training-side photos; {os.cpu_count()} CPUs, ORT default threads",
        "- accuracy: held-out photos, healthy vs fast_food. The ridge head is fitted on fp32 "
        "training features and applied unchanged to each variant's features.",
        "",
        "| variant | MB | ms/img b1 | ms/img b16 | speed-up b16 | cosine mean (min) "
        "| ridge acc | agrees w/ fp32 |" + (" own head acc |" if own is not None else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if own is not None else ""),
    ]
    base_b16 = results["fp32"]["ms_per_image_batch16"]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['file_mb']:.1f} | {row['ms_per_image_batch1']:.1f} | "
            f"{row['ms_per_image_batch16']:.1f} | {base_b16 / row['ms_per_image_batch16']:.2f}x | "
            f"{row['cosine_mean']:.4f} ({row['cosine_min']:.4f}) | "
            f"{row['ridge_accuracy']:.3f} | {row['ridge_agreement_with_fp32']:.3f} |"
            + (f" {row['own_head_accuracy']:.3f} |" if own is not None else "")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return 0


def _shown(path: Path) -> str:
    """The model's path relative to the repository when it is inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    sys.exit(main())
