"""export and import: the personalization as one self-describing archive, restored safely.

An archive is a gzip-compressed tar of regular files, `manifest.json` first::

    manifest.json              format, the base it was made with, labels, hyperparameters,
                               and a sha256 and size for every other file
    meta.json                  the personal meta.json
    weights.npz                the trained head weights
    examples.npz               the cached head inputs of your photos, with labels and digests
    thumbnails/<sha256>.jpg    your photos at the model's input size, to embed them again

Import reads the archive as a stream into a scratch directory outside the models directory,
checking every name, type and size on the way and every checksum at the end. Only then is
the models directory touched, and it changes the way every writer changes it: a staged
personal directory, then one switch of state.json.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from healthyluncher import __version__
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
)
from healthyluncher.personalize import ProgressCallback
from healthyluncher.store import (
    HISTORY_LIMIT,
    Files,
    ModelStore,
    State,
    atomic_write_bytes,
    fsync_dir,
    write_json,
)

BACKUP_KIND = "healthyluncher-backup"
BACKUP_FORMAT = 1
MANIFEST = "manifest.json"
# Every name an archive may hold; anything else is refused before it is read.
ALLOWED_NAME = re.compile(
    r"manifest\.json|meta\.json|weights\.npz|examples\.npz|thumbnails/[0-9a-f]{64}\.jpg"
)
THUMBNAIL_NAME = re.compile(r"thumbnails/([0-9a-f]{64})\.jpg")
DIGEST = re.compile(r"[0-9a-f]{64}")

# Limits on what an archive may unpack to. A year of lunches is a few thousand photos; with
# a conv feature map as head input, examples.npz of 1000 photos x 8 views is ~500 MiB.
MAX_MEMBERS = 50_000
MAX_MEMBER_BYTES = 2 * 2**30
MAX_TOTAL_BYTES = 4 * 2**30
MAX_MANIFEST_BYTES = 16 * 2**20
# Room for tar headers, padding and the tar reader's read-ahead (10 KiB) between two files:
# a huge pax header (tarfile reads those whole into memory) stops here.
HEADER_ALLOWANCE = 2**20
OVERSIZED_HEADER = "it holds an oversized tar header"
CHUNK = 2**20
JPEG_MAGIC = b"\xff\xd8\xff"

T = TypeVar("T")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size: int  # bytes of the archive
    labels: tuple[str, ...]
    examples_per_label: dict[str, int]
    thumbnails: int
    without_thumbnail: int  # photos that restore on this base but cannot be re-embedded


@dataclass(frozen=True)
class ImportResult:
    rebuilt: bool  # embedded again with the current base and retrained (another base)
    labels: tuple[str, ...]
    new_labels: tuple[str, ...]  # labels the current base does not have
    examples_per_label: dict[str, int]
    trained_at: str | None
    undo_steps: int
    not_carried: int = 0  # photos without a usable thumbnail (rebuild only)


@dataclass(frozen=True)
class Backup:
    """A verified archive, unpacked into a scratch directory laid out like a personal one."""

    archive: Path
    directory: Path
    base: dict[str, Any]  # the manifest's description of the base it was made with
    meta: PersonalMeta
    weights: dict[str, np.ndarray]
    examples: Examples
    thumbnails: dict[str, Path]  # digest -> JPEG in `directory`, for the examples' photos


# -- export ------------------------------------------------------------------------------


def export_backup(store: ModelStore, target: Path) -> ExportResult:
    """Write the personalization, its examples and thumbnails to one .tar.gz, atomically."""
    if target.is_dir():
        raise LuncherError(f"{target} is a directory; give a file name such as backup.tar.gz")
    if store.read_state().personal is None:
        raise _nothing_to_export()
    with store.lock():  # no writer may change the files while they are hashed and packed
        state = store.read_state()
        base = load_base(store, state)
        personal = load_personal(store, state)
        if personal is None:
            raise _nothing_to_export()
        examples = load_examples(personal, ())
        files = [
            (Files.META, personal.path / Files.META),
            (Files.WEIGHTS, personal.path / Files.WEIGHTS),
            (Files.EXAMPLES, personal.path / Files.EXAMPLES),
        ]
        digests = list(dict.fromkeys(examples.digests))
        thumbnails = [
            (f"{Files.THUMBNAILS}/{digest}.jpg", store.thumbnail(digest))
            for digest in digests
            if store.thumbnail(digest).is_file()
        ]
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
            "files": {name: _file_entry(path) for name, path in files},
        }
        size = _write_archive(target, manifest, files)
    return ExportResult(
        path=target,
        size=size,
        labels=personal.meta.labels,
        examples_per_label=examples.per_label(),
        thumbnails=len(thumbnails),
        without_thumbnail=len(digests) - len(thumbnails),
    )


def _nothing_to_export() -> LuncherError:
    return LuncherError(
        "there is nothing to export: the model is not personalized (teach it with "
        "'luncher retrain' first)"
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


def _file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _write_archive(target: Path, manifest: dict[str, Any], files: list[tuple[str, Path]]) -> int:
    """Temporary file beside the target, flush, fsync, then os.replace."""
    mtime = int(time.time())

    def info(name: str, size: int) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mode, entry.mtime = size, 0o644, mtime
        return entry

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise LuncherError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            # No file name or time in the gzip header: the temporary name means nothing.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
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


# -- reading and verifying ---------------------------------------------------------------


class _Refused(LuncherError):
    pass


def _refuse(archive: Path, reason: str) -> _Refused:
    return _Refused(f"{archive}: {reason}; nothing was imported")


class _BoundedReader:
    """The archive's decompressed bytes, refused once past `limit`: a decompression bomb
    stops here, having cost no more memory or disk than the limit."""

    def __init__(self, source: gzip.GzipFile, archive: Path) -> None:
        self._source = source
        self._archive = archive
        self.position = 0
        # tarfile.open reads the first header before any member is seen.
        self.limit = HEADER_ALLOWANCE
        self.reason = OVERSIZED_HEADER

    def allow(self, end: int, reason: str) -> None:
        self.limit = min(end, MAX_TOTAL_BYTES)
        self.reason = reason if end <= MAX_TOTAL_BYTES else ""

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.position + 1  # one byte past the limit proves the excess
        data = self._source.read(room if size < 0 else min(size, room))
        self.position += len(data)
        if self.position > self.limit:
            raise _refuse(
                self._archive,
                self.reason
                or f"it unpacks to more than {_mib(MAX_TOTAL_BYTES)} (a decompression bomb?)",
            )
        return data


@dataclass(frozen=True)
class _Unpacked:
    sha256: str
    size: int


def read_backup(archive: Path, scratch: Path) -> Backup:
    """Unpack and verify everything: names, types, sizes, checksums, and contents."""
    manifest, unpacked = _unpack(archive, scratch)
    _check_against_manifest(archive, manifest, unpacked)
    base = manifest.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str):
        raise _refuse(archive, "manifest.json does not say which base the backup was made with")
    meta = _load_meta(archive, scratch / Files.META)
    if meta.base_sha256 != base["sha256"]:
        raise _refuse(archive, "meta.json and manifest.json name different base models")
    personal = Personal(scratch, meta)
    weights = _load_npz(archive, scratch / Files.WEIGHTS, lambda: load_weights(personal))
    examples = _load_npz(archive, scratch / Files.EXAMPLES, lambda: load_examples(personal, ()))
    _check_weights(archive, weights)
    _check_examples(archive, examples, meta)
    thumbnails = {}
    for digest in dict.fromkeys(examples.digests):
        path = scratch / Files.THUMBNAILS / f"{digest}.jpg"
        if path.is_file():
            with path.open("rb") as handle:
                if handle.read(len(JPEG_MAGIC)) != JPEG_MAGIC:
                    raise _refuse(archive, f"thumbnails/{digest}.jpg is not a JPEG")
            thumbnails[digest] = path
    return Backup(archive, scratch, base, meta, weights, examples, thumbnails)


def _unpack(archive: Path, scratch: Path) -> tuple[dict[str, Any], dict[str, _Unpacked]]:
    """Stream the archive's files into `scratch`, refusing anything but allowed regular files."""
    try:
        handle = archive.open("rb")
    except FileNotFoundError:
        raise LuncherError(f"{archive}: no such file") from None
    except IsADirectoryError:
        raise LuncherError(f"{archive}: is a directory, not a backup") from None
    except OSError as exc:
        raise LuncherError(f"{archive}: cannot read: {exc.strerror or exc}") from None
    with handle:
        if handle.read(2) != b"\x1f\x8b":
            raise _refuse(archive, "not a luncher backup (not a gzip-compressed tar archive)")
        handle.seek(0)
        try:
            with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                reader = _BoundedReader(stream, archive)
                # "r|": a stream, read once front to back; nothing is extracted by tarfile.
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    return _unpack_members(archive, tar, reader, scratch)
        except _Refused:
            raise
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise _corrupt(archive, exc) from None


def _unpack_members(
    archive: Path, tar: tarfile.TarFile, reader: _BoundedReader, scratch: Path
) -> tuple[dict[str, Any], dict[str, _Unpacked]]:
    manifest: dict[str, Any] | None = None
    unpacked: dict[str, _Unpacked] = {}
    count = 0
    while True:
        reader.allow(tar.offset + HEADER_ALLOWANCE, OVERSIZED_HEADER)
        member = tar.next()
        if member is None:
            break
        count += 1
        if count > MAX_MEMBERS:
            raise _refuse(archive, f"it holds more than {MAX_MEMBERS} files")
        name = member.name
        _check_member(archive, member)
        if name in unpacked or (name == MANIFEST and manifest is not None):
            raise _refuse(archive, f"{name!r} appears twice")
        if (name == MANIFEST) != (manifest is None):
            raise _refuse(archive, "not a luncher backup (manifest.json is not its first file)")
        limit = MAX_MANIFEST_BYTES if name == MANIFEST else MAX_MEMBER_BYTES
        if member.size > limit:
            raise _refuse(
                archive,
                f"{name!r} unpacks to {_mib(member.size)}, more than the {_mib(limit)} "
                "allowed (a decompression bomb?)",
            )
        if member.offset_data + member.size > MAX_TOTAL_BYTES:
            raise _refuse(
                archive,
                f"it unpacks to more than {_mib(MAX_TOTAL_BYTES)} (a decompression bomb?)",
            )
        reader.allow(member.offset_data + member.size + HEADER_ALLOWANCE, "")
        source = tar.extractfile(member)
        assert source is not None  # a regular file
        if name == MANIFEST:
            manifest = _parse_manifest(archive, _read_limited(archive, name, source, limit))
            continue
        unpacked[name] = _copy_limited(archive, name, source, scratch / name, limit)
    if manifest is None:
        raise _refuse(archive, "not a luncher backup (it holds no manifest.json)")
    return manifest, unpacked


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise _refuse(archive, f"refusing {name!r}: an absolute path")
    if ".." in parts:
        raise _refuse(archive, f"refusing {name!r}: a path that climbs out with '..'")
    if member.issym():
        raise _refuse(
            archive, f"refusing {name!r}: a symbolic link (to {member.linkname!r}), not a file"
        )
    if member.islnk():
        raise _refuse(
            archive, f"refusing {name!r}: a hard link (to {member.linkname!r}), not a file"
        )
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = "not a regular file"
        if member.isdir():
            kind = "a directory"
        elif member.isdev():
            kind = "a device"
        elif member.issparse():
            kind = "a sparse file"
        raise _refuse(archive, f"refusing {name!r}: {kind}")
    if not ALLOWED_NAME.fullmatch(name):
        raise _refuse(archive, f"refusing {name!r}: not a file a luncher backup holds")


def _read_limited(archive: Path, name: str, source: IO[bytes], limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := _read_chunk(archive, source):
        size += len(chunk)
        if size > limit:
            raise _refuse(archive, f"{name!r} unpacks to more than {_mib(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


def _copy_limited(
    archive: Path, name: str, source: IO[bytes], target: Path, limit: int
) -> _Unpacked:
    digest = hashlib.sha256()
    size = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("xb") as sink:  # "x": never through an existing file or link
            while chunk := _read_chunk(archive, source):
                size += len(chunk)
                if size > limit:
                    raise _refuse(archive, f"{name!r} unpacks to more than {_mib(limit)}")
                digest.update(chunk)
                sink.write(chunk)
    except OSError as exc:  # reading errors arrive as _Refused: this is the scratch disk
        raise LuncherError(
            f"cannot unpack {archive} into {target.parent}: {exc.strerror or exc}; "
            "nothing was imported"
        ) from None
    return _Unpacked(digest.hexdigest(), size)


def _read_chunk(archive: Path, source: IO[bytes]) -> bytes:
    try:
        return source.read(CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise _corrupt(archive, exc) from None


def _corrupt(archive: Path, exc: BaseException) -> _Refused:
    detail = str(exc).strip() or type(exc).__name__
    return _refuse(archive, f"the archive is truncated or corrupt ({detail})")


def _parse_manifest(archive: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise _refuse(archive, f"manifest.json is damaged ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BACKUP_KIND:
        raise _refuse(archive, "not a luncher backup (manifest.json does not say so)")
    version = manifest.get("format")
    if version != BACKUP_FORMAT:
        raise _refuse(
            archive,
            f"unknown backup format {version!r}: this luncher reads format {BACKUP_FORMAT} "
            "(was it written by a newer luncher?)",
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _refuse(archive, "manifest.json lists no files")
    for name, entry in files.items():
        if name == MANIFEST or not ALLOWED_NAME.fullmatch(name):
            raise _refuse(archive, f"manifest.json lists {name!r}, not a file a backup holds")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not DIGEST.fullmatch(entry["sha256"])
            or type(entry.get("size")) is not int
        ):
            raise _refuse(archive, f"manifest.json has no valid sha256 and size for {name!r}")
    return manifest


def _check_against_manifest(
    archive: Path, manifest: dict[str, Any], unpacked: dict[str, _Unpacked]
) -> None:
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for name in (Files.META, Files.WEIGHTS, Files.EXAMPLES):
        if name not in listed:
            raise _refuse(archive, f"manifest.json does not list {name}")
    unlisted = sorted(unpacked.keys() - listed.keys())
    if unlisted:
        raise _refuse(archive, f"{unlisted[0]!r} is not listed in manifest.json")
    missing = sorted(listed.keys() - unpacked.keys())
    if missing:
        raise _refuse(archive, f"the archive is incomplete or damaged: {missing[0]} is missing")
    for name, entry in sorted(listed.items()):
        found = unpacked[name]
        if found.size != entry["size"]:
            raise _refuse(
                archive, f"{name} has {found.size} bytes, but manifest.json says {entry['size']}"
            )
        if found.sha256 != entry["sha256"]:
            raise _refuse(archive, f"{name} does not match its checksum in manifest.json")


def _load_meta(archive: Path, path: Path) -> PersonalMeta:
    try:
        meta = PersonalMeta.from_json(json.loads(path.read_text()))
        hp = meta.hyperparameters
        valid = (
            all(isinstance(label, str) and label for label in meta.labels)
            and len(set(meta.labels)) == len(meta.labels)
            and hp.optimizer in ("adamw", "sgd")
            and hp.epochs >= 1
            and hp.learning_rate > 0
            and hp.batch_size >= 1
            and hp.augment_views >= 1
            and hp.view_budget >= 0
            and hp.personal_weight > 0
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _refuse(archive, f"meta.json is damaged ({type(exc).__name__}: {exc})") from None
    if not valid:
        raise _refuse(archive, "meta.json is damaged (invalid labels or hyperparameters)")
    return meta


def _load_npz(archive: Path, path: Path, load: Callable[[], T]) -> T:
    """Check an .npz before numpy reads it: stored (not compressed) members only, each no
    larger than its header declares, so a small file cannot unpack to a huge array."""
    name = path.name
    try:
        with zipfile.ZipFile(path) as bundle:
            for info in bundle.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise _refuse(archive, f"{name} holds a compressed array")
                with bundle.open(info) as entry:
                    version = np.lib.format.read_magic(entry)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(entry)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(entry)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
                    raise _refuse(archive, f"{name} declares arrays larger than it holds")
        return load()
    except _Refused:
        raise
    except LuncherError:
        raise _refuse(archive, f"{name} is damaged") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise _refuse(archive, f"{name} is damaged ({type(exc).__name__}: {exc})") from None


def _check_weights(archive: Path, weights: dict[str, np.ndarray]) -> None:
    for name, value in weights.items():
        if value.dtype != np.float32 or not np.all(np.isfinite(value)):
            raise _refuse(archive, f"weights.npz is damaged ({name!r} is not finite float32)")


def _check_examples(archive: Path, examples: Examples, meta: PersonalMeta) -> None:
    count = len(examples.digests)
    problem = ""
    if count == 0:
        problem = "it holds no examples"
    elif len(examples.labels) != count or len(set(examples.digests)) != count:
        problem = "digests and labels do not pair up"
    elif not all(DIGEST.fullmatch(d) for d in examples.digests):
        problem = "a digest is not a sha256"
    elif not set(examples.labels) <= set(meta.labels):
        problem = "a label is missing from meta.json"
    elif (
        examples.inputs.ndim < 2
        or examples.owner.shape != (len(examples.inputs),)
        or examples.owner.min(initial=0) < 0
        or examples.owner.max(initial=0) >= count
        or np.bincount(examples.owner, minlength=count).min() == 0  # a photo without views
        or not np.all(np.isfinite(examples.inputs))
    ):
        problem = "inputs and owners do not fit together"
    if problem:
        raise _refuse(archive, f"examples.npz is damaged ({problem})")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# -- import ------------------------------------------------------------------------------


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
    with tempfile.TemporaryDirectory(prefix="luncher-import-") as scratch:
        backup = read_backup(archive, Path(scratch))
        ensure_base(store)
        with store.lock():
            state = store.read_state()
            base = load_base(store, state)
            difference = _base_difference(backup, base)
            if difference and not rebuild:
                raise LuncherError(
                    f"{archive} {difference}; use --rebuild to embed its photos again with "
                    "this base and retrain; nothing was imported"
                )
            if difference:
                return _rebuild(store, state, base, backup, progress)
            return _restore(store, state, base, backup)


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


def _restore(store: ModelStore, state: State, base: Base, backup: Backup) -> ImportResult:
    """The exact weights, written into the base model, as a new personal directory."""
    import onnx

    from healthyluncher import graph
    from healthyluncher.training import generate_artifacts, save_checkpoint_with

    labels = backup.meta.labels
    base_labels = base.meta.labels
    if labels[: len(base_labels)] != base_labels or set(backup.weights) != set(
        base.meta.trainable_params
    ):
        raise _refuse(backup.archive, "its labels or weights do not fit this base")
    # Built in memory first: weights that do not fit are refused before anything is written.
    head = onnx.load(str(base.path / Files.HEAD))
    head_dims = head.graph.input[0].type.tensor_type.shape.dim[1:]
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in head_dims)
    found = backup.examples.inputs.shape[1:]
    fits = len(found) == len(expected) and all(
        e in (None, f) for e, f in zip(expected, found, strict=True)
    )
    if not fits:
        raise _refuse(backup.archive, f"its examples have shape {found}, not the head's {expected}")
    from healthyluncher.personalize import render_personal, write_model

    extra = len(labels) - len(base_labels)
    grown = extra > 0
    if grown:
        graph.grow_classes(head, graph.class_axes(head, len(base_labels)), extra)
    try:
        rendered = render_personal(
            base, labels, backup.weights, backup.examples, backup.meta.hyperparameters
        )
    except LuncherError as exc:
        raise _refuse(backup.archive, f"its weights do not fit this base ({exc})") from None
    meta = replace(backup.meta, examples_per_label=backup.examples.per_label())

    published: Path | None = None
    installed: list[Path] = []
    folder_existed = (store.root / Files.THUMBNAILS).is_dir()
    try:
        with store.staging() as staged:
            artifact_dir = base.path / Files.ARTIFACTS
            if grown:
                onnx.save(head, str(staged / Files.HEAD))
                artifact_dir = staged / Files.ARTIFACTS
                generate_artifacts(
                    head, base.meta.trainable_params, meta.hyperparameters.optimizer, artifact_dir
                )
            write_model(rendered, base, staged)
            shutil.copyfile(backup.directory / Files.WEIGHTS, staged / Files.WEIGHTS)
            save_checkpoint_with(artifact_dir, backup.weights, staged / Files.CHECKPOINT)
            shutil.copyfile(backup.directory / Files.EXAMPLES, staged / Files.EXAMPLES)
            write_json(staged / Files.META, meta.to_json())
            name = store.publish_dir(staged, "personal")
        published = store.root / name
        installed = _install_thumbnails(store, backup.thumbnails)
        history = [state.personal or "", *state.history][:HISTORY_LIMIT]
        new_state = State(base=state.base, personal=name, history=history)
        store.write_state(new_state)  # the switch: before it nothing is current
    except BaseException:
        _remove_thumbnails(store, installed, folder_existed)
        if published is not None:
            shutil.rmtree(published, ignore_errors=True)
        raise
    store.collect_garbage(new_state)
    return ImportResult(
        rebuilt=False,
        labels=labels,
        new_labels=labels[len(base_labels) :],
        examples_per_label=backup.examples.per_label(),
        trained_at=meta.trained_at,
        undo_steps=len(new_state.history),
    )


def _rebuild(
    store: ModelStore,
    state: State,
    base: Base,
    backup: Backup,
    progress: ProgressCallback | None,
) -> ImportResult:
    """Install the thumbnails, embed them with this base, and retrain with the backup's
    hyperparameters, as `make-updatable --keep-personalization` does."""
    from healthyluncher.personalize import fit_and_publish, rebuild_examples

    if not backup.thumbnails:
        raise _refuse(
            backup.archive,
            "it holds no thumbnails of your photos, so they cannot be embedded with this base",
        )
    hp = backup.meta.hyperparameters
    folder_existed = (store.root / Files.THUMBNAILS).is_dir()
    installed = _install_thumbnails(store, backup.thumbnails)
    try:
        old = backup.examples
        examples, missing = rebuild_examples(store, base, old.digests, old.labels, hp, progress)
        if len(examples) == 0:
            raise _refuse(backup.archive, "none of its thumbnails could be embedded with this base")
        present = set(examples.labels)
        labels = base.meta.labels + tuple(
            label
            for label in dict.fromkeys((*backup.meta.labels, *examples.labels))
            if label in present and label not in base.meta.labels
        )
        fit_and_publish(store, state, base, labels, examples, hp, progress=progress)
    except BaseException:
        _remove_thumbnails(store, installed, folder_existed)
        raise
    new_state = store.read_state()
    personal = load_personal(store, new_state)
    return ImportResult(
        rebuilt=True,
        labels=labels,
        new_labels=labels[len(base.meta.labels) :],
        examples_per_label=examples.per_label(),
        trained_at=personal.meta.trained_at if personal else None,
        undo_steps=len(new_state.history),
        not_carried=missing,
    )


def _install_thumbnails(store: ModelStore, thumbnails: dict[str, Path]) -> list[Path]:
    """Copy the thumbnails the store lacks; returns the ones written (to undo on failure)."""
    installed: list[Path] = []
    try:
        for digest, source in thumbnails.items():
            target = store.thumbnail(digest)
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, source.read_bytes())
            installed.append(target)
    except OSError as exc:
        _remove_thumbnails(store, installed, True)
        raise LuncherError(
            f"cannot write to {store.root}: {exc.strerror or exc}; "
            "the models directory was not changed"
        ) from None
    return installed


def _remove_thumbnails(store: ModelStore, installed: list[Path], folder_existed: bool) -> None:
    for path in installed:
        path.unlink(missing_ok=True)
    if not folder_existed:
        with contextlib.suppress(OSError):
            (store.root / Files.THUMBNAILS).rmdir()  # only if empty
