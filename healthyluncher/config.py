"""Hyperparameters and preprocessing settings: frozen dataclasses stored with the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

OptimizerName = Literal["adamw", "sgd"]
Layout = Literal["NCHW", "NHWC"]

# ImageNet statistics in 0..255 pixel space: the most common convention for exported
# classifiers, used when neither the options nor the model's metadata say otherwise.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Hyperparameters:
    """How a retrain fits the trainable part. Stored with the base, overridable per retrain."""

    # Defaults measured by scripts/eval_personalization.py on the shipped base: few, gentle
    # epochs keep the replayed base examples where they were (the head starts from the
    # base's weights every time), and the memory below does the rest.
    epochs: int = 5
    learning_rate: float = 0.001
    batch_size: int = 16
    optimizer: OptimizerName = "adamw"
    # One personal photo counts as this many replayed base examples of its class.
    personal_weight: float = 4.0
    # Views per personal photo at most (the photo itself plus flips, crops and colour
    # jitter), each one pass of the frozen part.
    augment_views: int = 8
    # Views for one retrain in all: few photos get up to `augment_views` views each, many
    # photos one view each (they vary enough by themselves). 0 gives every photo
    # `augment_views`. scripts/eval_personalization.py measured views helping below
    # about 5 photos (pancakes K=1: 0.64 of held-out photos flipped with 8 views, 0.51
    # with 1) and hardly above 10 (0.98 with 8 against 0.97).
    view_budget: int = 16
    # Nearest-neighbour memory in front of the logits: a photo whose head input is closer
    # than this cosine similarity to one of your examples, and closer to it than to any
    # replayed base example of another label, leans to your example's label by
    # `memory_strength` logits per unit of similarity above that. 0 turns it off.
    memory_threshold: float = 0.4
    memory_strength: float = 40.0
    seed: int = 0

    def views_for(self, photos: int) -> int:
        """Views per photo for a retrain (or re-embedding) of this many photos."""
        if self.view_budget <= 0:
            return self.augment_views
        return max(1, min(self.augment_views, self.view_budget // max(1, photos)))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hyperparameters:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> Hyperparameters:
        values = self.to_json()
        values.update({k: v for k, v in changes.items() if v is not None})
        return Hyperparameters.from_json(values)


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the model's input tensor.

    Resize the short side to `resize`, centre-crop `height` x `width`, then
    `(pixel - mean) / std` per channel with pixels in 0..255.
    """

    height: int = 224
    width: int = 224
    resize: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    layout: Layout = "NCHW"
    channels: int = 3

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)
