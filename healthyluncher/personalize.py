"""retrain, reset and status: the user's examples, the embedding cache and the personalized copy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher.config import Hyperparameters
from healthyluncher.errors import LuncherError
from healthyluncher.meta import PersonalMeta
from healthyluncher.models import (
    Base,
    Examples,
    Personal,
    ensure_base,
    load_base,
    load_examples,
    load_personal,
    load_weights,
    save_arrays,
    save_examples,
)
from healthyluncher.photos import ImageFailure, digest_of, find_images, read_bytes
from healthyluncher.store import HISTORY_LIMIT, Files, ModelStore, State, write_json

# (stage, done, total): stage is "embedding" or "training".
ProgressCallback = Callable[[str, int, int], None]

# Images (photos x views) per call of the frozen part: enough to keep both cores busy, few
# enough that the first call starts while later photos still decode and that memory stays
# flat (128 at once peaked above 1 GB on the shipped base).
FROZEN_BATCH = 8
# Bump when augmented_views changes, so cached views are not mixed with new ones.
AUGMENT_VERSION = 2


@dataclass(frozen=True)
class TrainedPhoto:
    path: Path
    digest: str
    before: float  # probability of the label before this retrain
    after: float


@dataclass(frozen=True)
class RetrainResult:
    label: str
    photos: tuple[TrainedPhoto, ...]
    failures: tuple[ImageFailure, ...]
    examples_per_label: dict[str, int]
    hyperparameters: Hyperparameters
    final_loss: float
    embedded: int  # photos that ran through the frozen part (cache misses)
    cached: int  # photos whose head inputs came from the cache
    views: int = 1  # views per photo in this retrain
    new_label: bool = False  # the label was added to the model by this retrain


@dataclass(frozen=True)
class ResetResult:
    removed_examples: dict[str, int]
    removed_model: bool
    removed_cache_files: int


@dataclass(frozen=True)
class Status:
    models_dir: Path
    base_name: str
    base_sha256: str
    base_source: str
    labels: tuple[str, ...]
    predicting_with: str  # "personalized" or "base"
    examples_per_label: dict[str, int] = field(default_factory=dict)
    last_retrain: str | None = None
    retrains: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    trainable_layers: int = 1
    replay_examples: int = 0
    undo_steps: int = 0
    disk_bytes: int = 0  # everything in the models directory
    int8: bool = False  # the frozen part is quantized


# -- embedding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    path: Path
    digest: str
    array: np.ndarray  # head inputs when cached, else the views' pixels
    cached: bool


class Embedder:
    """Head inputs for photos: the frozen part runs once per photo, then the cache answers."""

    def __init__(self, store: ModelStore, base: Base, views: int) -> None:
        self.base = base
        self.views = max(1, views)
        self.store = store
        self.cache = store.cache_dir(base.meta.embedding_key)
        self._session: Any = None

    def _cache_file(self, digest: str) -> Path:
        return self.cache / f"{digest}.v{AUGMENT_VERSION}x{self.views}.npy"

    def embed(
        self,
        paths: Sequence[Path],
        progress: ProgressCallback | None = None,
        *,
        digests: Sequence[str] | None = None,
    ) -> tuple[list[tuple[Path, str, np.ndarray]], list[ImageFailure], int]:
        """[(path, digest, views)] in input order, failures, and how many photos ran
        through the frozen part (cache misses).

        Photos stream through a small window: decoding on two threads overlaps the frozen
        part's inference, and no more than a few batches are ever held in memory.
        `digests` names the photos (for thumbnails, whose bytes are not the original's).
        """
        results: list[tuple[Path, str, np.ndarray]] = []
        failures: list[ImageFailure] = []
        pending: list[tuple[Path, str, np.ndarray]] = []  # decoded, awaiting the frozen part
        fresh = 0
        total = len(paths)

        def flush() -> None:
            nonlocal fresh
            if not pending:
                return
            outputs = self._run_frozen(np.concatenate([pixels for _, _, pixels in pending]))
            for offset, (path, digest, _) in enumerate(pending):
                views = outputs[offset * self.views : (offset + 1) * self.views]
                self._write_cache(digest, views)
                results.append((path, digest, views))
            fresh += len(pending)
            pending.clear()

        # Photos already in the cache are read here, in order, until the first that is not:
        # a retrain of cached photos starts no decoding threads.
        next_index = 0
        while next_index < total:
            named = digests[next_index] if digests is not None else None
            quick = self._prepare(paths[next_index], named, decode=False)
            if quick is None:
                break
            if isinstance(quick, ImageFailure):
                failures.append(quick)
            else:
                results.append((quick.path, quick.digest, quick.array))
            next_index += 1
            if progress:
                progress("embedding", next_index, total)
        if next_index == total:
            return results, failures, fresh

        from concurrent.futures import Future, ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool:
            window: list[Future[_Prepared | ImageFailure | None]] = []
            while window or next_index < total:
                while next_index < total and len(window) < max(2, 2 * FROZEN_BATCH // self.views):
                    named = digests[next_index] if digests is not None else None
                    window.append(pool.submit(self._prepare, paths[next_index], named))
                    next_index += 1
                item = window.pop(0).result()
                assert item is not None  # decode=True
                if isinstance(item, ImageFailure):
                    failures.append(item)
                elif item.cached:
                    flush()  # keep input order
                    results.append((item.path, item.digest, item.array))
                else:
                    # Load the frozen part now, while the other photos decode.
                    self._ensure_session()
                    pending.append((item.path, item.digest, item.array))
                    if len(pending) * self.views >= FROZEN_BATCH:
                        flush()
                if progress:
                    progress("embedding", len(results) + len(pending) + len(failures), total)
            flush()
        return results, failures, fresh

    def _prepare(
        self, path: Path, digest: str | None, *, decode: bool = True
    ) -> _Prepared | ImageFailure | None:
        """Cached head inputs, or decoded augmented views ready for the frozen part (None
        for a photo not in the cache when `decode` is false)."""
        try:
            data = read_bytes(path)
            own_photo = digest is None
            digest = digest or digest_of(data)
            cached = self._read_cache(digest)
            if cached is not None and (not own_photo or self.store.thumbnail(digest).is_file()):
                return _Prepared(path, digest, cached, cached=True)
            if not decode:
                return None
            from healthyluncher import images  # Pillow: only now

            prep = self.base.meta.preprocessing
            image = images.decode(data, prep, name=str(path))
            if own_photo:
                self._write_thumbnail(digest, image)
            views = images.augmented_views(image, prep, self.views, int(digest[:8], 16))
            return _Prepared(path, digest, views, cached=False)
        except LuncherError as exc:
            message = str(exc)
            return ImageFailure(path, message if str(path) in message else f"{path}: {message}")

    def _ensure_session(self) -> None:
        if self._session is None and self.base.meta.has_frozen_part:
            from healthyluncher.ortapi import inference_session

            self._session = inference_session(self.base.path / Files.FROZEN)

    def _run_frozen(self, batch: np.ndarray) -> np.ndarray:
        meta = self.base.meta
        if not meta.has_frozen_part:
            return batch
        self._ensure_session()
        fixed = meta.input_batch
        step = fixed or FROZEN_BATCH
        parts = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            count = len(chunk)
            if fixed and count < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
            parts.append(self._session.run(None, {meta.input_name: chunk})[0][:count])
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _write_thumbnail(self, digest: str, image: Any) -> None:
        """Keep the photo at the size the model reads, so a new base can embed it again."""
        import io

        from healthyluncher.images import resize_short_side
        from healthyluncher.store import atomic_write_bytes

        target = self.store.thumbnail(digest)
        if target.is_file():
            return
        short = self.base.meta.preprocessing.resize
        small = resize_short_side(image, short) if min(image.size) > short else image
        buffer = io.BytesIO()
        try:
            small.convert("RGB").save(buffer, "JPEG", quality=90)
        except (OSError, ValueError) as exc:  # e.g. wider than JPEG's 65500 pixels
            raise LuncherError(f"cannot keep a thumbnail of this photo: {exc}") from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, buffer.getvalue())
        except OSError as exc:
            raise LuncherError(f"cannot keep a thumbnail in {target.parent}: {exc}") from None

    def _read_cache(self, digest: str) -> np.ndarray | None:
        path = self._cache_file(digest)
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # missing or damaged: embed again
        return value if len(value) == self.views else None

    def _write_cache(self, digest: str, views: np.ndarray) -> None:
        import io

        from healthyluncher.store import atomic_write_bytes

        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, views.astype(np.float32, copy=False))
            atomic_write_bytes(self._cache_file(digest), buffer.getvalue(), durable=False)
        except OSError:
            pass  # the cache is only a speed-up; a full disk must not fail the retrain


# -- training set ------------------------------------------------------------------------


def merge_examples(old: Examples, new: list[tuple[str, np.ndarray]], label: str) -> Examples:
    """Add photos (digest, views) under `label`; a photo seen before takes the new label."""
    replaced = {digest for digest, _ in new}
    kept = select_examples(old, [i for i, d in enumerate(old.digests) if d not in replaced])
    if not new:
        return kept
    owner = [kept.owner] + [
        np.full(len(views), len(kept) + i, np.int64) for i, (_, views) in enumerate(new)
    ]
    return Examples(
        inputs=np.concatenate([kept.inputs, *(views for _, views in new)]).astype(
            np.float32, copy=False
        ),
        owner=np.concatenate(owner),
        digests=kept.digests + tuple(d for d, _ in new),
        labels=kept.labels + (label,) * len(new),
    )


def training_set(
    examples: Examples,
    replay: tuple[np.ndarray, np.ndarray] | None,
    labels: tuple[str, ...],
    hp: Hyperparameters,
) -> Any:
    """Personal views weighted `personal_weight` per photo, plus replayed base examples.

    Each class present gets the same total weight, so a label with many replayed examples
    does not drown one with a few personal photos, nor the other way round.
    """
    from healthyluncher.training import TrainingSet

    index = {label: i for i, label in enumerate(labels)}
    views_per_photo = np.bincount(examples.owner, minlength=len(examples))
    parts_y = [np.array([index[examples.labels[o]] for o in examples.owner], np.int64)]
    parts_w = [hp.personal_weight / views_per_photo[examples.owner]]
    extra = None
    if replay is not None and len(replay[0]):
        extra = replay[0]
        parts_y.append(replay[1])
        parts_w.append(np.ones(len(replay[0])))
    y = np.concatenate(parts_y).astype(np.int64)
    w = np.concatenate(parts_w).astype(np.float64)
    for cls in np.flatnonzero(np.bincount(y)):  # not np.unique: it imports numpy.ma
        mask = y == cls
        w[mask] /= w[mask].sum()
    return TrainingSet(inputs=examples.inputs, labels=y, weights=w, extra=extra)


def load_replay(base: Base) -> tuple[np.ndarray, np.ndarray] | None:
    path = base.path / Files.REPLAY
    if not path.is_file():
        return None
    index = {label: i for i, label in enumerate(base.meta.labels)}
    with np.load(path, allow_pickle=False) as data:
        return (
            data["inputs"].astype(np.float32, copy=False),
            np.array([index[str(label)] for label in data["labels"]], np.int64),
        )


# -- commands ----------------------------------------------------------------------------


def retrain(
    store: ModelStore,
    label: str,
    inputs: Sequence[Path],
    *,
    epochs: int | None = None,
    learning_rate: float | None = None,
    augment_views: int | None = None,
    progress: ProgressCallback | None = None,
) -> RetrainResult:
    """Add the photos as examples of `label` (a new label grows the head) and retrain."""
    if epochs is not None and epochs < 1:
        raise LuncherError("--epochs must be at least 1")
    if learning_rate is not None and not learning_rate > 0:
        raise LuncherError("--learning-rate must be greater than 0")
    if augment_views is not None and augment_views < 1:
        raise LuncherError("--views must be at least 1")
    label = label.strip()
    if not label:
        raise LuncherError("--label must not be empty")
    paths = find_images(inputs)
    if not paths:
        raise LuncherError("no image files found in " + ", ".join(str(p) for p in inputs))
    ensure_base(store)
    with store.lock():
        state = store.read_state()
        base = load_base(store, state)
        personal = load_personal(store, state)
        old_labels = personal.meta.labels if personal else base.meta.labels
        labels = old_labels if label in old_labels else (*old_labels, label)
        settings = personal.meta.hyperparameters if personal else base.meta.hyperparameters
        hp = settings.replace(
            epochs=epochs,
            learning_rate=learning_rate,
            augment_views=augment_views,
            view_budget=0 if augment_views is not None else None,  # --views N: exactly N
        )
        views = hp.views_for(len(paths))
        embedder = Embedder(store, base, views)
        embedded, failures, misses = embedder.embed(paths, progress)
        if not embedded:
            raise LuncherError(
                "none of the photos could be read: " + "; ".join(f.error for f in failures)
            )
        sample_shape = embedded[0][2].shape[1:]
        # Earlier photos keep the views they were embedded with: training weighs photos,
        # not views.
        old_examples = load_examples(personal, sample_shape)
        probe = np.stack([views[0] for _, _, views in embedded])
        named = [(path, digest) for path, digest, _ in embedded]
        before = _current_probabilities(base, personal, old_examples, probe, named)
        examples = merge_examples(old_examples, [(d, v) for _, d, v in embedded], label)
        del embedded, old_examples  # the views live on in `examples` alone
        if label in old_labels:
            before_label = before[:, old_labels.index(label)]
        else:
            before_label = np.zeros(len(probe))  # the label did not exist yet
        fitted = fit_and_publish(store, state, base, labels, examples, hp, progress=progress)
    after = np.stack([fitted.scores[digest] for _, digest in named])
    after_label = after[:, labels.index(label)]
    photos = tuple(
        TrainedPhoto(path, digest, float(b), float(a))
        for (path, digest), b, a in zip(named, before_label, after_label, strict=True)
    )
    return RetrainResult(
        label=label,
        photos=photos,
        failures=tuple(failures),
        examples_per_label=examples.per_label(),
        hyperparameters=hp,
        final_loss=fitted.final_loss,
        embedded=misses,
        cached=len(named) - misses,
        views=views,
        new_label=label not in old_labels,
    )


def rebuild_examples(
    store: ModelStore,
    base: Base,
    digests: Sequence[str],
    labels: Sequence[str],
    hp: Hyperparameters,
    progress: ProgressCallback | None = None,
) -> tuple[Examples, int]:
    """Embed the kept thumbnails of these photos with `base`; returns the examples and how
    many photos could not be carried over (thumbnail missing or unreadable)."""
    pairs = zip(digests, labels, strict=True)
    found = [(d, label) for d, label in pairs if store.thumbnail(d).is_file()]
    embedder = Embedder(store, base, hp.views_for(len(found)))
    embedded, _, _ = embedder.embed(
        [store.thumbnail(d) for d, _ in found], progress, digests=[d for d, _ in found]
    )
    missing = len(digests) - len(embedded)
    if not embedded:
        return Examples.empty(()), missing
    label_of = dict(found)
    examples = Examples(
        inputs=np.concatenate([views for _, _, views in embedded]),
        owner=np.concatenate(
            [np.full(len(views), i, np.int64) for i, (_, _, views) in enumerate(embedded)]
        ),
        digests=tuple(digest for _, digest, _ in embedded),
        labels=tuple(label_of[digest] for _, digest, _ in embedded),
    )
    return examples, missing


# Rows of the nearest-neighbour memory at most: about 10 MB of float32 for the shipped
# base's 1280-d head inputs. Past it, fewer augmented views per photo are remembered.
MEMORY_ROWS = 2048


def personal_graphs(
    base: Base,
    labels: tuple[str, ...],
    params: dict[str, np.ndarray],
    examples: Examples,
    hp: Hyperparameters,
    *,
    with_model: bool = True,
) -> tuple[Any, Any]:
    """(the full inference model, the head for scoring) with these weights and memory;
    without `with_model`, (None, the head).

    Labels beyond the base's grow the last layer first; the memory of the user's examples
    goes in front of the logits of both, so `predict` and the retrain summary agree. The
    full model is read without its external weights file: write it with `write_model`.
    """
    import onnx

    from healthyluncher import graph

    head = onnx.load(str(base.path / Files.HEAD))
    targets = [head]
    model = None
    if with_model:
        model = onnx.load(str(base.path / Files.MODEL), load_external_data=False)
        targets.append(model)
    logits = head.graph.output[0].name
    extra = len(labels) - len(base.meta.labels)
    if extra > 0:
        axes = graph.class_axes(head, len(base.meta.labels))
        for target in targets:
            graph.grow_classes(target, axes, extra)
    for target in targets:
        graph.write_back(target, params)
    if hp.memory_strength > 0 and len(examples) > 0:
        rows, classes = memory_rows(examples, labels)
        replay = load_replay(base)
        for target in targets:
            graph.add_memory(
                target,
                base.meta.split_tensor,
                logits,
                rows,
                classes,
                len(labels),
                hp.memory_threshold,
                hp.memory_strength,
                replay,
            )
    return model, head


def _copy_weights_in_background(base: Base, directory: Path) -> Any:
    """Copy (and fsync) the base's frozen weights file into a new copy while the head
    trains: the GIL is free during both. A failure leaves nothing behind, and
    `write_model` copies again and reports it."""
    import os
    import shutil
    import threading

    source, target = base.path / Files.MODEL_DATA, directory / Files.MODEL_DATA

    def copy() -> None:
        if not source.is_file():
            return  # a base from before the weights file: nothing to copy
        try:
            shutil.copyfile(source, target)
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                target.unlink()

    thread = threading.Thread(target=copy, name="copy-weights", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class PersonalModel:
    """A personalized copy's models, serialized."""

    model: bytes | None  # the full inference model (external weights named in `locations`)
    head: bytes  # the head with the memory, for scoring head inputs
    locations: tuple[str, ...]


def render_personal(
    base: Base,
    labels: tuple[str, ...],
    params: dict[str, np.ndarray],
    examples: Examples,
    hp: Hyperparameters,
    *,
    with_model: bool = True,
) -> PersonalModel:
    """The personalized models for these weights and examples: from the base's template
    when it fits (no onnx import), else built with onnx by `personal_graphs`."""
    from healthyluncher import fastgraph

    template = None
    if hp.memory_strength > 0 and len(examples) > 0:
        template = fastgraph.load(base.path / Files.TEMPLATE)
    if template is not None and template.num_classes == len(labels):
        rows, classes = memory_rows(examples, labels)
        tensors = dict(params)
        tensors.update(
            fastgraph.personal_memory(
                rows, classes, len(labels), hp.memory_threshold, hp.memory_strength
            )
        )
        model_bytes, head_bytes = template.render(tensors)
        return PersonalModel(model_bytes if with_model else None, head_bytes, template.locations)
    from healthyluncher import graph

    model, head = personal_graphs(base, labels, params, examples, hp, with_model=with_model)
    if model is None:
        return PersonalModel(None, head.SerializeToString(), ())
    locations = tuple(sorted(graph.external_locations(model)))
    return PersonalModel(model.SerializeToString(), head.SerializeToString(), locations)


def write_model(personal: PersonalModel, base: Base, directory: Path) -> None:
    """Write a personalized model.onnx into `directory`, with a copy of the base's file of
    large frozen weights beside it: only the small graph is serialized on each retrain.
    (A copy, not a hard link: onnx.load refuses external data with several links.)"""
    import shutil

    assert personal.model is not None
    for location in personal.locations:
        if Path(location).name != location:
            raise LuncherError(f"the base model names an unexpected weights file {location!r}")
        source, target = base.path / location, directory / location
        try:
            if target.is_file() and target.stat().st_size == source.stat().st_size:
                continue  # copied in the background while the head trained
            shutil.copyfile(source, target)
        except FileNotFoundError:
            raise LuncherError(
                f"the base model's weights file is missing ({source}); "
                "run `luncher make-updatable` again"
            ) from None
    (directory / Files.MODEL).write_bytes(personal.model)


def memory_rows(examples: Examples, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The views to remember and their class indices: every photo's own view first, then
    augmented views while they fit in MEMORY_ROWS."""
    owner = examples.owner
    first = _first_view_indices(examples)
    rest = np.ones(len(owner), bool)
    rest[first] = False
    chosen = np.concatenate([first, np.flatnonzero(rest)])[:MEMORY_ROWS]
    classes = np.array([labels.index(examples.labels[o]) for o in examples.owner[chosen]])
    return examples.inputs[chosen], classes.astype(np.int64)


def _current_probabilities(
    base: Base,
    personal: Personal | None,
    examples: Examples,
    inputs: np.ndarray,
    named: Sequence[tuple[Path, str]],
) -> np.ndarray:
    """What the current model (personalized or base) says about these head inputs (the
    first views of the photos `named`). Photos the personalized copy already scored when it
    was trained are looked up; the model runs only when some are new to it."""
    from healthyluncher.training import HeadRunner

    if personal is None:
        return HeadRunner(base.path / Files.HEAD).probabilities(inputs)
    known = load_scores(personal)
    if all(digest in known for _, digest in named):
        return np.stack([known[digest] for _, digest in named])
    meta = personal.meta
    rendered = render_personal(
        base, meta.labels, load_weights(personal), examples, meta.hyperparameters, with_model=False
    )
    return HeadRunner(rendered.head).probabilities(inputs)


def load_scores(personal: Personal) -> dict[str, np.ndarray]:
    """{digest: probabilities} saved with the copy; empty when missing or unreadable (the
    scores are then computed again)."""
    import zipfile

    try:
        with np.load(personal.path / Files.SCORES, allow_pickle=False) as data:
            digests, probs = data["digests"], data["probabilities"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return {}
    if probs.ndim != 2 or len(probs) != len(digests) or probs.shape[1] != len(personal.meta.labels):
        return {}
    return {str(d): p for d, p in zip(digests, probs, strict=True)}


def _first_view_indices(examples: Examples) -> np.ndarray:
    """Row index of each photo's own (first) view."""
    first = np.full(len(examples), len(examples.owner))
    np.minimum.at(first, examples.owner, np.arange(len(examples.owner)))
    return first


def first_views(examples: Examples) -> np.ndarray:
    """Each photo's own (first) view: (photos, *sample_shape)."""
    views: np.ndarray = examples.inputs[_first_view_indices(examples)]
    return views


@dataclass(frozen=True)
class Fitted:
    final_loss: float
    scores: dict[str, np.ndarray]  # {digest: probabilities} of every example, after training


def fit_and_publish(
    store: ModelStore,
    state: State,
    base: Base,
    labels: tuple[str, ...],
    examples: Examples,
    hp: Hyperparameters,
    *,
    progress: ProgressCallback | None = None,
) -> Fitted:
    """Train the head from the base's weights on the examples plus replay, then publish a
    new personalized copy and switch to it (the caller holds the lock).

    Labels beyond the base's grow the head: old classes keep their weights, the new ones
    start at zero, and training artifacts for the grown head are generated with the copy.
    """
    from healthyluncher.training import HeadRunner, generate_artifacts, train

    data = training_set(examples, load_replay(base), labels, hp)
    extra = len(labels) - len(base.meta.labels)
    with store.staging() as staged:
        copying = _copy_weights_in_background(base, staged)
        try:
            artifact_dir = base.path / Files.ARTIFACTS
            if extra > 0:
                # The grown head, without memory, is what trains from now on.
                import onnx

                from healthyluncher import graph

                head = onnx.load(str(base.path / Files.HEAD))
                graph.grow_classes(head, graph.class_axes(head, len(base.meta.labels)), extra)
                onnx.save(head, str(staged / Files.HEAD))
                artifact_dir = staged / Files.ARTIFACTS
                generate_artifacts(head, base.meta.trainable_params, hp.optimizer, artifact_dir)

            def on_epoch(epoch: int, total: int, loss: float) -> None:
                if progress:
                    progress("training", epoch, total)

            trained = train(
                artifact_dir, data, hp, batch_limit=base.meta.head_batch_limit, on_epoch=on_epoch
            )
            rendered = render_personal(base, labels, trained.params, examples, hp)
            copying.join()  # write_model finds the weights file complete
            write_model(rendered, base, staged)
            save_arrays(staged / Files.WEIGHTS, trained.params)
            trained.save_checkpoint(staged / Files.CHECKPOINT)
            save_examples(examples, staged / Files.EXAMPLES)
            previous = load_personal(store, state)
            meta = PersonalMeta(
                base_sha256=base.meta.sha256,
                labels=labels,
                hyperparameters=hp,
                trained_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                retrains=(previous.meta.retrains if previous else 0) + 1,
                examples_per_label=examples.per_label(),
                final_loss=trained.final_loss,
            )
            write_json(staged / Files.META, meta.to_json())
            # What the new copy says about every example photo: the retrain's summary, and the
            # "before" of the next retrain of these photos, without running the model again.
            probs = HeadRunner(rendered.head).probabilities(first_views(examples))
            save_arrays(
                staged / Files.SCORES,
                {"digests": np.array(examples.digests, dtype=np.str_), "probabilities": probs},
            )
        finally:
            copying.join()  # never leave it writing into a removed directory
        name = store.publish_dir(staged, "personal")
    history = [state.personal or "", *state.history][:HISTORY_LIMIT]
    new_state = State(base=state.base, personal=name, history=history)
    store.write_state(new_state)
    store.collect_garbage(new_state)
    scores = dict(zip(examples.digests, probs, strict=True))
    return Fitted(final_loss=trained.final_loss, scores=scores)


def reset(store: ModelStore) -> ResetResult:
    """Back to the pristine base. Works on a damaged models directory too: it is the way
    out that every other error message points to."""
    with store.lock():
        try:
            state = store.read_state()
        except LuncherError:
            state = store.recover_state()
        try:
            personal = load_personal(store, state) if state.personal else None
            removed = dict(personal.meta.examples_per_label) if personal else {}
        except LuncherError:  # a damaged personal copy: remove it all the same
            personal, removed = None, {"(unreadable)": 0}
        had_personal = state.personal is not None
        new_state = State(base=state.base, personal=None, history=[])
        store.write_state(new_state)
        cache_files = store.clear_cache() + store.remove_thumbnails()
        store.collect_garbage(new_state)
    return ResetResult(
        removed_examples=removed,
        removed_model=had_personal,
        removed_cache_files=cache_files,
    )


@dataclass(frozen=True)
class UndoResult:
    restored: str  # "personalized" or "base"
    trained_at: str | None
    examples_per_label: dict[str, int]
    remaining_undos: int


def undo(store: ModelStore) -> UndoResult:
    """Go back to the personalized state before the last retrain (or forget)."""
    with store.lock():
        state = store.read_state()
        if not state.history:
            raise LuncherError("nothing to undo")
        previous, *older = state.history
        new_state = State(base=state.base, personal=previous or None, history=older)
        store.write_state(new_state)
        store.collect_garbage(new_state)
        personal = load_personal(store, new_state)
    return UndoResult(
        restored="personalized" if personal else "base",
        trained_at=personal.meta.trained_at if personal else None,
        examples_per_label=dict(personal.meta.examples_per_label) if personal else {},
        remaining_undos=len(older),
    )


@dataclass(frozen=True)
class ForgetResult:
    forgotten: int
    examples_per_label: dict[str, int]
    retrained: bool


def forget(
    store: ModelStore, inputs: Sequence[Path], progress: ProgressCallback | None = None
) -> ForgetResult:
    """Remove these photos' examples (matched by content hash) and retrain without them.

    History is cleared too, so `undo` cannot bring a forgotten photo back.
    """
    paths = find_images(inputs)
    digests = {digest_of(read_bytes(path)) for path in paths}
    with store.lock():
        state = store.read_state()
        base = load_base(store, state)
        personal = load_personal(store, state)
        if personal is None:
            raise LuncherError("there are no examples to forget: the model is not personalized")
        examples = load_examples(personal, ())
        keep = [i for i, digest in enumerate(examples.digests) if digest not in digests]
        forgotten = len(examples) - len(keep)
        if forgotten == 0:
            raise LuncherError("none of these photos are among your examples")
        remaining = select_examples(examples, keep)
        store.remove_thumbnails(digests)
        for path in store.cache_dir(base.meta.embedding_key).glob("*.npy"):
            if path.name.split(".")[0] in digests:
                path.unlink(missing_ok=True)
        if len(remaining) == 0:
            new_state = State(base=state.base, personal=None, history=[])
            store.write_state(new_state)
            store.collect_garbage(new_state)
            return ForgetResult(forgotten, {}, retrained=False)
        labels = tuple(
            label
            for label in personal.meta.labels
            if label in base.meta.labels or label in remaining.labels
        )
        cleared = State(base=state.base, personal=state.personal, history=[])
        fit_and_publish(
            store,
            cleared,
            base,
            labels,
            remaining,
            personal.meta.hyperparameters,
            progress=progress,
        )
        final = store.read_state()
        final.history = []
        store.write_state(final)
        store.collect_garbage(final)
    return ForgetResult(forgotten, remaining.per_label(), retrained=True)


def select_examples(examples: Examples, keep: list[int]) -> Examples:
    """The photos at `keep`, in that order, with their views."""
    if not keep:
        return Examples(examples.inputs[:0], examples.owner[:0], (), ())
    inputs, owner = [], []
    for new_index, old_index in enumerate(keep):
        views = examples.inputs[examples.owner == old_index]
        inputs.append(views)
        owner.append(np.full(len(views), new_index, np.int64))
    return Examples(
        np.concatenate(inputs),
        np.concatenate(owner),
        tuple(examples.digests[i] for i in keep),
        tuple(examples.labels[i] for i in keep),
    )


def status(store: ModelStore) -> Status:
    state = ensure_base(store)
    base = load_base(store, state)
    personal = load_personal(store, state)
    hp = personal.meta.hyperparameters if personal else base.meta.hyperparameters
    return Status(
        models_dir=store.root,
        base_name=base.meta.name,
        base_sha256=base.meta.sha256,
        base_source=base.meta.source,
        labels=personal.meta.labels if personal else base.meta.labels,
        predicting_with="personalized" if personal else "base",
        examples_per_label=dict(personal.meta.examples_per_label) if personal else {},
        last_retrain=personal.meta.trained_at if personal else None,
        retrains=personal.meta.retrains if personal else 0,
        hyperparameters=hp.to_json(),
        trainable_layers=base.meta.trainable_layers,
        replay_examples=base.meta.replay_examples,
        undo_steps=len(state.history),
        int8=base.meta.int8,
        disk_bytes=sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file()),
    )
