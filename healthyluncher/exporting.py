"""export: the personalization, its examples and thumbnails written to one archive.

The archive's format lives in archive.py; import (backup.py) reads it back. Export only
reads the models directory, under a shared lock, so a read-only one can be exported too.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from healthyluncher.archive import BACKUP_FORMAT, BACKUP_KIND, CHUNK, MANIFEST
from healthyluncher.errors import RETRAIN, UNDO, LuncherError, Param
from healthyluncher.fileio import abandoned, fsync_dir, owned_folder
from healthyluncher.jsonform import frozen_result
from healthyluncher.records import (
    GO_BACK,
    Base,
    load_base,
    load_examples,
    load_personal,
    load_taught,
    load_weights,
    save_examples,
)
from healthyluncher.settings import backup_name_problem
from healthyluncher.state import State
from healthyluncher.store import Files, ModelStore
from healthyluncher.version import __version__


@frozen_result
@dataclass(frozen=True)
class ExportResult:
    """The backup written: where, how large, and the examples and thumbnails it holds."""

    path: Path
    size: int  # bytes of the archive
    labels: tuple[str, ...]
    examples_per_label: dict[str, int]
    thumbnails: int
    without_thumbnail: int  # photos that restore on this base but cannot be re-embedded


# gzip level of backups (see export_backup).
GZIP_LEVEL = 1


def export_backup(store: ModelStore, target: Path, *, force: bool = False) -> ExportResult:
    """Write the personalization, its examples and thumbnails to one .tar.gz, atomically.
    An existing file is replaced only with `force` (`export photo.jpg` must not eat it)."""
    # os.path's tests, not Path's: a name too long for the file system is False there
    # (Path.is_dir raised OSError), and writing the archive then says why in one line.
    if os.path.isdir(target):
        raise LuncherError(f"{target} is a directory; give a file name such as backup.tar.gz")
    problem = backup_name_problem(str(target))  # a .zip or .tar that holds a .tar.gz
    if problem:
        raise LuncherError(problem)
    if os.path.lexists(target) and not force:  # a link to a file gone (unmounted) too
        raise LuncherError(f"{target} already exists; use ", Param("force", True), " to replace it")
    if os.path.exists(target) and not os.path.isfile(target):  # /dev/stdout, a pipe: kept
        raise LuncherError(
            f"{target} is not a regular file; give a file name such as backup.tar.gz"
        )
    if store.current_state().personal is None:
        raise _nothing_to_export(store.current_state())
    # No writer may change the files while they are hashed and packed, and nothing is
    # written to the models directory, which may be read-only to this user: a shared lock,
    # and a scratch directory beside the archive (hidden, private, like its temporary file).
    with store.read_lock(), _scratch_beside(target) as scratch:
        return store.read_consistently(lambda state: _export(store, state, target, scratch))


# The hidden working directory an export makes beside its archive (the archive is written
# in it too, then moved into place).
SCRATCH_PREFIX = ".luncher-export-"


@contextlib.contextmanager
def _scratch_beside(target: Path) -> Iterator[Path]:
    """A private working directory beside the archive, after removing those that killed
    exports left there (each holds a copy of the user's examples)."""
    for leftover in target.parent.glob(f"{SCRATCH_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink() and abandoned(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    path = target.parent / f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        with owned_folder(path, mode=0o700):
            yield path
    except OSError as exc:
        raise LuncherError(f"cannot write {target}: {exc.strerror or exc}") from None


def _export(store: ModelStore, state: State, target: Path, scratch: Path) -> ExportResult:
    base = load_base(store, state)
    personal = load_personal(store, state)
    if personal is None:
        raise _nothing_to_export(state)
    if set(load_weights(personal)) != set(base.meta.trainable_params):  # else unimportable
        raise LuncherError(f"{personal.path / Files.WEIGHTS} is damaged; ", *GO_BACK)
    examples = load_examples(personal, ())
    # The archive's examples.npz holds the views itself (the models directory's
    # shared segments stay behind).
    try:
        save_examples(examples, scratch / Files.EXAMPLES, shared=False)
    except OSError as exc:  # the disk of the archive (full), not the models directory
        raise LuncherError(f"cannot write {target}: {exc.strerror or exc}") from None
    files = [
        (Files.META, personal.path / Files.META),
        (Files.WEIGHTS, personal.path / Files.WEIGHTS),
        (Files.EXAMPLES, scratch / Files.EXAMPLES),
    ]
    digests = list(dict.fromkeys(examples.digests))
    thumbnails = _importable_thumbnails(store, digests)
    files += thumbnails
    manifest = {
        "kind": BACKUP_KIND,
        "format": BACKUP_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "luncher_version": __version__,
        "base": _describe_base(base),
        "labels": list(personal.meta.labels),
        "hyperparameters": personal.meta.hyperparameters.to_json(),
        "examples_per_label": examples.per_label(),
        # Each photo's file name and when it was taught (`luncher examples`).
        "taught": {d: list(v) for d, v in load_taught(personal).items()},
        "files": {name: file_entry(path) for name, path in files},
    }
    size = write_archive(target, manifest, files, scratch)
    return ExportResult(
        path=target,
        size=size,
        labels=personal.meta.labels,
        examples_per_label=examples.per_label(),
        thumbnails=len(thumbnails),
        without_thumbnail=len(digests) - len(thumbnails),
    )


def _importable_thumbnails(store: ModelStore, digests: list[str]) -> list[tuple[str, Path]]:
    """(name in the archive, file) of the photos' thumbnails that an import takes. Import
    refuses a whole backup for one thumbnail that does not decode, so one damaged on disk
    (cut short, say) is left out: its photo restores on this base, like one without."""
    from concurrent.futures import ThreadPoolExecutor

    from healthyluncher.thumbnails import thumbnail_problem

    def importable(digest: str) -> bool:
        path = store.thumbnail(digest)
        return path.is_file() and thumbnail_problem(path, path.name) is None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decodes
        fine = list(pool.map(importable, digests))
    return [
        (f"{Files.THUMBNAILS}/{digest}.jpg", store.thumbnail(digest))
        for digest, ok in zip(digests, fine, strict=True)
        if ok
    ]


def _nothing_to_export(state: State) -> LuncherError:
    if state.history and state.history[0].personal:  # after a reset, say
        return LuncherError(
            "there is nothing to export: the model is not personalized, but the last undo "
            "step holds a personalization: ",
            UNDO,
            " brings it back, then export it",
        )
    return LuncherError(
        "there is nothing to export: the model is not personalized (teach it with ",
        RETRAIN,
        " first)",
    )


def _describe_base(base: Base) -> dict[str, Any]:
    """What makes the head inputs and weights fit: the model file and how it was cut."""
    return {
        "name": base.meta.name,
        "sha256": base.meta.sha256,
        "labels": list(base.meta.labels),
        "split_tensor": base.meta.split_tensor,
        "trainable_params": list(base.meta.trainable_params),
        "preprocessing": base.meta.preprocessing.to_json(),
    }


# -- writing the archive ---------------------------------------------------------------


def file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def write_archive(
    target: Path, manifest: dict[str, Any], files: list[tuple[str, Path]], scratch: Path
) -> int:
    """Temporary file in `scratch` (beside the target), flush, fsync, then os.replace."""
    mtime = int(time.time())

    def info(name: str, size: int) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mode, entry.mtime = size, 0o644, mtime
        return entry

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=scratch)
    except OSError as exc:
        raise LuncherError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            # No file name or time in the gzip header: the temporary name means nothing.
            # Level 1: the thumbnails are JPEGs and the examples float32, neither of which
            # compresses much; on 28 MB of both, level 9 took 4.65 s for 22.3 MB and level
            # 1 0.73 s for 22.8 MB.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL
            ) as packed:
                with tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    header = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
                    tar.addfile(info(MANIFEST, len(header)), io.BytesIO(header))
                    for name, path in files:
                        with path.open("rb") as source:
                            size = manifest["files"][name]["size"]
                            tar.addfile(info(name, size), source)
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise LuncherError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    fsync_dir(target.parent)
    return size
