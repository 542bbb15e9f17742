"""make-updatable --int8: the frozen part quantized (static QDQ) and joined with the fp32 head."""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from healthyluncher import child, graph
from healthyluncher.errors import LuncherError, Param
from healthyluncher.imaging import LoadedImage, load_many
from healthyluncher.photos import every_image
from healthyluncher.precision import has_float16
from healthyluncher.runtime import (
    MAX_IR_VERSION,
    inference_session,
    ort_text,
    pad_batch,
    root_logging_kept,
    runtime,
)
from healthyluncher.settings import Preprocessing

# MinMax calibration keeps each activation's extreme values: a couple of hundred photos
# cover them, and every further photo only adds decoding time.
MAX_CALIBRATION_PHOTOS = 200
# Photos per calibration run when the batch is dynamic. MinMax reduces over the batch
# too, so batching changes no range; it only keeps both cores busy.
CALIBRATION_BATCH = 16
# Per-channel int8 weights need DequantizeLinear's `axis` attribute, new in opset 13.
MIN_OPSET = 13
# Ops whose weights the quantizer makes int8 (a frozen part without one gains nothing).
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
INT32_MAX = 2**31 - 1
QUANTIZER = "ONNX Runtime's quantizer"


@dataclass(frozen=True)
class QuantizedBase:
    frozen: onnx.ModelProto  # image -> split tensor, int8 QDQ: what embeds photos
    model: onnx.ModelProto  # that frozen part, then the fp32 head: what predict runs
    calibration_photos: int  # photos read and used for calibration


def calibration_photos(directory: Path) -> list[Path]:
    """Up to MAX_CALIBRATION_PHOTOS image files under `directory`, spread evenly over its
    sorted listing so that every subfolder (a class, a dish) has its share."""
    if not os.path.isdir(directory):  # False for a name too long, where Path.is_dir raises
        raise LuncherError(Param("calibration", str(directory)), ": not a directory of photos")
    found = [p for p in every_image(directory) if isinstance(p, Path)]
    if not found:
        raise LuncherError(Param("calibration", str(directory)), ": no image files in it")
    if len(found) > MAX_CALIBRATION_PHOTOS:
        step = len(found) / MAX_CALIBRATION_PHOTOS
        found = [found[int(i * step)] for i in range(MAX_CALIBRATION_PHOTOS)]
    return found


def quantize_base(
    model: onnx.ModelProto,
    cut: graph.Split,
    analysis: graph.Analysis,
    prep: Preprocessing,
    photos: list[Path],
    directory: Path,
    work: Path,
) -> QuantizedBase:
    """Quantize `cut.frozen` calibrated on `photos` (read from `directory`) and join it
    with everything after the split, whose weights keep their names and stay float32. The
    quantized model is written to the folder `work`."""
    if cut.frozen is None:
        raise LuncherError(
            Param("int8", True),
            " quantizes the frozen part, but every layer of this model trains; choose a smaller ",
            Param("trainable_layers"),
        )
    opset = graph.default_opset(model)
    if opset < MIN_OPSET:
        raise LuncherError(
            Param("int8", True),
            f" needs ONNX opset {MIN_OPSET} or later (per-channel int8 weights); this model "
            f"uses opset {opset}",
        )
    if has_float16(cut.frozen):  # the quantizer's float16 casts broke the model (ORT's text)
        raise LuncherError(
            Param("int8", True),
            " quantizes float32 weights, but this model's are float16 (half the size already); "
            "leave it out, or export the model in float32",
        )
    args = {
        "photos": [str(photo) for photo in photos],
        "prep": prep.to_json(),
        "input": analysis.input.name,
        "batch": analysis.input.batch,
        "directory": str(directory),
    }
    args["work"] = str(work)
    data = cut.frozen.SerializeToString()
    if child.python() is None:  # no Python to start: here, as narrowly as that can be
        with root_logging_kept():
            used = quantize_job(args, data)
    else:
        used = child.run("healthyluncher.quantize:quantize_job", args, data, what=QUANTIZER)
    frozen = onnx.load(str(work / "quantized.onnx"))
    joined = _join(model, frozen, cut.split_tensor, analysis.input.name)
    return QuantizedBase(frozen=frozen, model=joined, calibration_photos=used)


def quantize_job(args: dict[str, Any], data: bytes) -> int:
    """Calibrate on the photos and quantize the frozen part (`data`), in a child Python
    (child.run): ONNX Runtime's quantizer logs advice through the root logger
    (logging.warning, which configures a root logger without a handler), its import adds a
    warning filter (sympy's), and its sessions log through ONNX Runtime's default logger, all
    of them the program's. Writes quantized.onnx into args["work"]; returns the number of
    photos read."""
    photos = [Path(photo) for photo in args["photos"]]
    prep = Preprocessing.from_json(args["prep"])
    reader = _CalibrationReader(photos, prep, args["input"], args["batch"])
    if reader.used == 0:
        raise LuncherError(
            Param("calibration", args["directory"]),
            f": none of its {len(photos)} image files could be read",
        )
    work = Path(args["work"])
    onnx.save(_quantize(onnx.load_from_string(data), work, reader), str(work / "quantized.onnx"))
    return reader.used


class _CalibrationReader:
    """Feeds batches of preprocessed photos to quantize_static; unreadable ones are skipped.

    The first batch is read on construction, so that a directory without one readable
    photo is refused before quantization starts.
    """

    def __init__(
        self, photos: list[Path], prep: Preprocessing, input_name: str, fixed_batch: int | None
    ) -> None:
        self._input = input_name
        self._fixed = fixed_batch
        self._size = fixed_batch or CALIBRATION_BATCH
        self._loaded: Iterator[LoadedImage] = (
            item for item in load_many(photos, prep) if isinstance(item, LoadedImage)
        )
        self.used = 0
        self._ahead: np.ndarray | None = self._read_batch()
        self.first = self._ahead  # (N, ...) float32: the batch a failure is checked on

    def _read_batch(self) -> np.ndarray | None:
        arrays = [item.array for item in itertools.islice(self._loaded, self._size)]
        if not arrays:
            return None
        self.used += len(arrays)
        batch = np.stack(arrays)  # (N, C, H, W) or (N, H, W, C) float32
        return pad_batch(batch, self._fixed) if self._fixed else batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = self._ahead if self._ahead is not None else self._read_batch()
        self._ahead = None
        return None if batch is None else {self._input: batch}


def _quantize(frozen: onnx.ModelProto, work: Path, reader: _CalibrationReader) -> onnx.ModelProto:
    """Static QDQ: uint8 activations with MinMax ranges, int8 per-channel weights (the
    variant measured in bench-results/quantize.md), except the stem (`stem_convolutions`),
    which stays float32; biases the quantizer overflows are repaired (`_repair_biases`)."""

    runtime()  # onnxruntime without its training probe, before the quantizer imports it
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    source, prepared, target = work / "frozen.onnx", work / "prepared.onnx", work / "int8.onnx"
    # By path: quant_pre_process given a ModelProto mistakes small initializers for
    # external data.
    onnx.save(frozen, str(source))
    try:
        # numpy warns about the biases the quantizer overflows (`_repair_biases` fixes
        # them); its error state is this thread's alone.
        with np.errstate(over="ignore", invalid="ignore"):
            # Shape inference and ORT's basic graph optimizations (batch norms folded into
            # convolutions), so that more of the graph quantizes.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            model = onnx.load(str(prepared))
            stems = stem_convolutions(model.graph)
            if not any(n.op_type in WEIGHTED_OPS for n in model.graph.node if n not in stems):
                raise LuncherError(
                    Param("int8", True),
                    ": nothing in the frozen part would be int8: its only layer with weights "
                    "is the first convolution, which stays float32",
                )
            for index, node in enumerate(stems):
                node.name = node.name or f"luncher_stem_{index}"
            onnx.save(model, str(prepared))
            quantize_static(
                str(prepared),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=[node.name for node in stems],
            )
        quantized = onnx.load(str(target))
        _repair_biases(quantized, model)
    except LuncherError:
        raise
    except Exception as exc:  # the quantizer raises anything from ValueError to ORT's Fail
        if not _finite(source, reader.first):  # NaN ranges fail an assert of the quantizer
            raise LuncherError(
                "cannot quantize the frozen part to int8: it computes values that are not "
                "numbers (NaN or infinity) for the calibration photos"
            ) from exc
        reason = ort_text(exc) or type(exc).__name__
        raise LuncherError(f"cannot quantize the frozen part to int8: {reason}") from exc
    if quantized.ir_version > MAX_IR_VERSION:
        quantized.ir_version = MAX_IR_VERSION
    return quantized


def _finite(frozen: Path, batch: np.ndarray | None) -> bool:
    """Whether the float frozen part's outputs for the calibration's first batch are
    finite (True when that cannot be told: the quantizer's own error is named then)."""
    try:
        session = inference_session(frozen)
        outputs = session.run(None, {session.get_inputs()[0].name: batch})
    except Exception:  # ORT's untyped errors: not the NaN this tells
        return True
    return all(np.isfinite(np.asarray(out, np.float64)).all() for out in outputs)


def stem_convolutions(part: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The convolutions that the graph's input reaches without passing another one: the
    first Conv of a CNN (after a Transpose, a Cast or a normalization, if any), a ViT's
    patch embedding. They see the photo's full range of values through few channels and
    quantize worst; `make-updatable --int8` keeps them float32 (results/int8.md)."""
    initializers = {t.name for t in part.initializer}
    reached = {i.name for i in part.input if i.name not in initializers}
    stems: list[onnx.NodeProto] = []
    for node in part.node:  # topologically sorted
        if node.op_type == "Conv" and node.input[0] in reached:
            stems.append(node)
        elif any(name in reached for name in node.input):
            reached.update(node.output)
    return stems


def _repair_biases(quantized: onnx.ModelProto, prepared: onnx.ModelProto) -> None:
    """Channels whose int32 bias the quantizer overflowed get it back, in place.

    A channel whose weights are ~0 (a batch norm's ~0 scale folded into them) only adds
    its bias. Its int8 weight scale is ~0, so is the bias's (input scale x weight scale),
    and the quantizer casts bias / scale past int32: -2**31 on x86, a silent wrong value
    (the sign lost: relu(0.5) became 0). Such a channel is quantized as the quantizer
    quantizes an all-zero one: weights 0 with scale 1, bias at the input's scale. What is
    dropped: max |weight| < 127 |bias| / (2**31 input scale) and |input| <= 255 input
    scale, so each input's term is below 1.5e-5 of the bias.
    """
    floats = {t.name: t for t in prepared.graph.initializer}
    tensors = {t.name: t for t in quantized.graph.initializer}
    made_by = {out: node for node in quantized.graph.node for out in node.output}
    uses = collections.Counter(name for node in quantized.graph.node for name in node.input)
    for node in quantized.graph.node:
        dqs = [made_by.get(name) for name in node.input[:3]]
        if node.op_type not in ("Conv", "Gemm") or len(dqs) < 3:
            continue
        if uses[node.input[1]] > 1 or uses[node.input[2]] > 1:
            continue  # weights shared with another layer: left as the quantizer made them
        if not all(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs):
            continue
        x, w, b = (dq.input for dq in dqs if dq is not None)
        axis = next((a.i for a in made_by[node.input[1]].attribute if a.name == "axis"), 1)
        source = floats.get(b[0].removesuffix("_quantized"))
        if source is None or tensors[b[0]].data_type != onnx.TensorProto.INT32:
            continue
        bias = onnx.numpy_helper.to_array(source).astype(np.float64)
        input_scale = onnx.numpy_helper.to_array(tensors[x[1]]).astype(np.float32)
        weight_scale = onnx.numpy_helper.to_array(tensors[w[1]]).astype(np.float32)
        over = np.abs(bias / (input_scale * weight_scale)) > INT32_MAX
        if not over.any() or weight_scale.shape != bias.shape:
            continue
        weight = np.moveaxis(onnx.numpy_helper.to_array(tensors[w[0]]).copy(), axis, 0)
        weight[over] = 0
        weight_scale[over] = 1
        bias_scale = (input_scale * weight_scale).astype(np.float32)
        ints = np.clip(np.round(bias / bias_scale), -INT32_MAX, INT32_MAX).astype(np.int32)
        new = {
            w[0]: np.moveaxis(weight, 0, axis),
            w[1]: weight_scale,
            b[0]: ints,
            b[1]: bias_scale,
        }
        for name, array in new.items():
            tensors[name].CopyFrom(onnx.numpy_helper.from_array(array, name))


def _join(
    model: onnx.ModelProto, frozen: onnx.ModelProto, split_tensor: str, input_name: str
) -> onnx.ModelProto:
    """`model` with everything before `split_tensor` replaced by `frozen`.

    What follows the split (the head, a Softmax) is copied unchanged, so its weights keep
    their names and dtypes for `graph.write_back`, `grow_classes` and `add_memory`. Names
    inside `frozen` that the rest also uses are renamed on the frozen side.
    """
    output = model.graph.output[0].name
    inferred = onnx.shape_inference.infer_shapes(model)
    tail = onnx.utils.Extractor(inferred).extract_model([split_tensor], [output]).graph
    available = {split_tensor} | {t.name for t in tail.initializer}
    for node in tail.node:
        missing = [name for name in node.input if name and name not in available]
        if missing:
            raise LuncherError(
                f"cannot join the int8 frozen part with the head: {node.op_type} after the "
                f"split also reads {missing[0]!r}"
            )
        available.update(node.output)
    taken = available - {split_tensor}
    _rename_clashes(frozen.graph, taken, keep={split_tensor, input_name})
    taken_nodes = {node.name for node in tail.node if node.name}
    for node in frozen.graph.node:
        if node.name in taken_nodes:
            node.name = f"{node.name}/int8"

    joined = onnx.ModelProto()
    joined.CopyFrom(model)  # IR version, opsets, metadata (labels, preprocessing)
    target = joined.graph
    del target.node[:]
    del target.initializer[:]
    del target.value_info[:]
    del target.input[:]
    target.input.extend(i for i in model.graph.input if i.name == input_name)
    target.node.extend(frozen.graph.node)
    target.node.extend(tail.node)
    target.initializer.extend(frozen.graph.initializer)
    target.initializer.extend(tail.initializer)
    domains = {entry.domain for entry in joined.opset_import}
    used = {node.domain for node in frozen.graph.node}
    for entry in frozen.opset_import:
        if entry.domain in used and entry.domain not in domains:
            joined.opset_import.append(entry)
    return joined


def _rename_clashes(part: onnx.GraphProto, taken: set[str], keep: set[str]) -> None:
    """Rename tensors of `part` that are in `taken` (all but those in `keep`)."""
    names = {t.name for t in part.initializer} | {o for n in part.node for o in n.output}
    renamed = {name: _fresh(name, taken | names) for name in names & taken - keep}
    if not renamed:
        return
    for tensor in part.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in part.node:
        for field in (node.input, node.output):
            names_now = [renamed.get(name, name) for name in field]
            del field[:]
            field.extend(names_now)


def _fresh(name: str, used: set[str]) -> str:
    for index in itertools.count(1):
        candidate = f"{name}/int8_{index}"
        if candidate not in used:
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover
