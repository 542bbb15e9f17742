"""import: a backup archive restored through the store (export writes one: exporting.py).

The archive's format and its checks live in archive.py. Import verifies the whole archive in
a scratch directory first; only then is the models directory touched, through one
transaction, like every other change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from healthyluncher.archive import Backup, read_backup
from healthyluncher.backupchecks import refuse
from healthyluncher.embedder import rebuild_examples
from healthyluncher.errors import LuncherError, Param
from healthyluncher.events import ProgressCallback
from healthyluncher.fileio import atomic_write_bytes
from healthyluncher.jsonform import frozen_result
from healthyluncher.personal import example_scores, publish_personal, render_personal
from healthyluncher.records import (
    Base,
    load_base,
    load_examples,
    load_personal,
    load_taught,
    load_weights,
)
from healthyluncher.store import Files, ModelStore, Transaction
from healthyluncher.thumbnails import make_room


@frozen_result
@dataclass(frozen=True)
class ImportResult:
    """The personalization a backup restored (`undo` goes back to the one it replaced)."""

    rebuilt: bool  # embedded again with the current base and retrained (another base)
    labels: tuple[str, ...]
    new_labels: tuple[str, ...]  # labels the current base does not have
    examples_per_label: dict[str, int]
    trained_at: str | None
    undo_steps: int
    not_carried: int = 0  # photos without a usable thumbnail (rebuild only)
    # The examples per label the import replaced (`undo` brings them back).
    replaced: dict[str, int] = field(default_factory=dict)
    # False: the backup is the personalization in use, and no undo step was added.
    changed: bool = True


def import_backup(
    store: ModelStore,
    archive: Path,
    *,
    rebuild: bool = False,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Verify the archive, then restore it with one switch of state.json (undo goes back).

    Made with this base: the exact weights and examples come back. Made with another base,
    and `rebuild`: its thumbnails are embedded with this base and the head is retrained.
    """
    # Inside the models directory: the thumbnails it holds are the user's photos, and a
    # killed import must not leave them in $TMPDIR; the next writer removes a leftover.
    with store.scratch() as scratch:
        backup = read_backup(archive, scratch)
        with store.transaction() as txn:
            base = load_base(store, txn.state)
            difference = _base_difference(backup, base)
            if difference and not rebuild:
                raise LuncherError(
                    f"{archive} {difference}; use ",
                    Param("rebuild", True),
                    " to embed its photos again with this base and retrain; nothing was imported",
                )
            if difference:
                return _rebuild(txn, base, backup, progress)
            if _in_use(txn, backup):
                return ImportResult(
                    rebuilt=False,
                    labels=backup.meta.labels,
                    new_labels=backup.meta.labels[len(base.meta.labels) :],
                    examples_per_label=backup.examples.per_label(),
                    trained_at=backup.meta.trained_at,
                    undo_steps=len(txn.state.history),
                    changed=False,
                )
            return _restore(txn, base, backup)


def _in_use(txn: Transaction, backup: Backup) -> bool:
    """Whether the backup is the personalization in use (on this base): its settings,
    weights, examples and their names, so that restoring it would change nothing but add
    an undo step, which pushes the oldest real one out of the history. A copy that is
    damaged, or lacks a thumbnail the backup holds, is not: the import mends it."""
    try:
        return _same_as_backup(txn, backup)
    except LuncherError:  # damaged weights, examples or their segments
        return False


def _same_as_backup(txn: Transaction, backup: Backup) -> bool:
    personal = load_personal(txn.store, txn.state)
    if personal is None:
        return False
    if not all(txn.store.thumbnail(digest).is_file() for digest in backup.thumbnails):
        return False
    restored = replace(backup.meta, examples_per_label=backup.examples.per_label())
    if personal.meta != restored or load_taught(personal) != backup.taught:
        return False
    weights = load_weights(personal)
    if set(weights) != set(backup.weights) or not all(
        np.array_equal(weights[name], backup.weights[name]) for name in weights
    ):
        return False
    ours, theirs = load_examples(personal, ()), backup.examples
    return (
        ours.digests == theirs.digests
        and ours.labels == theirs.labels
        and np.array_equal(ours.owner, theirs.owner)
        and np.array_equal(ours.inputs, theirs.inputs)
    )


def _base_difference(backup: Backup, base: Base) -> str:
    """Why the backup's weights and head inputs do not fit this base ("" when they do)."""
    theirs = backup.base
    if theirs["sha256"] != base.meta.sha256:
        return (
            f"was made with another base model ({theirs.get('name', '?')}, sha256 "
            f"{theirs['sha256'][:12]}; this one is {base.meta.name}, sha256 "
            f"{base.meta.sha256[:12]})"
        )
    if (
        tuple(theirs.get("labels", ())) != base.meta.labels
        or theirs.get("split_tensor") != base.meta.split_tensor
        or tuple(theirs.get("trainable_params", ())) != base.meta.trainable_params
        or theirs.get("preprocessing") != base.meta.preprocessing.to_json()
    ):
        return (
            "was made with this base model set up differently (labels, trainable layers or "
            "preprocessing)"
        )
    return ""


def _restore(txn: Transaction, base: Base, backup: Backup) -> ImportResult:
    """The exact weights, examples and settings, as a new personalized copy."""
    labels = backup.meta.labels
    base_labels = base.meta.labels
    if labels[: len(base_labels)] != base_labels or set(backup.weights) != set(
        base.meta.trainable_params
    ):
        raise refuse(backup.archive, "its labels or weights do not fit this base")
    from healthyluncher.heads import fit_problem  # onnx (0.3-0.9 s): not for export

    # Weights or examples that do not fit are refused before anything is written.
    problem = fit_problem(
        str(base.path / Files.HEAD),
        len(base_labels),
        len(labels),
        backup.weights,
        backup.examples.inputs.shape[1:],
    )
    if problem:
        raise refuse(backup.archive, problem)
    try:
        rendered = render_personal(
            base,
            labels,
            backup.weights,
            backup.examples,
            backup.meta.hyperparameters,
            with_model=False,
        )
        hp = backup.meta.hyperparameters
        scores = example_scores(base, labels, backup.weights, backup.examples, hp, rendered)
    except LuncherError as exc:
        raise refuse(backup.archive, f"its weights do not fit this base ({exc})") from None
    if not np.isfinite(scores).all():  # finite weights can still overflow
        raise refuse(backup.archive, "its weights give no scores for its own photos (overflow)")
    installed = _install_thumbnails(txn.store, backup.thumbnails)
    try:
        publish_personal(
            txn,
            base,
            labels,
            backup.examples,
            backup.meta.hyperparameters,
            restore=(backup.weights, backup.meta),
            taught=backup.taught,
        )
    except BaseException:
        _remove_thumbnails(txn.store, installed)
        raise
    assert txn.next_state is not None
    return ImportResult(
        rebuilt=False,
        labels=labels,
        new_labels=labels[len(base_labels) :],
        examples_per_label=backup.examples.per_label(),
        trained_at=backup.meta.trained_at,
        undo_steps=len(txn.next_state.history),
        replaced=_current_examples(txn),
    )


def _rebuild(
    txn: Transaction, base: Base, backup: Backup, progress: ProgressCallback | None
) -> ImportResult:
    """Install the thumbnails, embed them with this base, and retrain with the backup's
    hyperparameters, as `make-updatable --keep-personalization` does."""
    store = txn.store
    if not backup.thumbnails:
        raise refuse(
            backup.archive,
            "it holds no thumbnails of your photos, so they cannot be embedded with this base",
        )
    hp = backup.meta.hyperparameters
    installed = _install_thumbnails(store, backup.thumbnails)
    try:
        old = backup.examples
        examples, missing = rebuild_examples(
            store, base, old.digests, old.labels, hp, progress, made_with=backup.meta.labels
        )
        if len(examples) == 0:
            raise refuse(backup.archive, "none of its thumbnails could be embedded with this base")
        present = set(examples.labels)
        labels = base.meta.labels + tuple(
            label
            for label in dict.fromkeys((*backup.meta.labels, *examples.labels))
            if label in present and label not in base.meta.labels
        )
        publish_personal(txn, base, labels, examples, hp, progress=progress, taught=backup.taught)
    except BaseException:
        _remove_thumbnails(store, installed)
        raise
    assert txn.next_state is not None
    return ImportResult(
        rebuilt=True,
        labels=labels,
        new_labels=labels[len(base.meta.labels) :],
        examples_per_label=examples.per_label(),
        trained_at=None,
        undo_steps=len(txn.next_state.history),
        not_carried=missing,
        replaced=_current_examples(txn),
    )


def _current_examples(txn: Transaction) -> dict[str, int]:
    personal = load_personal(txn.store, txn.state)
    return dict(personal.meta.examples_per_label) if personal else {}


def _install_thumbnails(store: ModelStore, thumbnails: dict[str, Path]) -> list[Path]:
    """Copy the thumbnails the store lacks; returns the ones written (to undo on failure)."""
    installed: list[Path] = []
    try:
        for digest, source in thumbnails.items():
            target = store.thumbnail(digest)
            if target.is_file():
                continue
            make_room(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, source.read_bytes())
            installed.append(target)
    except OSError as exc:
        _remove_thumbnails(store, installed)
        raise LuncherError(
            f"cannot write to {store.root}: {exc.strerror or exc}; "
            "the models directory was not changed"
        ) from None
    return installed


def _remove_thumbnails(store: ModelStore, installed: list[Path]) -> None:
    for path in installed:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (store.root / Files.THUMBNAILS).rmdir()  # only if empty
