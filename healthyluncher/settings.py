"""Hyperparameters and preprocessing: frozen dataclasses, validated when they are made; and
the bounds of values that the API and the command line both check."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from healthyluncher.errors import LuncherError

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
    # `augment_views`. Chosen by scripts/eval_dishes.py on the tuning dishes (fruit,
    # beignets) among budgets of 16, 32 and 64 and up to 8, 16 or 32 views a photo
    # (results/views-per-photo.md): 32 recalls more from 5 or 10 photos (6 and 3 views
    # each, against 3 and 1) at about the same mean base accuracy; more views for one
    # photo did not help. On 64 px photos a new label then spreads more to other dishes
    # (README, "Dishes nobody tuned for").
    view_budget: int = 32
    # Nearest-neighbour memory in front of the logits: a photo whose head input is closer
    # than this cosine similarity to one of your examples, and closer to it than to any
    # replayed base example of another label, leans to your example's label by
    # `memory_strength` logits per unit of similarity above that. 0 turns it off.
    # Similarities are measured from the mean of the base's replay set (centred cosines
    # run lower than plain ones, whose threshold was 0.4). Chosen on the tuning dishes
    # (results/memory-rules-centred.md): at the default strength it recalls more than the
    # plain cosine did at no more base accuracy lost. Named anew so that a copy's saved
    # plain-cosine `memory_threshold` is not read as a centred one.
    memory_floor: float = 0.1
    memory_strength: float = 40.0
    seed: int = 0

    def __post_init__(self) -> None:
        _plain_numbers(self)
        # Every value may come from a file (meta.json, a backup): checked here, once, so a
        # bad one is refused before it can hang or derail a retrain.
        _integer("epochs", self.epochs, 1, MAX_EPOCHS)
        _number("learning rate", self.learning_rate, low=0.0, high=MAX_LEARNING_RATE, open_low=True)
        _integer("batch size", self.batch_size, 1, MAX_BATCH)
        if self.optimizer not in ("adamw", "sgd"):
            raise LuncherError(f"optimizer must be adamw or sgd, not {self.optimizer!r}")
        _number("personal weight", self.personal_weight, low=0.0, high=1e6, open_low=True)
        _integer("views per photo", self.augment_views, 1, MAX_VIEWS)
        _integer("view budget", self.view_budget, 0, 64 * MAX_VIEWS)
        _number("memory floor", self.memory_floor, low=-1.0, high=1.0)
        _number("memory strength", self.memory_strength, low=0.0, high=MAX_MEMORY_STRENGTH)
        _integer("seed", self.seed, 0, 2**32 - 1)

    def views_for(self, photos: int) -> int:
        """Views per photo for a retrain (or re-embedding) of this many photos."""
        if self.view_budget <= 0:
            return self.augment_views
        return max(1, min(self.augment_views, self.view_budget // max(1, photos)))

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON object (as meta.json and `Status.hyperparameters` hold them)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Hyperparameters:
        if not isinstance(data, dict):
            raise LuncherError("hyperparameters must be a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> Hyperparameters:
        """A copy with these settings changed (None: kept), checked as a new one is."""
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

    def __post_init__(self) -> None:
        _plain_numbers(self)
        for name in ("height", "width"):
            _integer(f"input {name}", getattr(self, name), 1, MAX_SIDE)
        _integer("resize", self.resize, min(self.height, self.width), MAX_SIDE)
        if self.layout not in ("NCHW", "NHWC"):
            raise LuncherError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        _integer("channels", self.channels, 1, 3)
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, list):
                values = tuple(values)
            if isinstance(values, tuple):
                values = tuple(map(plain_number, values))
                object.__setattr__(self, name, values)  # frozen: normalized once, here
            if not isinstance(values, tuple) or len(values) < self.channels:
                raise LuncherError(f"{name} needs {self.channels} values, got {values!r}")
            for value in values:
                _number(name, value, low=-MAX_PIXEL_STATISTIC, high=MAX_PIXEL_STATISTIC)
        if any(value == 0 for value in self.std):
            raise LuncherError("std values must not be zero")

    def to_json(self) -> dict[str, Any]:
        """The preprocessing as a JSON object, as meta.json holds it."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_json(cls, data: Any) -> Preprocessing:
        if not isinstance(data, dict):
            raise LuncherError("preprocessing must be a JSON object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std"):
            if key in values:
                if not isinstance(values[key], list):
                    raise LuncherError(f"preprocessing {key} must be a list of numbers")
                values[key] = tuple(values[key])
        return cls(**values)


# Limits on values read from files: past them a retrain would run for days or a photo
# would take gigabytes, so they are refused rather than obeyed. The command's options
# have the same bounds (a value past them is a usage error there).
MAX_EPOCHS = 1000
MAX_VIEWS = 64
MAX_SIDE = 4096
MAX_LEARNING_RATE = 10.0
MAX_BATCH = 65536
MAX_MEMORY_STRENGTH = 1e4
MAX_PIXEL_STATISTIC = 1e6  # a mean or std, in 0..255 pixel units
MAX_TRAINABLE_LAYERS = 10_000  # more layers with weights than any classifier trains


# A backup is a gzip-compressed tar (archive.py), the one format import reads: export writes
# it only under a name that says so (`b.zip` holding a tar would fool unzip, and the user).
BACKUP_SUFFIXES = (".tar.gz", ".tgz")


def backup_name_problem(name: str) -> str:
    """Why export will not write a backup under this file name ("" when it will)."""
    if name.lower().endswith(BACKUP_SUFFIXES):
        return ""
    return (
        f"{name}: a backup is a gzip-compressed tar; give a name ending in "
        f"{' or '.join(BACKUP_SUFFIXES)}"
    )


def check_argument(name: str, value: Any, kind: type, *, optional: bool = False) -> None:
    """A caller's argument of the wrong type, refused in one line (not a TypeError or an
    AttributeError from deep inside, and not a string read as True)."""
    if value is None and optional:
        return
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        what = {bool: "True or False", str: "text", int: "a whole number"}
        raise LuncherError(
            f"{name} must be {what.get(kind, f'a {kind.__name__}')}, not {value!r:.40}"
        )


def plain_number(value: Any) -> Any:
    """A number of another type (numpy's `np.int64(3)`, `np.float32(0.01)`) as the int or
    float it is, so that it is checked, compared and written to JSON as one; anything else
    (a bool, text, None) as it is, for the checks to refuse."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _plain_numbers(settings: Hyperparameters | Preprocessing) -> None:
    for item in fields(settings):
        value = getattr(settings, item.name)
        object.__setattr__(settings, item.name, plain_number(value))  # frozen: once, here


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LuncherError(f"{name} must be a whole number from {low} to {high}, not {value!r}")


def _number(name: str, value: Any, *, low: float, high: float, open_low: bool = False) -> None:
    if not is_finite_number(value):
        raise LuncherError(f"{name} must be a finite number, not {value!r:.40}")
    if value < low or (open_low and value == low) or value > high:
        above = "greater than" if open_low else "at least"
        raise LuncherError(f"{name} must be {above} {low:g} and at most {high:g}, not {value!r}")


def is_finite_number(value: Any) -> bool:
    """A JSON number that is a finite float: not a bool, NaN, an infinity or an integer too
    large for a float (10**400 parses, then float() raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
