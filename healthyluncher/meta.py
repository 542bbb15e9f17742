"""Metadata stored beside the weights, so that every model directory explains itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from healthyluncher.config import Hyperparameters, Preprocessing


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    params: int
    trainable: bool


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

    @property
    def embedding_key(self) -> str:
        """What the cached head inputs depend on: the model and where it is cut."""
        import hashlib

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseMeta:
        return cls(
            name=data["name"],
            source=data["source"],
            sha256=data["sha256"],
            created=data["created"],
            bundled=bool(data.get("bundled", False)),
            labels=tuple(data["labels"]),
            preprocessing=Preprocessing.from_json(data["preprocessing"]),
            input_name=data["input_name"],
            input_batch=data.get("input_batch"),
            output_name=data["output_name"],
            output_is_probability=bool(data["output_is_probability"]),
            split_tensor=data["split_tensor"],
            has_frozen_part=bool(data["has_frozen_part"]),
            trainable_layers=int(data["trainable_layers"]),
            trainable_params=tuple(data["trainable_params"]),
            layers=tuple(LayerInfo(**layer) for layer in data["layers"]),
            hyperparameters=Hyperparameters.from_json(data["hyperparameters"]),
            head_batch_limit=data.get("head_batch_limit"),
            replay_examples=int(data.get("replay_examples", 0)),
            int8=bool(data.get("int8", False)),
            calibration_photos=int(data.get("calibration_photos", 0)),
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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PersonalMeta:
        return cls(
            base_sha256=data["base_sha256"],
            labels=tuple(data["labels"]),
            hyperparameters=Hyperparameters.from_json(data["hyperparameters"]),
            trained_at=data["trained_at"],
            retrains=int(data["retrains"]),
            examples_per_label=dict(data.get("examples_per_label", {})),
            final_loss=float(data.get("final_loss", float("nan"))),
        )
