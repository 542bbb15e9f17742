"""Which layers of the shipped base's frozen part int8 hurts: the evidence for the stem rule.

Run from the repository root (needs ../shared/food):

    .venv/bin/python scripts/int8_layers.py

In process, without the CLI: the shipped base's frozen part (make-updatable's cut, its
batch norms folded by the quantizer's pre-processing) is quantized as `make-updatable
--int8` does (static QDQ, uint8 activations, int8 per-channel weights, MinMax), calibrated
on --draws draws of --calibration training-split photos (equal shares from every dish, as
scripts/eval_int8.py draws them), with these layers kept float32:

- nothing, and the biases as the quantizer leaves them (make-updatable before issue 13);
- the stem (`quantize.stem_convolutions`), biases repaired: what make-updatable does;
- the stem and the last convolution, biases repaired.

Each variant embeds the held-out photos; the base's fp32 head labels them. Reported per
variant, over the draws: held-out accuracy change (mean, worst), labels changed against
fp32, mean |probability difference| and the cosine between int8 and fp32 embeddings.
Writes results/int8-layers.md and .json (see --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from eval_int8 import FOOD, MODEL, Photo, food_photos, versions  # noqa: E402

from healthyluncher import quantize  # noqa: E402
from healthyluncher.imaging import LoadedImage, load_many  # noqa: E402
from healthyluncher.runtime import runtime  # noqa: E402
from healthyluncher.settings import Preprocessing  # noqa: E402

Chooser = Callable[[onnx.GraphProto], list[str]]


def stem(graph: onnx.GraphProto) -> list[str]:
    return [node.name for node in quantize.stem_convolutions(graph)]


def stem_and_last(graph: onnx.GraphProto) -> list[str]:
    return stem(graph) + [next(n.name for n in reversed(graph.node) if n.op_type == "Conv")]


VARIANTS: dict[str, tuple[Chooser, bool]] = {
    "all int8, biases as quantized (before)": (lambda graph: [], False),
    "stem float32, biases repaired (make-updatable)": (stem, True),
    "stem and last conv float32, biases repaired": (stem_and_last, True),
}


def arrays(photos: list[Photo], prep: Preprocessing) -> np.ndarray:
    loaded = load_many([p.path for p in photos], prep)
    images = [item.array for item in loaded if isinstance(item, LoadedImage)]
    if len(images) != len(photos):
        raise SystemExit("some photos could not be read")
    return np.stack(images)


def draw(train: list[Photo], count: int, seed: int) -> list[int]:
    """Indices of `count` photos of `train` in equal shares from every dish."""
    rng = np.random.default_rng(seed)
    dishes: dict[Path, list[int]] = {}
    for index, photo in enumerate(train):
        dishes.setdefault(photo.path.parent, []).append(index)
    chosen: list[int] = []
    for rank, indices in enumerate(dishes.values()):
        share = count // len(dishes) + (rank < count % len(dishes))
        chosen += [int(i) for i in rng.choice(indices, min(share, len(indices)), replace=False)]
    return chosen


class Batches:
    def __init__(self, images: np.ndarray, name: str) -> None:
        self._images, self._name, self._at = images, name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._at >= len(self._images):
            return None
        batch = self._images[self._at : self._at + quantize.CALIBRATION_BATCH]
        self._at += len(batch)
        return {self._name: batch}


def embed(path: Path, images: np.ndarray, name: str) -> np.ndarray:
    session = runtime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {name: images[i : i + 32]})[0] for i in range(0, len(images), 32)]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--food", type=Path, default=FOOD, help="The food photos.")
    parser.add_argument("--model", type=Path, default=MODEL, help="The base model.")
    parser.add_argument("--calibration", type=int, default=200, help="Calibration photos.")
    parser.add_argument("--draws", type=int, default=4, help="Calibration draws (seeds 0..N-1).")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "int8-layers")
    args = parser.parse_args(argv)

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from healthyluncher import make_updatable

    train, held = food_photos(args.food.resolve())
    truth = np.array([p.label == "fast_food" for p in held])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="luncher-int8-layers-") as tmp:
        work = Path(tmp)
        make_updatable(args.model, models_dir=work / "models")
        base = next((work / "models").glob("base-*"))
        meta = json.loads((base / "meta.json").read_text())
        prep = Preprocessing.from_json(meta["preprocessing"])
        name = meta["input_name"]
        labels = meta["labels"]
        onnx.save(onnx.load(str(base / "frozen.onnx")), str(work / "frozen.onnx"))
        quant_pre_process(
            str(work / "frozen.onnx"), str(work / "prepared.onnx"), skip_symbolic_shape=True
        )
        prepared = onnx.load(str(work / "prepared.onnx"))
        head = runtime().InferenceSession(str(base / "head.onnx"))

        def probabilities(features: np.ndarray) -> np.ndarray:
            logits = head.run(None, {meta["split_tensor"]: features})[0]
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            return np.asarray(exp / exp.sum(axis=1, keepdims=True))

        held_images = arrays(held, prep)
        train_images = arrays(train, prep)
        fp32_features = embed(work / "frozen.onnx", held_images, name)
        fp32 = probabilities(fp32_features)
        fp32_correct = int(((fp32.argmax(1) == labels.index("fast_food")) == truth).sum())
        for variant, (choose, repair) in VARIANTS.items():
            for seed in range(args.draws):
                target = work / f"int8-{seed}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    quantize_static(
                        str(work / "prepared.onnx"),
                        str(target),
                        Batches(train_images[draw(train, args.calibration, seed)], name),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=choose(prepared.graph),
                    )
                if repair:
                    quantized = onnx.load(str(target))
                    quantize._repair_biases(quantized, prepared)
                    onnx.save(quantized, str(target))
                features = embed(target, held_images, name)
                int8 = probabilities(features)
                said = int8.argmax(1) == labels.index("fast_food")
                cosine = (features * fp32_features).sum(1) / (
                    np.linalg.norm(features, axis=1) * np.linalg.norm(fp32_features, axis=1)
                )
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "change_points": 100
                        * (int((said == truth).sum()) - fp32_correct)
                        / len(held),
                        "labels_changed": int((int8.argmax(1) != fp32.argmax(1)).sum()),
                        "probability_difference_mean": float(np.abs(int8 - fp32).mean()),
                        "cosine_mean": float(cosine.mean()),
                        "cosine_min": float(cosine.min()),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    write(args, rows, len(held), fp32_correct)
    return 0


def write(args: argparse.Namespace, rows: list[dict[str, Any]], held: int, correct: int) -> None:
    lines = [
        "# Which layers int8 hurts on the shipped base",
        "",
        "Produced by `python scripts/int8_layers.py` with "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f". {args.draws} draws of {args.calibration} training-split calibration photos "
        f"(equal shares from every dish); {held} held-out photos, fp32 accuracy "
        f"{correct / held:.4f} ({correct}/{held}); one photo is {100 / held:.2f} points. "
        "Quantized in process as `make-updatable --int8` does, except for what stays float32.",
        "",
        "| float32 layers | accuracy change, mean (worst) | labels changed per draw | "
        "mean abs probability difference | embedding cosine, mean (worst photo) |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        mine = [row for row in rows if row["variant"] == variant]
        changes = [row["change_points"] for row in mine]
        lines.append(
            f"| {variant} | {statistics.mean(changes):+.2f} ({min(changes):+.2f}) | "
            + ", ".join(str(row["labels_changed"]) for row in mine)
            + f" | {statistics.mean(r['probability_difference_mean'] for r in mine):.4f} | "
            f"{statistics.mean(r['cosine_mean'] for r in mine):.4f} "
            f"({min(r['cosine_min'] for r in mine):.4f}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
