"""predict: label photos with the personalized model, or the base."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.images import LoadedImage, load_many
from healthyluncher.models import ensure_base, load_base, load_personal
from healthyluncher.ortapi import inference_session
from healthyluncher.photos import ImageFailure, find_images
from healthyluncher.store import Files, ModelStore

# Photos per inference call: enough to keep both cores busy, small enough for flat memory.
PREDICT_BATCH = 16


@dataclass(frozen=True)
class Prediction:
    path: Path
    label: str
    probability: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class ActiveModel:
    path: Path
    labels: tuple[str, ...]
    personalized: bool


class Predictor:
    """One loaded inference session over the active model."""

    def __init__(self, store: ModelStore, *, use_base: bool = False) -> None:
        state = ensure_base(store)
        base = load_base(store, state)
        personal = None if use_base else load_personal(store, state)
        if personal is not None:
            self.model = ActiveModel(personal.path / Files.MODEL, personal.meta.labels, True)
        else:
            self.model = ActiveModel(base.path / Files.MODEL, base.meta.labels, False)
        self.prep = base.meta.preprocessing
        self._input = base.meta.input_name
        self._softmax = not base.meta.output_is_probability
        self._fixed_batch = base.meta.input_batch
        try:
            self._session = inference_session(self.model.path)
        except LuncherError as exc:
            if not self.model.personalized:
                raise LuncherError(
                    f"the base model in {self.model.path.parent} is damaged ({exc}); make it "
                    "again with `luncher make-updatable MODEL.onnx --keep-personalization`"
                ) from None
            raise LuncherError(
                f"the personalized model in {self.model.path.parent} is damaged ({exc}); "
                "run `luncher undo` to go back one step, or `luncher reset`"
            ) from None

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, *input) float32 -> (N, classes) float64 probabilities."""
        fixed = self._fixed_batch
        if fixed is None or len(batch) == fixed:
            return self._run(batch)
        # A model exported for a fixed batch size: run chunks of that size, padded.
        parts = []
        for start in range(0, len(batch), fixed):
            chunk = batch[start : start + fixed]
            count = len(chunk)
            if count < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
            parts.append(self._run(chunk)[:count])
        return np.concatenate(parts)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        scores = np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float64)
        if self._softmax:
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        return scores

    def predict(
        self, paths: Sequence[Path], on_done: Callable[[], None] | None = None
    ) -> Iterator[Prediction | ImageFailure]:
        """Results in input order; decoding overlaps inference."""
        pending: list[LoadedImage] = []
        for item in load_many(paths, self.prep):
            if isinstance(item, ImageFailure):
                yield from self._flush(pending, on_done)
                pending = []
                if on_done is not None:
                    on_done()
                yield item
                continue
            pending.append(item)
            if len(pending) >= PREDICT_BATCH:
                yield from self._flush(pending, on_done)
                pending = []
        yield from self._flush(pending, on_done)

    def _flush(
        self, loaded: list[LoadedImage], on_done: Callable[[], None] | None
    ) -> Iterator[Prediction]:
        if not loaded:
            return
        probs = self.probabilities(np.stack([item.array for item in loaded]))
        for item, row in zip(loaded, probs, strict=False):
            best = int(np.argmax(row))
            if on_done is not None:
                on_done()
            yield Prediction(
                path=item.path,
                label=self.model.labels[best],
                probability=float(row[best]),
                probabilities={
                    label: float(p) for label, p in zip(self.model.labels, row, strict=False)
                },
            )


def predict(
    store: ModelStore, inputs: Sequence[Path], *, use_base: bool = False
) -> Iterator[Prediction | ImageFailure]:
    predictor = Predictor(store, use_base=use_base)
    return predictor.predict(find_images(inputs))
