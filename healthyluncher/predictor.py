"""Predicting: one inference session over the active model, labelling photos as they decode."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from healthyluncher.errors import MAKE_UPDATABLE_KEEPING, PREDICT_BASE, LuncherError
from healthyluncher.jsonform import frozen_result
from healthyluncher.photos import ImageFailure, PhotoSource
from healthyluncher.records import (
    GO_BACK,
    Personal,
    load_base,
    load_examples,
    load_personal,
    load_weights,
    make_updatable_command,
)
from healthyluncher.runtime import inference_session, input_mismatch, run_in_batches
from healthyluncher.state import State
from healthyluncher.store import Files, ModelStore

if TYPE_CHECKING:
    from healthyluncher.imaging import LoadedImage

# Photos per inference call: enough to keep both cores busy, small enough for flat memory.
PREDICT_BATCH = 16


@frozen_result
@dataclass(frozen=True)
class Prediction:
    """A photo's `label`, its `probability`, and the probability of every label."""

    path: PhotoSource  # the file, or the in-memory photo ("<image 3>")
    label: str
    probability: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class ActiveModel:
    path: Path
    labels: tuple[str, ...]
    personalized: bool


def restorable(store: ModelStore, state: State) -> Personal | None:
    """An undo step's copy, once the files it holds alone are read: undo has no redo, so a
    damaged step would take the place of a working model for good (its views in the shared
    segments, which `repair` embeds again from the thumbnails, are not read here)."""
    try:
        personal = load_personal(store, state)
        if personal is not None:
            load_examples(personal, (), views=False)  # lost views: `repair` embeds them
            load_weights(personal)
            inference_session(personal.path / Files.MODEL, threads=1)
    except LuncherError as exc:
        problem = str(exc.parts[0]).removesuffix("; ")  # without "run `luncher undo`"
        raise LuncherError(
            f"cannot undo: the undo step {state.personal} is damaged ({problem}); your "
            "model was not changed"
        ) from None
    return personal


class Predictor:
    """One loaded inference session over the active model."""

    def __init__(self, store: ModelStore, *, use_base: bool = False) -> None:
        # Once the session is made, the model is in memory: a writer may then remove its
        # files. If one does while they load, they load again from the state it wrote.
        store.read_consistently(lambda state: self._load(store, state, use_base))

    def _load(self, store: ModelStore, state: State, use_base: bool) -> None:
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
                    f"the base model in {self.model.path.parent} is damaged: {exc}; make it "
                    "again with ",
                    make_updatable_command(base.path.parent, MAKE_UPDATABLE_KEEPING),
                ) from None
            raise LuncherError(
                f"the personalized model in {self.model.path.parent} is damaged: {exc}; ",
                *GO_BACK,
                " (",
                PREDICT_BASE,
                " still works)",
            ) from None
        problem = input_mismatch(self._session, self._input, self.prep)
        if problem is not None:  # the base's meta.json: a personalized copy has the base's input
            raise LuncherError(
                f"the base model in {base.path} is damaged: {problem}; make it again with ",
                make_updatable_command(base.path.parent, MAKE_UPDATABLE_KEEPING),
            )

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, *input) float32 -> (N, classes) float64 probabilities."""
        return run_in_batches(self._run, batch, step=len(batch), fixed=self._fixed_batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        scores = np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float64)
        if self._softmax:
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        return scores

    def predict(
        self, paths: Iterable[PhotoSource], on_done: Callable[[], None] | None = None
    ) -> Iterator[Prediction | ImageFailure]:
        """Results in input order, `paths` read as they are taken; decoding overlaps
        inference."""
        from healthyluncher.imaging import load_many  # Pillow: only when photos decode

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
    ) -> Iterator[Prediction | ImageFailure]:
        if not loaded:
            return
        probs = self.probabilities(np.stack([item.array for item in loaded]))
        for item, row in zip(loaded, probs, strict=False):
            best = int(np.argmax(row))
            if on_done is not None:
                on_done()
            if not np.isfinite(row).all():  # argmax of NaN would name a label, at random
                yield ImageFailure(
                    item.path,
                    f"{item.path}: the model's scores for this photo are not numbers (NaN)",
                )
                continue
            yield Prediction(
                path=item.path,
                label=self.model.labels[best],
                probability=float(row[best]),
                probabilities={
                    label: float(p) for label, p in zip(self.model.labels, row, strict=False)
                },
            )
