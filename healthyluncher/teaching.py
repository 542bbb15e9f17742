"""What you taught: the example photos, and the labels (listed, renamed, removed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from healthyluncher.embedder import rebuild_examples
from healthyluncher.errors import (
    MAKE_UPDATABLE_EXAMPLES,
    RESET_PURGE,
    DamagedViewsError,
    LuncherError,
)
from healthyluncher.events import ProgressCallback
from healthyluncher.meta import PersonalMeta, check_label, known_label, label_key
from healthyluncher.personal import publish_personal
from healthyluncher.records import (
    Base,
    Examples,
    Personal,
    load_base,
    load_examples,
    load_personal,
    load_taught,
    load_weights,
)
from healthyluncher.state import State
from healthyluncher.store import ModelStore


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
    label: str
    examples: int  # your photos with this label
    from_base: bool  # a class of the base (else one you added)


@dataclass(frozen=True)
class RenameResult:
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
    new = check_label(new)
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
                MAKE_UPDATABLE_EXAMPLES,
                ")",
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
        restored = PersonalMeta(
            base_sha256=meta.base_sha256,
            labels=new_labels,
            hyperparameters=meta.hyperparameters,
            trained_at=meta.trained_at,
            retrains=meta.retrains,
            examples_per_label=renamed.per_label(),
            final_loss=meta.final_loss,
        )
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
            examples, lost = rebuild_examples(store, base, old.digests, old.labels, hp, progress)
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
