"""Export a zoo of real classifier architectures, with random weights, to ONNX files.

The zoo is test material for `luncher make-updatable` ("bring your own classifier"):
torchvision and timm ImageNet architectures with their stock 1000-class heads, a Keras
MobileNetV2 through tf2onnx, and variants (opset 13, the dynamo exporter at opset 20,
fixed batch 1, also through the dynamo exporter, external-data weights, float16 weights,
a final Softmax). No model hub is reachable here, so every weight is random; that is
enough to exercise graph handling (cuts, gradients, head replacement), not accuracy.
`scripts/check_model_zoo.py` runs the CLI on each file.

This script runs with any Python 3.10+ and only the standard library. The exporting code
runs in build-time virtual environments, because torch, torchvision, timm and tensorflow
must never become runtime dependencies of the package. Set them up once, from the
repository root (both directories are inside .venv-zoo/, which git ignores):

    python3.11 -m venv .venv-zoo
    .venv-zoo/bin/pip install -r requirements-zoo.txt
    .venv-zoo/bin/pip install --no-deps timm==1.0.31

    # Optional, for the Keras model (about 1.5 GB more); skipped with a note without it:
    python3.11 -m venv .venv-zoo/tf
    .venv-zoo/tf/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime

Then:

    python scripts/make_model_zoo.py --out /tmp/zoo

It writes DIR/*.onnx and DIR/manifest.json (file, architecture, opset, batch, notes, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = REPO / ".venv-zoo" / "bin" / "python"
DEFAULT_TF_PYTHON = REPO / ".venv-zoo" / "tf" / "bin" / "python"
NUM_CLASSES = 1000
IMAGE_SIZE = 224


@dataclass(frozen=True)
class Spec:
    """One file of the zoo: which network, and how it is exported."""

    name: str
    source: str  # "torchvision", "timm" or "keras"
    architecture: str  # the constructor's name in that library
    opset: int = 17
    exporter: str = "torchscript"  # "torchscript", "dynamo" or "tf2onnx"
    dynamic_batch: bool = True
    external_data: bool = False
    fp16: bool = False
    softmax: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        # Keras needs tensorflow, which lives in its own venv (its pins fight torch's).
        return "keras" if self.source == "keras" else "torch"


def _tv(name: str, note: str = "", **kwargs: Any) -> Spec:
    return Spec(name, "torchvision", name, notes=[note] if note else [], **kwargs)


SPECS: list[Spec] = [
    _tv("resnet18"),
    _tv("resnet50"),
    _tv("mobilenet_v2"),
    _tv("mobilenet_v3_small", "HardSwish"),
    _tv("efficientnet_b0", "SiLU, squeeze-and-excitation"),
    _tv("squeezenet1_1", "the last layer with weights is a 1x1 Conv, then ReLU and pooling"),
    _tv("densenet121", "concatenations"),
    _tv("shufflenet_v2_x1_0", "channel shuffle (Reshape/Transpose), Split"),
    _tv("mnasnet0_5"),
    _tv("regnet_y_400mf", "grouped convolutions, squeeze-and-excitation"),
    _tv("googlenet", "inception blocks, no auxiliary heads"),
    _tv("convnext_tiny", "LayerNorm, GELU, layer scale"),
    Spec("vit_tiny_patch16_224", "timm", "vit_tiny_patch16_224", notes=["LayerNorm, GELU"]),
    # With random weights DeiT-tiny is the same graph as ViT-tiny; the distilled one is not:
    # two heads (class and distillation tokens) whose logits are averaged.
    Spec("deit_tiny_patch16_224", "timm", "deit_tiny_patch16_224", notes=["LayerNorm, GELU"]),
    Spec(
        "deit_tiny_distilled_patch16_224",
        "timm",
        "deit_tiny_distilled_patch16_224",
        notes=["two Gemm heads averaged: the output is (head + head_dist) / 2"],
    ),
    Spec(
        "levit_128s_dynamo",
        "timm",
        "levit_128s",
        opset=18,
        exporter="dynamo",
        notes=["Linear + BatchNorm1d: MatMul on (batch, tokens, channels), Reshape, BN"],
    ),
    # Variants. Each is a different file, so the checker sees every shape of export.
    Spec(
        "mobilenet_v3_small_opset13",
        "torchvision",
        "mobilenet_v3_small",
        opset=13,
        notes=["opset 13: HardSwish does not exist before opset 14, so it is decomposed"],
    ),
    Spec(
        "resnet18_dynamo_opset20",
        "torchvision",
        "resnet18",
        opset=20,
        exporter="dynamo",
        notes=["torch.export-based exporter (IR 10)"],
    ),
    Spec("resnet18_batch1", "torchvision", "resnet18", dynamic_batch=False),
    # The dynamo exporter bakes a fixed batch into the Reshape before the classifier
    # (torch.flatten becomes Reshape to (1, 512)), where the TorchScript one writes Flatten.
    Spec(
        "resnet18_dynamo_batch1",
        "torchvision",
        "resnet18",
        opset=18,
        exporter="dynamo",
        dynamic_batch=False,
        notes=["dynamo exporter, fixed batch 1: Reshape to (1, 512) before the classifier"],
    ),
    Spec(
        "mobilenet_v3_small_dynamo_batch1",
        "torchvision",
        "mobilenet_v3_small",
        opset=18,
        exporter="dynamo",
        dynamic_batch=False,
        notes=["dynamo exporter, fixed batch 1: Reshape to (1, 576) before the classifier"],
    ),
    Spec(
        "squeezenet1_1_dynamo_batch1",
        "torchvision",
        "squeezenet1_1",
        opset=18,
        exporter="dynamo",
        dynamic_batch=False,
        notes=["dynamo exporter, fixed batch 1: ends in Reshape to (1, 1000), the class count"],
    ),
    Spec(
        "efficientnet_b0_external",
        "torchvision",
        "efficientnet_b0",
        external_data=True,
        notes=["weights in an external-data file beside the .onnx"],
    ),
    Spec(
        "mobilenet_v2_fp16",
        "torchvision",
        "mobilenet_v2",
        fp16=True,
        notes=["float16 weights, float32 input and output (keep_io_types=True)"],
    ),
    Spec(
        "mobilenet_v2_fp16_dynamo",
        "torchvision",
        "mobilenet_v2",
        opset=18,
        exporter="dynamo",
        fp16=True,
        notes=["float16 weights; every ReLU6 (Clip) reads one shared pair of bounds"],
    ),
    Spec(
        "resnet18_softmax",
        "torchvision",
        "resnet18",
        softmax=True,
        notes=["ends in Softmax: outputs probabilities"],
    ),
    Spec(
        "keras_mobilenet_v2",
        "keras",
        "MobileNetV2",
        exporter="tf2onnx",
        notes=["NHWC input, MatMul + Add head, final Softmax; preprocessing maps to [-1, 1]"],
    ),
]


def seed_of(name: str) -> int:
    # A per-file seed (not Python's salted hash) so a rebuild gives the same weights.
    return zlib.crc32(name.encode())


# ---------------------------------------------------------------- the workers (in a venv)


def _export_torch(spec: Spec, out: Path) -> dict[str, Any]:
    import onnx
    import torch

    torch.manual_seed(seed_of(spec.name))
    model = _build_torch(spec)
    notes = list(spec.notes)
    notes += _randomize_constants(model)
    if _recalibrate_batchnorm(model):
        notes.append("BatchNorm statistics re-estimated on random batches")
    model.eval()
    if spec.softmax:
        model = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    output_name = "probabilities" if spec.softmax else "logits"

    path = out / f"{spec.name}.onnx"
    for stale in (path, out / f"{spec.name}.onnx.data"):
        stale.unlink(missing_ok=True)
    batch = 2 if spec.dynamic_batch else 1
    example = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    if spec.exporter == "dynamo":
        batch_dim = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=spec.opset,
            input_names=["input"],
            output_names=[output_name],
            dynamic_shapes=({0: batch_dim},) if spec.dynamic_batch else None,
            # The dynamo exporter writes weights to a side file by default; this variant is
            # about the exporter, the external-data variant is another file.
            external_data=False,
        )
    else:
        axes = {"input": {0: "batch"}, output_name: {0: "batch"}}
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=spec.opset,
            input_names=["input"],
            output_names=[output_name],
            dynamic_axes=axes if spec.dynamic_batch else None,
        )

    proto = onnx.load(str(path))
    if spec.fp16:
        from onnxconverter_common import float16

        proto = float16.convert_float_to_float16(proto, keep_io_types=True)
    proto.metadata_props.add(key="zoo_architecture", value=f"{spec.source}.{spec.architecture}")
    proto.metadata_props.add(key="zoo_weights", value="random")
    if spec.external_data:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))

    with torch.no_grad():
        expected = model(example).numpy()
    return _describe(spec, path, example.numpy(), expected, notes)


def _build_torch(spec: Spec) -> Any:
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.architecture, pretrained=False, num_classes=NUM_CLASSES)
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "num_classes": NUM_CLASSES}
    if spec.architecture == "googlenet":
        # Auxiliary heads only exist in train mode; init_weights silences a warning.
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(spec.architecture, **kwargs)


def _randomize_constants(model: Any) -> list[str]:
    """Perturb every tensor whose values are all equal (zero biases, unit BatchNorm and
    LayerNorm scales, layer-scale constants).

    Why: the exporter shares equal-valued initializers through Identity nodes, which then
    look like extra layers to make-updatable. A real trained model has no such tensors.
    """
    import torch

    changed = 0
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for _, tensor in tensors:
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            first = tensor.flatten()[0]
            if not bool((tensor == first).all()):
                continue
            noise = torch.randn_like(tensor)
            if float(first) == 0.0:
                tensor.add_(0.02 * noise)
            else:
                # Keep the scale of the constant (1 for norms, 1e-6 for layer scale).
                tensor.mul_(1.0 + 0.1 * noise)
            changed += 1
    return [f"{changed} constant tensors randomized"] if changed else []


def _recalibrate_batchnorm(model: Any) -> bool:
    """Re-estimate BatchNorm running statistics in train mode on random batches.

    Why: with random weights and the default statistics (mean 0, variance 1) activations
    grow layer after layer, up to logits of 1e3 or more, which saturate every softmax.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE))
    model.eval()
    return True


def _export_keras(spec: Spec, out: Path) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(seed_of(spec.name) % 2**31)
    model = getattr(tf.keras.applications, spec.architecture)(
        weights=None, classes=NUM_CLASSES, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    notes = list(spec.notes)
    changed = 0
    for variable in model.weights:
        value = variable.numpy()
        if value.size < 2 or not np.all(value == value.flat[0]):
            continue
        noise = np.random.default_rng(changed).standard_normal(value.shape).astype(value.dtype)
        scale = 0.02 if value.flat[0] == 0 else 0.1 * value.flat[0]
        variable.assign(value + scale * noise)
        changed += 1
    notes.append(f"{changed} constant tensors randomized")
    # One training-mode pass with momentum 0 makes the moving statistics those of the batch,
    # as the torch exports do (see _recalibrate_batchnorm for why).
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.0
    batch = np.random.default_rng(0).uniform(-1, 1, (16, IMAGE_SIZE, IMAGE_SIZE, 3))
    model(batch.astype(np.float32), training=True)
    notes.append("BatchNorm statistics re-estimated on a random batch")

    path = out / f"{spec.name}.onnx"
    signature = (tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32, name="input"),)

    @tf.function(input_signature=signature)
    def forward(images: Any) -> Any:
        return model(images, training=False)

    tf2onnx.convert.from_function(
        forward, input_signature=signature, opset=spec.opset, output_path=str(path)
    )
    import onnx

    proto = onnx.load(str(path))
    proto.metadata_props.add(key="zoo_architecture", value=f"keras.{spec.architecture}")
    proto.metadata_props.add(key="zoo_weights", value="random")
    onnx.save_model(proto, str(path))
    example = np.random.default_rng(1).uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
    example = example.astype(np.float32)
    expected = model(example, training=False).numpy()
    return _describe(spec, path, example, expected, notes, layout="NHWC")


def _describe(
    spec: Spec, path: Path, example: Any, expected: Any, notes: list[str], layout: str = "NCHW"
) -> dict[str, Any]:
    """The manifest entry, after checking the file with ONNX Runtime against the framework."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    feed = example if spec.dynamic_batch else example[:1]
    got = session.run(None, {inputs[0].name: feed})[0]
    want = expected if spec.dynamic_batch else expected[:1]
    proto = onnx.load(str(path), load_external_data=False)
    side = path.with_name(path.name + ".data")
    size = path.stat().st_size + (side.stat().st_size if side.exists() else 0)
    entry = {
        "file": path.name,
        "name": spec.name,
        "architecture": f"{spec.source}.{spec.architecture}",
        "exporter": spec.exporter,
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
        "batch": "dynamic" if spec.dynamic_batch else 1,
        "layout": layout,
        "input": inputs[0].name,
        "input_shape": [d if isinstance(d, int) else str(d) for d in inputs[0].shape],
        "outputs": int(got.shape[-1]),
        "output": "probabilities" if spec.softmax or spec.source == "keras" else "logits",
        "weights": "float16" if spec.fp16 else "float32",
        "external_data": side.name if side.exists() else None,
        "size_bytes": size,
        "nodes": len(proto.graph.node),
        "ops": sorted({node.op_type for node in proto.graph.node}),
        # Identity nodes in front of weights are the trap _randomize_constants avoids.
        "identity_nodes": sum(node.op_type == "Identity" for node in proto.graph.node),
        # How far ONNX Runtime is from the framework on the same random input, and the
        # scale of the outputs: a sanity check of the export and of the random weights.
        "max_abs_diff": float(np.abs(got - want).max()),
        "output_std": float(got.std()),
        "output_max_abs": float(np.abs(got).max()),
        "notes": notes,
    }
    if layout == "NHWC":
        # Keras applications' MobileNetV2 expects pixels in [-1, 1] ("inception" style).
        entry["preprocessing"] = {"name": "inception", "mean": [127.5] * 3, "std": [127.5] * 3}
    return entry


def run_worker(kind: str, out: Path, names: list[str], results: Path) -> None:
    """Export the named specs in this process, appending one JSON line per event to results.

    A "start" line precedes each export, so that the parent knows which one a crash
    (a segfault takes the whole process) belongs to and can go on with the others.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must not try to reach the hub
    export = _export_keras if kind == "keras" else _export_torch
    if kind == "torch":
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
    by_name = {spec.name: spec for spec in SPECS}
    for name in names:
        spec = by_name[name]
        _append(results, {"event": "start", "name": name})
        started = time.monotonic()
        try:
            entry = export(spec, out)
        except Exception as error:  # noqa: BLE001 - one failed export must not stop the rest
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            _append(results, {"event": "failed", "name": name, "reason": reason})
            continue
        entry["seconds"] = round(time.monotonic() - started, 1)
        _append(results, {"event": "done", "name": name, "entry": entry})


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the parent (any python)


def export_kind(
    kind: str, python: Path, out: Path, specs: list[Spec], timeout: float
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run the worker for these specs until each has succeeded, failed or crashed."""
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    pending = [spec.name for spec in specs]
    results = out / f".results-{kind}.jsonl"
    while pending:
        results.unlink(missing_ok=True)
        command = [str(python), str(Path(__file__).resolve()), "--worker", kind]
        command += ["--out", str(out), "--only", ",".join(pending), "--results", str(results)]
        print(f"[{kind}] exporting {', '.join(pending)}", flush=True)
        try:
            proc = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
            crash = None if proc.returncode == 0 else f"exit code {proc.returncode}"
            stderr = proc.stderr
        except subprocess.TimeoutExpired as expired:
            crash, stderr = f"timed out after {timeout:.0f} s", str(expired.stderr or "")
        current = None
        for line in results.read_text().splitlines() if results.exists() else []:
            record = json.loads(line)
            current = record["name"] if record["event"] == "start" else None
            if record["event"] == "done":
                done[record["name"]] = record["entry"]
                print(f"  ok      {record['name']} ({record['entry']['seconds']} s)", flush=True)
            elif record["event"] == "failed":
                failed[record["name"]] = record["reason"]
                print(f"  FAILED  {record['name']}: {record['reason']}", flush=True)
        results.unlink(missing_ok=True)
        finished = set(done) | set(failed)
        if crash is not None:
            last = (stderr.strip().splitlines() or [""])[-1][:300]
            # The spec that was running took the process down; the others are retried.
            victim = current or next((n for n in pending if n not in finished), None)
            if victim is None:
                break
            failed[victim] = f"worker crashed ({crash}): {last}"
            print(f"  CRASHED {victim}: {failed[victim]}", flush=True)
            finished.add(victim)
        pending = [name for name in pending if name not in finished]
    return done, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Directory for the .onnx files (required).")
    parser.add_argument(
        "--python",
        type=Path,
        default=DEFAULT_PYTHON,
        help="Python of the torch venv (default: .venv-zoo/bin/python).",
    )
    parser.add_argument(
        "--tf-python",
        type=Path,
        default=DEFAULT_TF_PYTHON,
        help="Python of the tensorflow venv (default: .venv-zoo/tf/bin/python); "
        "the Keras model is skipped with a note if it does not exist.",
    )
    parser.add_argument("--only", help="Comma-separated names to export (default: all).")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds per worker run.")
    parser.add_argument("--list", action="store_true", help="List the names and exit.")
    parser.add_argument("--worker", choices=["torch", "keras"], help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list:
        for spec in SPECS:
            print(f"{spec.name:32} {spec.source}.{spec.architecture}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    names = args.only.split(",") if args.only else [spec.name for spec in SPECS]
    unknown = sorted(set(names) - {spec.name for spec in SPECS})
    if unknown:
        parser.error(f"unknown names: {', '.join(unknown)} (see --list)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_worker(args.worker, out, names, args.results)
        return 0

    started = time.monotonic()
    manifest_path = out / "manifest.json"
    # Keep the entries of models not exported this time (--only), so the manifest stays whole.
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {e["name"]: e for e in old.get("models", []) if e["name"] not in names}
    skipped = {s["name"]: s["reason"] for s in old.get("skipped", []) if s["name"] not in names}
    failures = 0
    pythons = {"torch": args.python, "keras": args.tf_python}
    for kind in ("torch", "keras"):
        specs = [spec for spec in SPECS if spec.kind == kind and spec.name in names]
        if not specs:
            continue
        python = pythons[kind]
        if not python.exists():
            reason = f"no Python at {python}: see the setup commands at the top of this script"
            print(f"[{kind}] skipped: {reason}", flush=True)
            skipped.update({spec.name: reason for spec in specs})
            continue
        done, failed = export_kind(kind, python, out, specs, args.timeout)
        entries.update(done)
        skipped.update(failed)
        failures += len(failed)
    order = {spec.name: i for i, spec in enumerate(SPECS)}
    manifest = {
        "generator": "scripts/make_model_zoo.py",
        "weights": "random (no model hub is reachable); not for accuracy",
        "image_size": IMAGE_SIZE,
        "models": sorted(entries.values(), key=lambda e: order.get(e["name"], 1 << 30)),
        "skipped": [{"name": n, "reason": r} for n, r in sorted(skipped.items())],
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    print(f"\n{'file':40} {'MB':>7}  opset  batch    exporter")
    for entry in manifest["models"]:
        print(
            f"{entry['file']:40} {entry['size_bytes'] / 1e6:7.1f}  {entry['opset']:5}  "
            f"{entry['batch']!s:7}  {entry['exporter']}"
        )
    for item in manifest["skipped"]:
        print(f"skipped {item['name']}: {item['reason']}")
    print(f"\nwrote {manifest_path} in {time.monotonic() - started:.0f} s")
    # A missing optional venv is a note; an export that failed is an error.
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
