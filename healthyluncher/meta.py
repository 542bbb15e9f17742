"""Metadata stored beside the weights, so that every model directory explains itself."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from healthyluncher.errors import LuncherError, Part
from healthyluncher.jsonform import frozen_result
from healthyluncher.settings import (
    MAX_TRAINABLE_LAYERS,
    Hyperparameters,
    Preprocessing,
    is_finite_number,
)
from healthyluncher.state import sequence_of

SHA256 = re.compile(r"[0-9a-f]{64}")
# Longest label kept: a name, not a sentence.
MAX_LABEL = 64


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    params: int
    trainable: bool


@frozen_result
@dataclass(frozen=True)
class BaseMeta:
    """What the pristine base is and how it was cut for training."""

    name: str
    source: str
    # Of the original model file; for an int8 base, of that file and its quantized frozen
    # part, since its embeddings differ from the fp32 base's.
    sha256: str
    created: str
    bundled: bool
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    input_name: str
    input_batch: int | None  # None: any batch size
    output_name: str
    output_is_probability: bool  # the model ends in Softmax
    split_tensor: str
    has_frozen_part: bool
    trainable_layers: int
    trainable_params: tuple[str, ...]
    layers: tuple[LayerInfo, ...]
    hyperparameters: Hyperparameters
    head_batch_limit: int | None  # the head only runs on this batch size, if set
    replay_examples: int = 0
    int8: bool = False  # the frozen part is quantized (static QDQ, per-channel int8)
    calibration_photos: int = 0  # photos its int8 ranges were calibrated on
    # The head as one linear layer (numpy_trainer.LinearHead.to_json()), for the numpy
    # trainer; None when it is more than that (then only ONNX Runtime trains it).
    linear_head: dict[str, Any] | None = None

    @property
    def embedding_key(self) -> str:
        """What the cached head inputs depend on: the model and where it is cut."""
        return hashlib.sha256(f"{self.sha256}:{self.split_tensor}".encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "created": self.created,
            "bundled": self.bundled,
            "labels": list(self.labels),
            "preprocessing": self.preprocessing.to_json(),
            "input_name": self.input_name,
            "input_batch": self.input_batch,
            "output_name": self.output_name,
            "output_is_probability": self.output_is_probability,
            "split_tensor": self.split_tensor,
            "has_frozen_part": self.has_frozen_part,
            "trainable_layers": self.trainable_layers,
            "trainable_params": list(self.trainable_params),
            "layers": [vars(layer) for layer in self.layers],
            "hyperparameters": self.hyperparameters.to_json(),
            "head_batch_limit": self.head_batch_limit,
            "replay_examples": self.replay_examples,
            "int8": self.int8,
            "calibration_photos": self.calibration_photos,
            "linear_head": self.linear_head,
        }

    @classmethod
    def from_json(cls, data: Any) -> BaseMeta:
        """Every value checked for type and range: meta.json is a file anyone can edit."""
        data = _object(data, "meta.json")
        sequence_of(data)  # the order of the copies (state.SEQUENCE): checked, kept there
        batch = data.get("input_batch")
        limit = data.get("head_batch_limit")
        layers = data["layers"]
        if not isinstance(layers, list):
            raise LuncherError("meta.json: layers must be a list")
        return cls(
            name=_text(data, "name"),
            source=_text(data, "source"),
            sha256=_digest(data, "sha256"),
            created=_text(data, "created"),
            bundled=_flag(data, "bundled"),
            labels=labels_of(data["labels"]),
            preprocessing=Preprocessing.from_json(data["preprocessing"]),
            input_name=_text(data, "input_name"),
            input_batch=None if batch is None else _count(batch, "input_batch", 1, 4096),
            output_name=_text(data, "output_name"),
            output_is_probability=_flag(data, "output_is_probability"),
            split_tensor=_text(data, "split_tensor"),
            has_frozen_part=_flag(data, "has_frozen_part"),
            trainable_layers=_count(
                data["trainable_layers"], "trainable_layers", 1, MAX_TRAINABLE_LAYERS
            ),
            trainable_params=tuple(_names(data["trainable_params"], "trainable_params")),
            layers=tuple(_layer(layer) for layer in layers),
            hyperparameters=Hyperparameters.from_json(data["hyperparameters"]),
            head_batch_limit=None if limit is None else _count(limit, "head_batch_limit", 1, 4096),
            replay_examples=_count(data.get("replay_examples", 0), "replay_examples", 0, 10**7),
            int8=_flag(data, "int8"),
            calibration_photos=_count(
                data.get("calibration_photos", 0), "calibration_photos", 0, 10**6
            ),
            linear_head=_optional_object(data.get("linear_head"), "linear_head"),
        )


@dataclass(frozen=True)
class PersonalMeta:
    """The personalized copy: what it was trained from, on what, and how."""

    base_sha256: str
    labels: tuple[str, ...]
    hyperparameters: Hyperparameters
    trained_at: str
    retrains: int
    examples_per_label: dict[str, int] = field(default_factory=dict)
    final_loss: float = float("nan")
    # The settings this copy was trained with, where a one-off retrain option made them
    # differ from `hyperparameters` (the settings later retrains start from).
    trained_with: Hyperparameters | None = None

    @property
    def used(self) -> Hyperparameters:
        """The settings the training of this copy used."""
        return self.trained_with or self.hyperparameters

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "base_sha256": self.base_sha256,
            "labels": list(self.labels),
            "hyperparameters": self.hyperparameters.to_json(),
            "trained_at": self.trained_at,
            "retrains": self.retrains,
            "examples_per_label": dict(self.examples_per_label),
            "final_loss": self.final_loss,
            "trained_with": None if self.trained_with is None else self.trained_with.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> PersonalMeta:
        data = _object(data, "meta.json")
        sequence_of(data)  # the order of the copies (state.SEQUENCE): checked, kept there
        counts = data.get("examples_per_label", {})
        if not isinstance(counts, dict):
            raise LuncherError("meta.json: examples_per_label must be an object")
        loss = data.get("final_loss", float("nan"))
        once = data.get("trained_with")
        if loss is not None and not (is_finite_number(loss) or isinstance(loss, float)):
            raise LuncherError("meta.json: final_loss must be a number")
        return cls(
            base_sha256=_digest(data, "base_sha256"),
            labels=labels_of(data["labels"]),
            hyperparameters=Hyperparameters.from_json(data["hyperparameters"]),
            trained_at=_text(data, "trained_at"),
            retrains=_count(data["retrains"], "retrains", 0, 10**9),
            examples_per_label={
                check_label(k): _count(v, "examples_per_label", 0, 10**9) for k, v in counts.items()
            },
            final_loss=float("nan") if loss is None else float(loss),
            trained_with=None if once is None else Hyperparameters.from_json(once),
        )


def check_label(label: Any) -> str:
    """A label as it may be stored and shown: printable text, trimmed, not too long."""
    if not isinstance(label, str):
        raise LuncherError(f"a label must be text, not {label!r}")
    text = label.strip()
    if not text or len(text) > MAX_LABEL or not text.isprintable():
        raise LuncherError(
            f"{label!r} is not a usable label: 1 to {MAX_LABEL} printable characters"
        )
    return text


def check_new_label(label: Any) -> str:
    """A label about to be made (a new class, a new name, a base's labels): as check_label,
    and not one that begins with '-'. Such a label was most often an option taken for the
    label's value (`--label $UNSET --epochs 3` made a class '--epochs'), and every command
    that names a label read it back as an option. Labels already made stay readable."""
    text = check_label(label)
    if text.startswith("-"):
        raise LuncherError(
            f"{text!r} begins with '-', so it reads as an option (was the label's value "
            "left out?); a label cannot begin with '-'"
        )
    return text


def check_folder_label(folder: str, *where: Part) -> str:
    """A new label from a folder's name (`make-updatable --examples DIR`): as
    check_new_label, in the folder's words (`where` names the folder's parent)."""
    text = check_label(folder)
    if text.startswith("-"):
        raise LuncherError(
            *where,
            f": the subfolder {folder!r} begins with '-', so its label would read as an option "
            "in every command that names it; a label cannot begin with '-' (rename the folder)",
        )
    return text


def label_key(label: str) -> str:
    """What two labels that look the same share: a composed é and an e with a combining
    accent (a macOS folder name) are one label."""
    import unicodedata

    return unicodedata.normalize("NFC", label)


def known_label(label: str, labels: tuple[str, ...]) -> str:
    """The label of `labels` that `label` names (the same text in another Unicode form: a
    typed "café" is the "café" of a macOS folder name), else `label` as given."""
    if not isinstance(label, str):
        raise LuncherError(f"a label must be text, not {label!r:.40}")
    return next((known for known in labels if label_key(known) == label_key(label)), label)


def spelling_key(label: str) -> str:
    """What two spellings of one class name share: case, and spaces, underscores and
    hyphens between words, aside ("Fast Food", "fast_food" and "fast-food")."""
    return " ".join(label_key(label).replace("_", " ").replace("-", " ").split()).casefold()


def carried_labels(
    labels: Sequence[str], base_labels: tuple[str, ...], made_with: Sequence[str] = ()
) -> list[str]:
    """Your examples' labels as a new base names them: a label the base has in another
    Unicode form, case or spacing is the base's. Where that is a guess (two base labels, or
    two of yours, that one spelling names) the label stays as it is, a label of its own.
    `made_with`: the labels of the model your examples were taught (your 'Fast Food' made
    beside its 'fast_food' is two of yours, though only one has examples)."""
    by_spelling: dict[str, list[str]] = {}
    for known in base_labels:
        by_spelling.setdefault(spelling_key(known), []).append(known)
    mine: dict[str, set[str]] = {}
    for label in (*labels, *made_with):
        mine.setdefault(spelling_key(label), set()).add(label_key(label))
    carried = []
    for label in labels:
        exact = known_label(label, base_labels)
        key = spelling_key(label)
        same = by_spelling.get(key, [])
        unique = len(same) == 1 and len(mine[key]) == 1
        carried.append(exact if exact in base_labels or not unique else same[0])
    return carried


def labels_of(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise LuncherError("labels must be a non-empty list")
    labels = tuple(check_label(v) for v in values)
    # Unique as every command names them: "café" composed or not is one label.
    if len({label_key(label) for label in labels}) != len(labels):
        raise LuncherError("labels must be unique")
    return labels


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise LuncherError(f"{what} must hold a JSON object")
    return data


def _optional_object(value: Any, key: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise LuncherError(f"meta.json: {key} must be an object")
    return value


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > 4096 or not value.isprintable():
        raise LuncherError(f"meta.json: {key} must be printable text")
    return value


def _names(values: Any, key: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise LuncherError(f"meta.json: {key} must be a list of names")
    return values


def _digest(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise LuncherError(f"meta.json: {key} must be a sha256 in hex")
    return value


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise LuncherError(f"meta.json: {key} must be true or false")
    return value


def _count(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LuncherError(f"meta.json: {key} must be a whole number from {low} to {high}")
    return value


def _layer(data: Any) -> LayerInfo:
    data = _object(data, "meta.json layer")
    return LayerInfo(
        name=_text(data, "name"),
        op=_text(data, "op"),
        params=_count(data["params"], "params", 0, 10**12),
        trainable=_flag(data, "trainable"),
    )
