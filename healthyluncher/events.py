"""Progress events: what a long operation reports to its caller while it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Stage = Literal["embedding", "training"]


@dataclass(frozen=True)
class Progress:
    """One step of a long operation, as Core ML's MLUpdateProgressHandlers report them.

    `stage` is "embedding" (photos through the frozen part; `done` of `total` photos) or
    "training" (`done` of `total` epochs, with `loss`, the epoch's mean training loss, as
    Core ML's epoch-end events carry it; None for embedding).
    """

    stage: Stage
    done: int
    total: int
    loss: float | None = None


ProgressCallback = Callable[[Progress], None]
