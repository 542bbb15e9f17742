"""What you taught: the example photos, and the labels (listed, renamed, removed)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from healthyluncher.embedder import rebuild_examples
from healthyluncher.errors import (
    FORGET,
    MAKE_UPDATABLE_EXAMPLES,
    RESET_PURGE,
    UNDO,
    DamagedViewsError,
    LuncherError,
)
from healthyluncher.events import ProgressCallback
from healthyluncher.examples import apart_from_forgotten, select_examples
from healthyluncher.jsonform import frozen_result
from healthyluncher.meta import check_new_label, known_label, label_key
from healthyluncher.personal import publish_personal
from healthyluncher.photos import MemoryPhoto, PhotoSource, digest_of, find_images, read_bytes
from healthyluncher.records import (
    Base,
    Examples,
    Personal,
    load_base,
    load_examples,
    load_personal,
    load_taught,
    load_weights,
    make_updatable_command,
)
from healthyluncher.state import State
from healthyluncher.store import Files, ModelStore
from healthyluncher.training import check_trainable


@dataclass(frozen=True)
class TaughtExample:
    """One photo you taught, as the models directory remembers it."""

    label: str
    digest: str  # sha256 of the photo's bytes: `luncher forget DIGEST` names it
    name: str | None  # the file name it was taught from, when known
    taught: str | None  # when (ISO 8601, UTC), when known
    thumbnail: Path | None  # the small JPEG kept of it, if any


@dataclass(frozen=True)
class LabelInfo:
    """A label predictions choose from, with how many of your photos have it."""

    label: str
    examples: int  # your photos with this label
    from_base: bool  # a class of the base (else one you added)


@dataclass(frozen=True)
class RenameResult:
    """A label you added, renamed: `examples` of your photos now have the `new` name."""

    old: str
    new: str
    examples: int


def list_examples(store: ModelStore, label: str | None = None) -> list[TaughtExample]:
    """Your examples in the order taught, optionally of one label."""

    def load(state: State) -> tuple[Personal | None, Examples | None]:
        personal = load_personal(store, state)
        return personal, load_examples(personal, ()) if personal else None

    personal, examples = store.read_consistently(load)
    if personal is None or examples is None:
        return []
    known = load_taught(personal)
    label = None if label is None else known_label(label, personal.meta.labels)
    if label is not None and label not in personal.meta.labels:
        raise LuncherError(f"{label!r} is not a label ({', '.join(personal.meta.labels)})")
    found = []
    for digest, own in zip(examples.digests, examples.labels, strict=True):
        if label is not None and own != label:
            continue
        name, when = known.get(digest, (None, None))
        thumbnail = store.thumbnail(digest)
        found.append(
            TaughtExample(own, digest, name, when, thumbnail if thumbnail.is_file() else None)
        )
    return found


def list_labels(store: ModelStore) -> list[LabelInfo]:
    """Every label predictions choose from, with how many of your photos have it."""

    def load(state: State) -> tuple[Base, Personal | None]:
        return load_base(store, state), load_personal(store, state)

    base, personal = store.read_consistently(load)
    labels = personal.meta.labels if personal else base.meta.labels
    counts = dict(personal.meta.examples_per_label) if personal else {}
    return [LabelInfo(x, counts.get(x, 0), x in base.meta.labels) for x in labels]


def rename_label(store: ModelStore, old: str, new: str) -> RenameResult:
    """Give a label you added another name: the same weights and examples under the new
    name, published as one change that `undo` reverses."""
    new = check_new_label(new)
    with store.transaction() as txn:
        base = load_base(store, txn.state)
        personal = load_personal(store, txn.state)
        labels = personal.meta.labels if personal else base.meta.labels
        old = known_label(old, labels)
        if old not in labels:
            raise LuncherError(f"{old!r} is not a label ({', '.join(labels)})")
        if old in base.meta.labels:
            raise LuncherError(
                f"{old!r} is a class of the base model; only labels you added can be renamed "
                "(make a base with your own labels with ",
                make_updatable_command(store.root, MAKE_UPDATABLE_EXAMPLES),
                "; ",
                UNDO,
                " brings this one back)",
            )
        if any(label_key(new) == label_key(label) for label in labels):
            raise LuncherError(f"{new!r} is already a label")
        assert personal is not None  # a label beyond the base's exists only in a copy
        examples = load_examples(personal, ())
        renamed = Examples(
            examples.inputs,
            examples.owner,
            examples.digests,
            tuple(new if x == old else x for x in examples.labels),
            examples.origin,
            examples.segments,
        )
        new_labels = tuple(new if x == old else x for x in labels)
        meta = personal.meta
        # Everything but the names as it was: when and with what settings it was trained.
        restored = replace(meta, labels=new_labels, examples_per_label=renamed.per_label())
        publish_personal(
            txn,
            base,
            new_labels,
            renamed,
            meta.hyperparameters,
            restore=(load_weights(personal), restored),
        )
    return RenameResult(old, new, renamed.labels.count(new))


@dataclass(frozen=True)
class RepairResult:
    """What `repair` found and rebuilt; `repaired` False: state.json was sound."""

    repaired: bool  # state.json was damaged and is now rebuilt
    base: str | None  # the directories the state names
    personal: str | None
    undo_steps: int
    # The saved views of your photos were damaged: these many photos were embedded again
    # from their thumbnails and the head retrained (a new undo step); `lost`: no thumbnail.
    reembedded: int = 0
    lost: int = 0


def repair(store: ModelStore, progress: ProgressCallback | None = None) -> RepairResult:
    """Rewrite state.json if it is damaged (from the newest complete state the directories
    hold: see `state.recover`) and remove what interrupted commands left behind. If the
    saved views of your photos cannot be read (the undo steps share them), embed the photos
    again from their thumbnails and retrain."""
    with store.transaction() as txn:
        state = txn.state
        txn.commit(state)  # written again, then every directory it does not name goes
        repaired = txn.repaired
    reembedded = lost = 0
    with store.transaction() as txn:
        personal = load_personal(store, txn.state)
        try:
            load_examples(personal, ())
        except DamagedViewsError:
            assert personal is not None
            base = load_base(store, txn.state)
            old = load_examples(personal, (), views=False)
            hp = personal.meta.hyperparameters
            examples, lost = rebuild_examples(
                store, base, old.digests, old.labels, hp, progress, new_base=False
            )
            if len(examples) == 0:
                raise LuncherError(
                    "none of your photos has a thumbnail to embed again; ",
                    RESET_PURGE,
                    " starts over",
                ) from None
            labels = tuple(
                x for x in personal.meta.labels if x in base.meta.labels or x in examples.labels
            )
            publish_personal(txn, base, labels, examples, hp, progress=progress)
            reembedded = len(examples.digests)
        state = txn.state
    return RepairResult(repaired, state.base, state.personal, len(state.history), reembedded, lost)


@frozen_result
@dataclass(frozen=True)
class ForgetResult:
    """How many examples were forgotten, those left, and whether the head was retrained."""

    forgotten: int
    examples_per_label: dict[str, int]
    retrained: bool


def forget(
    store: ModelStore,
    inputs: Sequence[PhotoSource],
    progress: ProgressCallback | None = None,
    *,
    label: str | None = None,
) -> ForgetResult:
    """Remove these photos' examples and retrain without them. A photo is matched by its
    content, so a copy works; a thumbnail from the models directory, or a digest (its
    first 8 or more hex digits, as `luncher examples` shows), names one whose file is gone.
    With `label`, every example of that label goes (a label you added without examples
    goes alone: no photo is forgotten, so the history stays).

    One transaction: the retrained copy is published and the history cleared in a single
    switch of state.json, so `undo` can never bring a forgotten photo back; the photos'
    thumbnails and cached head inputs are deleted only after that switch, so a failed
    retrain leaves everything as it was. A photo only an undo step holds (an example that
    an import or a new base replaced) is forgotten by clearing the history alone; after a
    reset, clearing it would drop the personalization the reset kept, so the way is named.
    """
    for item in inputs:  # a URL or a typo is named before anything else is said
        if not _names_a_digest(item):
            find_images([item])
    with store.transaction() as txn:
        state = txn.state
        base = load_base(store, state)
        personal = load_personal(store, state)
        held = _held_by_undo_steps(store, state) if label is None else set()
        if personal is None:
            if held and _named_digests(store, inputs, sorted(held)) & held:
                raise LuncherError(
                    "these photos are not among your examples (the model is not personalized) "
                    "but an undo step holds them: ",
                    UNDO,
                    " brings it back, and ",
                    FORGET,
                    " then removes them; ",
                    RESET_PURGE,
                    " removes every undo step",
                )
            raise LuncherError("there are no examples to forget: the model is not personalized")
        check_trainable(base.meta, base.path)
        examples = load_examples(personal, ())
        if label is None:
            known = [*examples.digests, *sorted(held - set(examples.digests))]
            digests = _named_digests(store, inputs, known)
        else:
            label = known_label(label, personal.meta.labels)
            digests = {
                d for d, x in zip(examples.digests, examples.labels, strict=True) if x == label
            }
            if label not in personal.meta.labels:  # a typo is not a label without examples
                raise LuncherError(f"{label!r} is not a label ({', '.join(personal.meta.labels)})")
            if not digests and label in base.meta.labels:
                raise LuncherError(f"there are no examples of {label!r}")
        keep = [i for i, digest in enumerate(examples.digests) if digest not in digests]
        gone = digests & (set(examples.digests) | held)
        forgotten = len(gone)
        if label is None and forgotten == 0:
            raise LuncherError("none of these photos are among your examples")
        cache = store.cache_dir(base.meta.embedding_key)

        def remove_files() -> None:
            store.remove_thumbnails(gone)
            if cache.is_dir():
                for path in cache.glob("*.npy"):
                    if path.name.split(".")[0] in gone:
                        path.unlink(missing_ok=True)

        txn.after_commit(remove_files)
        if label is None and len(keep) == len(examples):  # only undo steps held them
            txn.commit(State(base=state.base, personal=state.personal, history=[]))
            return ForgetResult(forgotten, examples.per_label(), retrained=False)
        remaining = apart_from_forgotten(examples, select_examples(examples, keep), gone)
        if len(remaining) == 0:
            txn.commit(State(base=state.base, personal=None, history=[]))
            return ForgetResult(forgotten, {}, retrained=False)
        labels = tuple(
            label
            for label in personal.meta.labels
            if label in base.meta.labels or label in remaining.labels
        )
        hp = personal.meta.hyperparameters
        publish_personal(txn, base, labels, remaining, hp, keep_history=not gone, progress=progress)
    return ForgetResult(forgotten, remaining.per_label(), retrained=True)


def _held_by_undo_steps(store: ModelStore, state: State) -> set[str]:
    """The photos the undo steps' copies hold."""
    held: set[str] = set()
    for step in state.history:
        with contextlib.suppress(LuncherError):  # a damaged step: a forget clears it anyway
            copy = load_personal(store, State(step.base, step.personal))
            held.update(load_examples(copy, (), views=False).digests)
    return held


HEX = re.compile(r"[0-9a-f]{8,64}")


def _named_digests(
    store: ModelStore, inputs: Sequence[PhotoSource], known: Sequence[str]
) -> set[str]:
    """The digests these inputs name: photos by content, thumbnails by name, digests."""
    thumbnails = (store.root / Files.THUMBNAILS).resolve()
    found: set[str] = set()
    for item in inputs:
        if _names_a_digest(item):
            assert isinstance(item, Path)
            prefix = item.name.lower()
            matches = [d for d in known if d.startswith(prefix)]
            if len(matches) > 1:
                raise LuncherError(f"{prefix} starts {len(matches)} digests; give more of it")
            if not matches:
                raise LuncherError(f"{prefix}: none of your examples has this digest")
            found.add(matches[0])
            continue
        for path in find_images([item]):
            if isinstance(path, Path) and path.resolve().parent == thumbnails:
                found.add(path.stem)  # a thumbnail is named by its photo's digest
            else:
                found.add(digest_of(read_bytes(path)))
                found.update(path.also if isinstance(path, MemoryPhoto) else ())
    return found


def _names_a_digest(item: PhotoSource) -> bool:
    """A missing file named like a digest (or its first 8 or more hex digits)."""
    if not isinstance(item, Path) or os.path.exists(item):  # a name too long: False
        return False
    return bool(HEX.fullmatch(item.name.lower()))
