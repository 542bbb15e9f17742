"""Personalizing: retrain, forget, undo, reset and status, each one transaction of the store."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher import jsonform
from healthyluncher.embedder import Embedder
from healthyluncher.errors import LuncherError, UnknownLabelError
from healthyluncher.events import ProgressCallback
from healthyluncher.examples import memory_plan, merge_examples
from healthyluncher.meta import PersonalMeta, check_label, check_new_label, known_label
from healthyluncher.personal import current_probabilities, publish_personal
from healthyluncher.photos import ImageFailure, PhotoSource, digest_of, find_images, read_bytes
from healthyluncher.predictor import restorable
from healthyluncher.records import Examples, load_base, load_examples, load_personal, undo_examples
from healthyluncher.runtime import install_problem
from healthyluncher.settings import Hyperparameters
from healthyluncher.state import State
from healthyluncher.store import ModelStore
from healthyluncher.training import check_trainable, trainer_for
from healthyluncher.version import __version__


@dataclass(frozen=True)
class TrainedPhoto:
    """A photo a retrain taught: its `digest` (sha256 of its bytes) names it later, and
    `before` and `after` are the label's probability before and after the retrain."""

    path: PhotoSource
    digest: str
    before: float  # probability of the label before this retrain
    after: float


@dataclass(frozen=True)
class DuplicatePhoto:
    """A photo a retrain skipped: a copy of one given before it, or one already taught with
    this label (taught again, it would be the same example)."""

    path: PhotoSource
    digest: str
    reason: str  # "the same photo as a.jpg" or "already taught as 'healthy'"


@jsonform.frozen_result
@dataclass(frozen=True)
class RetrainResult:
    """What a retrain taught (`photos`), skipped (`failures`, `duplicates`) and left: your
    examples per label, the settings it used, its last epoch's mean loss."""

    label: str
    photos: tuple[TrainedPhoto, ...]  # the new examples, with their probabilities
    failures: tuple[ImageFailure, ...]
    examples_per_label: dict[str, int]
    hyperparameters: Hyperparameters
    final_loss: float
    embedded: int  # photos that ran through the frozen part (cache misses)
    cached: int  # photos whose head inputs came from the cache
    views: int = 1  # views per photo in this retrain
    new_label: bool = False  # the label was added to the model by this retrain
    duplicates: tuple[DuplicatePhoto, ...] = ()
    # False: no new photo and the same settings, so nothing was retrained or saved (no undo
    # step); the other fields describe the model as it is.
    changed: bool = True

    def to_json(self) -> dict[str, Any]:
        """As `luncher retrain --json` prints it (JSON values)."""
        form: dict[str, Any] = jsonform.to_json(
            {
                "label": self.label,
                "new_label": self.new_label,
                "changed": self.changed,
                "photos": self.photos,
                "skipped": self.failures,
                "duplicates": self.duplicates,
                "examples_per_label": self.examples_per_label,
                "final_loss": self.final_loss,
                "views_per_photo": self.views,
                "embedded": self.embedded,
                "cached": self.cached,
                "hyperparameters": self.hyperparameters,
            }
        )
        return form


@jsonform.frozen_result
@dataclass(frozen=True)
class ResetResult:
    """What a reset set aside (`undoable`) or, with `purge`, removed for good."""

    removed_examples: dict[str, int]
    removed_model: bool
    removed_thumbnails: int
    removed_cache_files: int
    undoable: bool = False  # `undo` brings the personalization back (not after a purge)
    removed_undo_steps: int = 0  # by a purge (after a reset, the personalization is one)


@jsonform.frozen_result
@dataclass(frozen=True)
class Status:
    """The models directory at a glance: the base, your examples, the settings the next
    retrain uses (`hyperparameters`), the trainer, the undo steps and the disk used."""

    models_dir: Path
    base_name: str
    base_sha256: str
    base_source: str
    labels: tuple[str, ...]
    predicting_with: str  # "personalized" or "base"
    examples_per_label: dict[str, int] = field(default_factory=dict)
    last_retrain: str | None = None
    retrains: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the next retrain's
    last_retrain_hyperparameters: dict[str, Any] = field(default_factory=dict)  # what it used
    trainable_layers: int = 1
    replay_examples: int = 0
    undo_steps: int = 0
    disk_bytes: int = 0  # everything in the models directory
    int8: bool = False  # the frozen part is quantized
    trainer: str = "onnxruntime"  # what trains the head here: "onnxruntime" or "numpy"
    warning: str | None = None  # a problem with this environment's ONNX Runtime
    version: str = ""  # of healthyluncher
    # The nearest-neighbour memory: photos remembered one by one (the newest), and older
    # photos summarized in fewer rows (see examples.memory_rows).
    memory_photos: int = 0
    memory_summarized: int = 0
    # What `undo` brings back: its step's examples ({} for a step without any, or no step).
    undo_examples_per_label: dict[str, int] = field(default_factory=dict)


def retrain(
    store: ModelStore,
    label: str,
    inputs: Sequence[PhotoSource],
    *,
    new_label: bool = True,
    epochs: int | None = None,
    learning_rate: float | None = None,
    augment_views: int | None = None,
    memory_strength: float | None = None,
    save: bool = False,
    progress: ProgressCallback | None = None,
) -> RetrainResult:
    """Add the photos as examples of `label` (a new label grows the head) and retrain."""
    label = check_label(label)
    paths = find_images(inputs)
    if not paths:
        given = ", ".join(str(p) for p in inputs) or "(nothing)"
        raise LuncherError(f"no image files found in {given}")
    with store.transaction() as txn:
        base = load_base(store, txn.state)
        personal = load_personal(store, txn.state)
        check_trainable(base.meta, base.path)
        old_labels = personal.meta.labels if personal else base.meta.labels
        label = known_label(label, old_labels)  # never a twin label in another Unicode form
        if label not in old_labels and not new_label:
            raise UnknownLabelError(label, old_labels)
        labels = old_labels if label in old_labels else (*old_labels, check_new_label(label))
        settings = personal.meta.hyperparameters if personal else base.meta.hyperparameters
        hp = settings.replace(
            epochs=epochs,
            learning_rate=learning_rate,
            augment_views=augment_views,
            view_budget=0 if augment_views is not None else None,  # --views N: exactly N
            memory_strength=memory_strength,
        )
        # Earlier photos keep the views they were embedded with: training weighs photos,
        # not views. A photo taught before is read from them, not embedded again.
        old_examples = load_examples(personal, ()) if personal else None
        paths, digests, failures, duplicates = _new_photos(paths, old_examples, label)
        views = hp.views_for(len(paths))
        embedder = Embedder(store, base, views, known=old_examples)
        embedded, unread, misses = embedder.embed(
            paths, progress, digests=digests, own_digests=True
        )
        failures += unread
        # What later retrains start from: one-off settings apply once; the memory's
        # strength is part of the model (and of its later "before"), so it is always kept.
        kept = hp if save else settings.replace(memory_strength=memory_strength)
        if not embedded and (personal is None or not duplicates):
            raise LuncherError(
                "none of the photos could be used: " + "; ".join(f.error for f in failures)
            )
        if not embedded and personal and _same_settings(personal.meta, hp, kept):
            meta = personal.meta  # nothing to change: no retrain, no new undo step
            return RetrainResult(
                label,
                photos=(),
                failures=tuple(failures),
                examples_per_label=dict(meta.examples_per_label),
                hyperparameters=hp,
                final_loss=meta.final_loss,
                embedded=0,
                cached=0,
                views=views,
                duplicates=duplicates,
                changed=False,
            )
        if old_examples is None:
            old_examples = Examples.empty(embedded[0][2].shape[1:])
        del embedder  # it holds the old examples
        named = [(path, digest) for path, digest, _ in embedded]
        if embedded:
            probe = np.stack([views[0] for _, _, views in embedded])
            before = current_probabilities(base, personal, old_examples, probe, named)
        else:  # settings changed alone: the examples are retrained as they are
            before = np.zeros((0, len(old_labels)))
        examples = merge_examples(old_examples, [(d, v) for _, d, v in embedded], label)
        del embedded, old_examples  # the views live on in `examples` alone
        if label in old_labels:
            before_label = before[:, old_labels.index(label)]
        else:
            before_label = np.zeros(len(named))  # the label did not exist yet
        names = {digest: _display_name(path) for path, digest in named}
        fitted = publish_personal(
            txn,
            base,
            labels,
            examples,
            hp,
            names=names,
            progress=progress,
            remember=None if save else kept,
        )
    after_label = [float(fitted.scores[digest][labels.index(label)]) for _, digest in named]
    photos = tuple(
        TrainedPhoto(path, digest, float(b), a)
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
        duplicates=duplicates,
    )


def _new_photos(
    paths: Sequence[PhotoSource], known: Examples | None, label: str
) -> tuple[list[PhotoSource], list[str], list[ImageFailure], tuple[DuplicatePhoto, ...]]:
    """The photos to teach and their digests, those that cannot be read, and the duplicates:
    a photo whose content came earlier in `paths`, or that `known` has with `label`."""
    pairs = zip(known.digests, known.labels, strict=True) if known else ()
    taught = {digest for digest, own in pairs if own == label}
    first: dict[str, PhotoSource] = {}
    failures: list[ImageFailure] = []
    duplicates: list[DuplicatePhoto] = []
    for path in paths:
        try:
            digest = digest_of(read_bytes(path))
        except LuncherError as exc:  # read_bytes names the photo
            failures.append(ImageFailure(path, str(exc)))
            continue
        if digest in first:
            duplicates.append(DuplicatePhoto(path, digest, f"the same photo as {first[digest]}"))
        elif digest in taught:
            duplicates.append(DuplicatePhoto(path, digest, f"already taught as {label!r}"))
        else:
            first[digest] = path
    return list(first.values()), list(first), failures, tuple(duplicates)


def _same_settings(meta: PersonalMeta, used: Hyperparameters, kept: Hyperparameters) -> bool:
    """A retrain without new photos would train the copy of `meta` again as it was trained:
    with the same settings (views aside: they are for new photos), the same kept for later."""
    was = meta.used
    views = {"augment_views": was.augment_views, "view_budget": was.view_budget}
    return used.replace(**views) == was and kept == meta.hyperparameters


def reset(store: ModelStore, *, purge: bool = False) -> ResetResult:
    """Back to the pristine base; `undo` brings the personalization back. With `purge`, the
    personalization, every undo step, the thumbnails of your photos and the cache go for
    good. Works on a damaged models directory too (a damaged copy is not kept for undo)."""
    with store.transaction() as txn:
        state = txn.state
        readable = True
        try:
            personal = load_personal(store, state) if state.personal else None
            removed = dict(personal.meta.examples_per_label) if personal else {}
        except LuncherError:  # a damaged personal copy: remove it all the same
            removed, readable = {"(unreadable)": 0}, False
        had_personal = state.personal is not None
        counts = [0, 0, 0]
        undoable = had_personal and readable and not purge
        if purge and (had_personal or state.history or store.has_user_files()):
            txn.commit(State(base=state.base, personal=None, history=[]))
            counts[2] = len(state.history)

            def remove_files() -> None:
                counts[0] = store.remove_thumbnails()
                counts[1] = store.clear_cache()

            txn.after_commit(remove_files)
        elif undoable:
            txn.commit(state.with_personal(None))
        elif had_personal:  # unreadable: not worth an undo step
            txn.commit(State(base=state.base, personal=None, history=state.history))
    return ResetResult(
        removed_examples=removed,
        removed_model=had_personal,
        removed_thumbnails=counts[0],
        removed_cache_files=counts[1],
        undoable=undoable,
        removed_undo_steps=counts[2],
    )


@jsonform.frozen_result
@dataclass(frozen=True)
class UndoResult:
    """Where undo went back to: a personalized copy (trained at `trained_at`) or the base."""

    restored: str  # "personalized" or "base"
    trained_at: str | None
    examples_per_label: dict[str, int]
    remaining_undos: int
    base_changed: str | None = None  # the name of the base undo went back to, if another


def undo(store: ModelStore) -> UndoResult:
    """Go back to the personalized state before the last retrain (or import)."""
    with store.transaction() as txn:
        state = txn.state
        if not state.history:
            raise LuncherError("nothing to undo")
        previous, *older = state.history
        new_state = State(
            base=previous.base or state.base, personal=previous.personal, history=older
        )
        personal = restorable(store, new_state)
        switched = new_state.base != state.base  # a new base from make-updatable, undone
        base_name = load_base(store, new_state).meta.name if switched else None
        txn.commit(new_state)
    return UndoResult(
        restored="personalized" if personal else "base",
        trained_at=personal.meta.trained_at if personal else None,
        examples_per_label=dict(personal.meta.examples_per_label) if personal else {},
        remaining_undos=len(older),
        base_changed=base_name,
    )


def status(store: ModelStore) -> Status:
    return store.read_consistently(lambda state: _status(store, state))


def _status(store: ModelStore, state: State) -> Status:
    base = load_base(store, state)
    personal = load_personal(store, state)
    hp = personal.meta.hyperparameters if personal else base.meta.hyperparameters
    photos = sum(personal.meta.examples_per_label.values()) if personal else 0
    plan = memory_plan(photos) if hp.memory_strength > 0 else (0, 0)
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
        last_retrain_hyperparameters=personal.meta.used.to_json() if personal else {},
        trainable_layers=base.meta.trainable_layers,
        replay_examples=base.meta.replay_examples,
        undo_steps=len(state.history),
        memory_photos=plan[0],
        memory_summarized=plan[1],
        undo_examples_per_label=undo_examples(store, state),
        int8=base.meta.int8,
        disk_bytes=_disk_bytes(store.root),
        trainer=trainer_for(base.meta, base.path, cheap=True),
        warning=install_problem(),
        version=__version__,
    )


def _display_name(path: PhotoSource) -> str:
    return path.name if isinstance(path, Path) else str(path)


def _disk_bytes(root: Path) -> int:
    """The bytes of every file, a file with several hard links (an undo step's weights
    file and its base's) counted once."""
    sizes: dict[tuple[int, int], int] = {}
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile by a writer
            if path.is_file():
                info = path.stat()
                sizes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(sizes.values())
