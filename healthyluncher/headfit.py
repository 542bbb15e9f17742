"""A head from a folder of photos: `make-updatable --examples DIR`, Create ML's workflow.

DIR holds one subfolder per label. When the labels differ from the model's outputs (a stock
ImageNet export has 1000), the final layer is replaced by one for these labels; when they
are the model's own class names, the existing head is fine-tuned. Either way the head trains
on the photos' head inputs (the frozen part runs once per photo), a fifth of the photos
(chosen by content hash) is held out to measure it, and the training photos' head inputs
become the base's replay set, so that personalizing the base later does not forget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from healthyluncher import graph, heads, jsonform
from healthyluncher.errors import LuncherError, Param
from healthyluncher.events import Progress, ProgressCallback
from healthyluncher.imaging import LoadedImage, load_many
from healthyluncher.linearhead import linear_head_of
from healthyluncher.meta import check_folder_label, label_key
from healthyluncher.photos import PhotoSource, every_image
from healthyluncher.runtime import HeadRunner, head_batch_limit, inference_session, run_in_batches
from healthyluncher.settings import Hyperparameters, Preprocessing
from healthyluncher.trainers import TrainingSet
from healthyluncher.training import fit_head

# The parameter every refusal here names (make_updatable's examples, --examples).
EXAMPLES = Param("examples")
# One photo in five is held out to measure the new head (by content hash: repeatable).
HOLD_OUT = 5
# A new final layer needs at least this many optimizer steps, in 10 to 200 epochs.
MIN_STEPS = 400
# Head inputs kept per label as the base's replay set (the shipped base keeps 200 each).
REPLAY_PER_LABEL = 200
# Each replayed photo is also replayed as a thumbnail (short side this many pixels), so
# that blur never tells a user's label from the base's: without them a label taught from
# small photos spread to every other small photo (results/replay-small-views.md). A photo
# and its thumbnail weigh half each. Not for a model that shrinks every photo that far.
REPLAY_SMALL_SIDE = 64
# Images per call of the frozen part.
BATCH = 8
# AdamW moves each weight by about the learning rate per step, so a logit moves by about
# lr * |x|_1, the L1 norm of the head's input. The default settings were chosen where that
# norm is a few hundred (the shipped base: 243; pretrained backbones are alike). Head inputs
# whose mean L1 norm is larger (a random-weight ResNet-50: 90,000) are scaled down to this,
# by a constant where the frozen part ends, so that a step moves a logit by about one unit
# at most instead of overshooting by a hundred.
MAX_INPUT_L1 = 1000.0


@dataclass(frozen=True)
class LabelledPhotos:
    labels: tuple[str, ...]
    photos: tuple[tuple[PhotoSource, int], ...]  # (photo, label index), in folder order
    # Each photo's subfolder inside its label's folder ("" directly in it), as photos:
    # a label's dishes, when the user sorted them so.
    groups: tuple[str, ...] = ()
    # Each subfolder of a label weighs the same within it, however many photos it holds
    # (`make-updatable --examples DIR` with balance_subfolders): a label's dishes, say,
    # or its photos at two resolutions, instead of its photos in proportion.
    balance_subfolders: bool = False

    def in_order(self, labels: Sequence[str]) -> LabelledPhotos:
        """The same photos with the same label names, indexed in another label order."""
        position = {label: i for i, label in enumerate(labels)}
        moved = tuple((photo, position[self.labels[i]]) for photo, i in self.photos)
        return LabelledPhotos(tuple(labels), moved, self.groups, self.balance_subfolders)


@jsonform.frozen_result
@dataclass(frozen=True)
class HeadReport:
    """What `--examples` did, for the user."""

    replaced_head: bool  # a new final layer (else the model's own head was fine-tuned)
    photos: dict[str, int]  # readable photos per label
    skipped: int  # unreadable photos
    held_out: int
    held_out_accuracy: float
    epochs: int
    input_scale: float = 1.0  # the factor the head inputs were multiplied by (1.0: none)
    # Photos found under two labels (the same content): left out of both. A photo found
    # twice under one label trains once.
    contradictory: tuple[str, ...] = ()


def read_examples(directory: Path, balance_subfolders: bool = False) -> LabelledPhotos:
    """The labels (subfolder names, sorted) and their photos."""
    given = Param("examples", str(directory))
    if not os.path.isdir(directory):  # False for a name too long, where Path.is_dir raises
        raise LuncherError(given, ": not a directory")
    try:
        folders = sorted(p for p in directory.iterdir() if p.is_dir() and p.name[:1] != ".")
    except OSError as exc:  # not readable
        raise LuncherError(given, f": {exc.strerror}") from None
    labels = tuple(check_folder_label(folder.name, given) for folder in folders)
    if len({label_key(label) for label in labels}) != len(labels):  # "a", "a ", NFD "a"
        raise LuncherError(given, ": two subfolders name the same label")
    photos: list[tuple[PhotoSource, int]] = []
    groups: list[str] = []
    for index, folder in enumerate(folders):
        found = every_image(folder)
        if not found:
            raise LuncherError(EXAMPLES, f": {folder} holds no photos")
        photos.extend((photo, index) for photo in found)
        groups.extend(_group(folder, photo) for photo in found)
    if len(labels) < 2:
        raise LuncherError(
            given, " needs one subfolder per label, at least two (e.g. healthy/ and fast_food/)"
        )
    return LabelledPhotos(labels, tuple(photos), tuple(groups), balance_subfolders)


def _group(folder: Path, photo: PhotoSource) -> str:
    """The first subfolder of `folder` that holds `photo` ("" directly inside)."""
    try:
        parts = Path(str(photo)).relative_to(folder).parts
    except ValueError:
        return ""
    return parts[0] if len(parts) > 1 else ""


def needs_new_head(model_labels: Sequence[str] | None, labels: Sequence[str]) -> bool:
    """A new final layer unless the folders are exactly the model's own named classes."""
    return model_labels is None or set(model_labels) != set(labels)


def replace_final_layer(model: onnx.ModelProto, old_classes: int, classes: int) -> None:
    """Give the last layer `classes` outputs, in place: weights small and random (a ReLU
    after a classifier conv must not start dead), bias zero; `fit_new_head` then starts
    a linear layer from the class means instead."""
    axes = heads.class_axes(model, old_classes)
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    rng = np.random.default_rng(0)
    for name, axis in axes.items():
        old = numpy_helper.to_array(model.graph.initializer[index[name]])
        shape = list(old.shape)
        shape[axis] = classes
        fan_in = max(1, int(np.prod(shape)) // classes)
        if old.ndim == 1 or (old.ndim == 2 and 1 in old.shape and name.endswith("bias")):
            value = np.zeros(shape, old.dtype)
        else:
            value = rng.normal(0, 1 / math.sqrt(fan_in), shape).astype(old.dtype)
        model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value, name))
    heads.set_class_count(model, old_classes, classes)


def fit_new_head(
    cut: graph.Split,
    analysis: graph.Analysis,
    prep: Preprocessing,
    examples: LabelledPhotos,
    replaced: bool,
    hp: Hyperparameters,
    workdir: Path,
    progress: ProgressCallback | None = None,
) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray], HeadReport]:
    """Train the head on the photos: (its parameters, the replay set (head inputs, class
    indices, training weights), the report)."""
    inputs, labels, digests, groups, skipped, sources = _embed(
        cut, analysis, prep, examples, progress
    )
    keep, contradictory = _unambiguous(labels, digests, sources)
    if not keep.all():
        inputs, labels, groups = inputs[keep], labels[keep], groups[keep]
        digests = [d for d, k in zip(digests, keep, strict=True) if k]
        sources = [p for p, k in zip(sources, keep, strict=True) if k]
    if len(set(labels.tolist())) < len(examples.labels):
        missing = sorted(set(range(len(examples.labels))) - set(labels.tolist()))
        names = ", ".join(examples.labels[i] for i in missing)
        raise LuncherError(EXAMPLES, f": no readable photo of {names}")
    held = np.array([int(d[:8], 16) % HOLD_OUT == 0 for d in digests])
    if held.all() or not held.any() or len(labels) < 2 * HOLD_OUT:
        held = np.zeros(len(labels), bool)  # too few photos to hold any out
    train = ~held
    head = cut.head
    trainable = cut.trainable_params
    scale = 1.0
    if cut.frozen is not None and _may_scale(head, trainable, replaced, len(examples.labels)):
        scale = input_scale(inputs[train])
    if scale != 1.0:
        inputs = inputs * np.float32(scale)
        if not replaced:  # the model's own weights read the inputs as they were
            _rescale_weight(head, trainable, scale)
    spec_start = _class_means(head, trainable, inputs[train], labels[train], len(examples.labels))
    if replaced and spec_start:
        heads.write_back(head, spec_start)
    limit = head_batch_limit(head.SerializeToString(), inputs)  # 1: an exporter baked it in
    steps_per_epoch = math.ceil(int(train.sum()) / min(hp.batch_size, limit or hp.batch_size))
    fit_hp = hp.replace(epochs=min(200, max(10, math.ceil(MIN_STEPS / steps_per_epoch))))
    weights = example_weights(labels[train], groups[train], examples.balance_subfolders)
    data = TrainingSet(inputs[train], labels[train], weights)

    def on_epoch(epoch: int, total: int, loss: float) -> None:
        if progress:
            progress(Progress("training", epoch, total, loss))

    params = fit_head(head, trainable, data, fit_hp, workdir, batch_limit=limit, on_epoch=on_epoch)
    accuracy = float("nan")
    if held.any():
        runner = HeadRunner(heads.head_with(head, params), batch_limit=limit)
        accuracy = float(np.mean(runner.logits(inputs[held]).argmax(axis=1) == labels[held]))
    chosen = np.flatnonzero(train)[_replay(labels[train], np.array(digests)[train], groups[train])]
    replay = (inputs[chosen], labels[chosen], np.ones(len(chosen), np.float32))
    if prep.resize > REPLAY_SMALL_SIDE:  # else the model sees every photo that small
        again = LabelledPhotos(examples.labels, tuple((sources[i], int(labels[i])) for i in chosen))
        small, small_labels, small_digests, *_ = _embed(
            cut, analysis, prep, again, None, small=REPLAY_SMALL_SIDE
        )
        read = np.isin(np.array(digests)[chosen], small_digests)  # unreadable now: weight 1
        half = np.float32(0.5)  # a photo and its thumbnail weigh one photo in all
        replay = (
            np.concatenate([replay[0], small * np.float32(scale)]),
            np.concatenate([replay[1], small_labels]),
            np.concatenate([np.where(read, half, 1), np.full(len(small), half)]),
        )
    per_label = np.bincount(labels, minlength=len(examples.labels))
    report = HeadReport(
        replaced_head=replaced,
        photos={label: int(n) for label, n in zip(examples.labels, per_label, strict=True)},
        skipped=skipped,
        held_out=int(held.sum()),
        held_out_accuracy=accuracy,
        epochs=fit_hp.epochs,
        input_scale=scale,
        contradictory=contradictory,
    )
    return params, replay, report


def _unambiguous(
    labels: np.ndarray, digests: list[str], sources: list[PhotoSource]
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The rows to train on (a photo twice under one label once, under two not at all)."""
    first: dict[str, int] = {}
    seen: dict[str, set[int]] = {}
    for i, (digest, label) in enumerate(zip(digests, labels.tolist(), strict=True)):
        first.setdefault(digest, i)
        seen.setdefault(digest, set()).add(label)
    keep = np.array([first[d] == i and len(seen[d]) == 1 for i, d in enumerate(digests)], bool)
    return keep, tuple(str(sources[i]) for i, d in enumerate(digests) if len(seen[d]) > 1)


def example_weights(labels: np.ndarray, groups: np.ndarray, by_subfolder: bool) -> np.ndarray:
    """Sampling weights: each label weighs the same in all, however many photos it has;
    `by_subfolder`: so does each subfolder (group) within its label."""
    weights = np.zeros(len(labels))
    for cls in np.unique(labels):
        members = labels == cls
        pools = sorted(set(groups[members].tolist())) if by_subfolder else [None]
        for g in pools:
            pool = members if g is None else members & (groups == g)
            weights[pool] = 1.0 / (len(pools) * pool.sum())
    return weights


def _embed(
    cut: graph.Split,
    analysis: graph.Analysis,
    prep: Preprocessing,
    examples: LabelledPhotos,
    progress: ProgressCallback | None,
    small: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, int, list[PhotoSource]]:
    """Head inputs of every readable photo (float32), their label indices, digests,
    groups (subfolders) and sources; `small`: of thumbnails of the photos, their short
    side that many pixels."""
    frozen = _frozen_part(cut, analysis)
    label_of = dict(examples.photos)
    group_of = dict(zip((p for p, _ in examples.photos), examples.groups, strict=False))
    outputs: list[np.ndarray] = []
    labels: list[int] = []
    groups: list[str] = []
    digests: list[str] = []
    sources: list[PhotoSource] = []
    pending: list[LoadedImage] = []
    skipped = 0
    total = len(examples.photos)

    def flush() -> None:
        if not pending:
            return
        outputs.append(frozen(np.stack([item.array for item in pending])))
        labels.extend(label_of[item.path] for item in pending)
        groups.extend(group_of.get(item.path, "") for item in pending)
        digests.extend(item.digest for item in pending)
        sources.extend(item.path for item in pending)
        pending.clear()

    photos = [p for p, _ in examples.photos]
    for done, item in enumerate(load_many(photos, prep, small=small), start=1):
        if isinstance(item, LoadedImage):
            pending.append(item)
            if len(pending) >= BATCH:
                flush()
        else:
            skipped += 1
        if progress:
            progress(Progress("embedding", done, total))
    flush()
    if not outputs:
        raise LuncherError(EXAMPLES, ": none of the photos could be read")
    group_array = np.array(groups, dtype=object)
    inputs = np.concatenate(outputs)
    return inputs, np.array(labels, np.int64), digests, group_array, skipped, sources


def _frozen_part(cut: graph.Split, analysis: graph.Analysis) -> Callable[[np.ndarray], np.ndarray]:
    """What turns a batch of model inputs into head inputs (float32)."""
    if cut.frozen is None:
        return lambda batch: batch.astype(np.float32, copy=False)
    session = inference_session(cut.frozen.SerializeToString())
    name = analysis.input.name

    def run(chunk: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: chunk})[0], dtype=np.float32)

    return lambda batch: run_in_batches(run, batch, step=BATCH, fixed=analysis.input.batch)


def input_scale(inputs: np.ndarray) -> float:
    """The factor that brings the head inputs' mean L1 norm down to MAX_INPUT_L1, or 1.0
    when it is there already (a power of two: scaling then rounds nothing)."""
    flat = inputs.reshape(len(inputs), -1)
    mean_l1 = float(np.mean(np.abs(flat).sum(axis=1, dtype=np.float64)))
    if not math.isfinite(mean_l1):
        raise LuncherError(EXAMPLES, ": the model's features are not finite numbers")
    if mean_l1 <= MAX_INPUT_L1:
        return 1.0
    return float(2.0 ** math.floor(math.log2(MAX_INPUT_L1 / mean_l1)))


def _may_scale(
    head: onnx.ModelProto, trainable: tuple[str, ...], replaced: bool, classes: int
) -> bool:
    """Whether the head inputs may be scaled: a linear head's weight is rescaled to match,
    and a new layer starts untrained; but a pretrained layer between them (a new last layer
    with --trainable-layers 2) would read inputs it was never trained on."""
    if linear_head_of(head, trainable) is not None:
        return True
    return replaced and set(trainable) <= set(heads.class_axes(head, classes))


def _rescale_weight(head: onnx.ModelProto, trainable: tuple[str, ...], scale: float) -> None:
    """Divide a linear head's weight by `scale`: the same logits for inputs times `scale`."""
    spec = linear_head_of(head, trainable)
    assert spec is not None
    found = {t.name: t for t in head.graph.initializer}
    weight = numpy_helper.to_array(found[spec.weight]).astype(np.float32)
    heads.write_back(head, {spec.weight: weight / np.float32(scale)})


def _class_means(
    head: onnx.ModelProto,
    trainable: tuple[str, ...],
    inputs: np.ndarray,
    labels: np.ndarray,
    classes: int,
) -> dict[str, np.ndarray]:
    """A linear head's start from the class means (a nearest-class-mean classifier:
    logit_c = x . m_c - |m_c|^2 / 2); {} when the head is not one linear layer."""
    spec = linear_head_of(head, trainable)
    if spec is None or spec.classes != classes:
        return {}
    flat = inputs.reshape(len(inputs), -1).astype(np.float64)
    scale = float(np.mean(np.linalg.norm(flat, axis=1))) or 1.0
    flat /= scale  # logits of a few units, whatever the features' scale
    means = np.stack([flat[labels == c].mean(axis=0) for c in range(classes)])
    weight = means / scale / spec.alpha  # (C, D) in the head's own input units
    bias = -0.5 * np.sum(means * means, axis=1)
    start: dict[str, np.ndarray] = {spec.weight: (weight if spec.trans_b else weight.T)}
    if spec.bias is not None:
        dims = {t.name: tuple(t.dims) for t in head.graph.initializer}
        start[spec.bias] = (bias / spec.beta).reshape(dims[spec.bias])
    return {k: v.astype(np.float32) for k, v in start.items()}


def _replay(labels: np.ndarray, digests: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The indices of up to REPLAY_PER_LABEL training photos per label, spread evenly over
    the label's subfolders (its dishes, when the user sorted them so), chosen by content
    hash within each. Taken in proportion instead, a dish with few photos would all but
    vanish from the replay set, and personalizing would then forget it first."""
    chosen: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[np.argsort(digests[members], kind="stable")]
        pools = {g: members[groups[members] == g] for g in sorted(set(groups[members]))}
        quotas = fair_quotas({g: len(pool) for g, pool in pools.items()}, REPLAY_PER_LABEL)
        for g, pool in pools.items():
            chosen.extend(pool[: quotas[g]].tolist())
    return np.array(sorted(chosen), np.int64)


def fair_quotas(capacity: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` as evenly as the capacities allow; what a small pool cannot take goes
    to the larger ones."""
    quotas = dict.fromkeys(capacity, 0)
    remaining = min(total, sum(capacity.values()))
    open_pools = sorted(capacity)
    while remaining > 0 and open_pools:
        share, extra = divmod(remaining, len(open_pools))
        for i, name in enumerate(open_pools):
            give = min(share + (i < extra), capacity[name] - quotas[name])
            quotas[name] += give
            remaining -= give
        open_pools = [name for name in open_pools if quotas[name] < capacity[name]]
    return quotas
