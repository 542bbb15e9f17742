"""Head inputs for photos: the frozen part runs once per photo and view, then the cache answers."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from healthyluncher.errors import MAKE_UPDATABLE_KEEPING, REPAIR, LuncherError, StorageError
from healthyluncher.events import Progress, ProgressCallback
from healthyluncher.fileio import atomic_write_bytes, regular
from healthyluncher.meta import carried_labels, known_label
from healthyluncher.photos import ImageFailure, PhotoSource, digest_of, read_bytes
from healthyluncher.records import Base, Examples, make_updatable_command
from healthyluncher.runtime import inference_session, input_mismatch, run_in_batches
from healthyluncher.segments import usable
from healthyluncher.settings import Hyperparameters
from healthyluncher.store import Files, ModelStore
from healthyluncher.thumbnails import JPEG_MAX_SIDE, make_room

if TYPE_CHECKING:
    from concurrent.futures import Future

# Images (photos x views) per call of the frozen part: enough to keep both cores busy, few
# enough that the first call starts while later photos still decode and that memory stays
# flat (128 at once peaked above 1 GB on the shipped base).
FROZEN_BATCH = 8
# Bump when augmented_views changes, so cached views are not mixed with new ones.
AUGMENT_VERSION = 2
# A model whose frozen part computes NaN or infinity for a photo (a Sqrt or Log of what
# turns negative): the photo is skipped, as an unreadable one is.
NOT_NUMBERS = "the model computes values that are not numbers (NaN or infinite) for this photo"


@dataclass(frozen=True)
class _Prepared:
    path: PhotoSource
    digest: str
    array: np.ndarray  # head inputs when cached, else the views' pixels
    cached: bool


class Embedder:
    """Head inputs for photos: the frozen part runs once per photo, then the cache answers."""

    def __init__(
        self, store: ModelStore, base: Base, views: int, known: Examples | None = None
    ) -> None:
        self.base = base
        self.views = max(1, views)
        self.store = store
        self.cache = store.cache_dir(base.meta.embedding_key)
        self._session: Any = None
        # The current copy's examples answer for their own photos: the cache keeps no
        # second copy of their views (ModelStore.collect_garbage).
        self.known = known
        self._index = {digest: i for i, digest in enumerate(known.digests)} if known else {}
        self._own_digests = False  # see `embed`

    def _cache_file(self, digest: str) -> Path:
        return self.cache / f"{digest}.v{AUGMENT_VERSION}x{self.views}.npy"

    def embed(
        self,
        paths: Sequence[PhotoSource],
        progress: ProgressCallback | None = None,
        *,
        digests: Sequence[str] | None = None,
        own_digests: bool = False,
    ) -> tuple[list[tuple[PhotoSource, str, np.ndarray]], list[ImageFailure], int]:
        """[(path, digest, views)] in input order, failures, and how many photos ran
        through the frozen part (cache misses).

        Photos stream through a small window: decoding on two threads overlaps the frozen
        part's inference, and no more than a few batches are ever held in memory.
        `digests` names the photos (for thumbnails, whose bytes are not the original's);
        with `own_digests`, they are the photos' own (a retrain hashed them first), so a
        cached photo is not read again and a decoded one keeps a thumbnail.
        """
        self._own_digests = own_digests
        results: list[tuple[PhotoSource, str, np.ndarray]] = []
        failures: list[ImageFailure] = []
        pending: list[tuple[PhotoSource, str, np.ndarray]] = []  # decoded, awaiting the frozen part
        fresh = 0
        total = len(paths)

        def flush() -> None:
            nonlocal fresh
            if not pending:
                return
            outputs = self._run_frozen(np.concatenate([pixels for _, _, pixels in pending]))
            for offset, (path, digest, _) in enumerate(pending):
                views = outputs[offset * self.views : (offset + 1) * self.views]
                if not np.isfinite(views).all():  # trained on, every weight would be NaN
                    failures.append(ImageFailure(path, f"{path}: {NOT_NUMBERS}"))
                    continue
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
                progress(Progress("embedding", next_index, total))
        if next_index == total:
            return results, failures, fresh

        # Imported here: a retrain whose photos are all cached starts no thread pool and
        # pays nothing for concurrent.futures (and the logging it imports).
        from concurrent.futures import ThreadPoolExecutor

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
                    progress(
                        Progress("embedding", len(results) + len(pending) + len(failures), total)
                    )
            flush()
        return results, failures, fresh

    def _prepare(
        self, path: PhotoSource, digest: str | None, *, decode: bool = True
    ) -> _Prepared | ImageFailure | None:
        """Cached head inputs, or decoded augmented views ready for the frozen part (None
        for a photo not in the cache when `decode` is false)."""
        try:
            own_photo = digest is None or self._own_digests
            # A photo the caller hashed is read again only to be decoded.
            data = b"" if digest and self._own_digests else read_bytes(path)
            digest = digest or digest_of(data)
            cached = self._read_known(digest)
            if cached is None:
                cached = self._read_cache(digest)
            if cached is not None and (not own_photo or self.store.thumbnail(digest).is_file()):
                return _Prepared(path, digest, cached, cached=True)
            if not decode:
                return None
            data = data or read_bytes(path)
            from healthyluncher import imaging  # Pillow: only for a photo not in the cache

            prep = self.base.meta.preprocessing
            image = imaging.decode(data, prep, name=str(path))
            if own_photo:
                self._write_thumbnail(digest, image)
            views = imaging.augmented_views(image, prep, self.views, int(digest[:8], 16))
            return _Prepared(path, digest, views, cached=False)
        except StorageError:
            raise
        except LuncherError as exc:
            message = str(exc)
            return ImageFailure(path, message if str(path) in message else f"{path}: {message}")

    def _ensure_session(self) -> None:
        if self._session is None and self.base.meta.has_frozen_part:
            meta = self.base.meta
            try:
                self._session = inference_session(self.base.path / Files.FROZEN)
                problem = input_mismatch(self._session, meta.input_name, meta.preprocessing)
                if problem is not None:
                    raise LuncherError(problem)
            except LuncherError as exc:  # as predict says of a damaged base model
                raise LuncherError(
                    f"the base model in {self.base.path} is damaged: {exc}; make it again with ",
                    make_updatable_command(self.base.path.parent, MAKE_UPDATABLE_KEEPING),
                ) from None

    def _run_frozen(self, batch: np.ndarray) -> np.ndarray:
        meta = self.base.meta
        if not meta.has_frozen_part:
            return batch
        self._ensure_session()

        def run(chunk: np.ndarray) -> np.ndarray:
            return np.asarray(self._session.run(None, {meta.input_name: chunk})[0])

        outputs = run_in_batches(run, batch, step=FROZEN_BATCH, fixed=meta.input_batch)
        return outputs.astype(np.float32, copy=False)

    def _write_thumbnail(self, digest: str, image: Any) -> None:
        """Keep the photo at the size the model reads, so a new base can embed it again."""
        from healthyluncher.imaging import resize_short_side

        target = self.store.thumbnail(digest)
        if target.is_file():
            return
        make_room(target)
        short = self.base.meta.preprocessing.resize
        small = resize_short_side(image, short) if min(image.size) > short else image
        width, height = small.size
        if max(width, height) > JPEG_MAX_SIDE:  # a 65535x1 strip: keep its centre
            keep_w, keep_h = min(width, JPEG_MAX_SIDE), min(height, JPEG_MAX_SIDE)
            left, top = (width - keep_w) // 2, (height - keep_h) // 2
            small = small.crop((left, top, left + keep_w, top + keep_h))
        buffer = io.BytesIO()
        try:
            small.convert("RGB").save(buffer, "JPEG", quality=90)
        except (OSError, ValueError) as exc:
            raise LuncherError(f"cannot keep a thumbnail of this photo: {exc}") from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, buffer.getvalue())
        except OSError as exc:  # the disk or the folder, not the photo
            if target.parent.exists() and not target.parent.is_dir():
                damage = f"{target.parent} is damaged (not a folder); run "
                raise StorageError(damage, REPAIR) from None
            raise StorageError(
                f"cannot write in {target.parent}: {exc.strerror or exc}; the models "
                "directory was not changed"
            ) from None

    def _read_known(self, digest: str) -> np.ndarray | None:
        """The photo's views among the known examples, if it has as many as asked."""
        if self.known is None or digest not in self._index:
            return None
        rows = np.flatnonzero(self.known.owner == self._index[digest])
        return self.known.inputs[rows] if len(rows) == self.views else None

    def _read_cache(self, digest: str) -> np.ndarray | None:
        path = self._cache_file(digest)
        try:
            value = np.load(regular(path), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # missing or damaged: embed again
        # Damaged otherwise (NaN, another type or width): embed again, never train on it.
        fine = value.dtype == np.float32 and value.ndim >= 2 and len(value) == self.views
        width = self._width()
        if not fine or (width is not None and value.shape[1:] != width):
            return None
        return value if usable(value) else None

    def _width(self) -> tuple[int, ...] | None:
        """The shape of one head input, where the examples or a linear head tell it."""
        if self.known is not None and len(self.known.inputs):
            return tuple(self.known.inputs.shape[1:])
        features = (self.base.meta.linear_head or {}).get("features")
        return (features,) if type(features) is int else None

    def _write_cache(self, digest: str, views: np.ndarray) -> None:
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, views.astype(np.float32, copy=False))
            atomic_write_bytes(self._cache_file(digest), buffer.getvalue(), durable=False)
        except OSError:
            pass  # the cache is only a speed-up; a full disk must not fail the retrain


def rebuild_examples(
    store: ModelStore,
    base: Base,
    digests: Sequence[str],
    labels: Sequence[str],
    hp: Hyperparameters,
    progress: ProgressCallback | None = None,
    *,
    new_base: bool = True,
    made_with: Sequence[str] = (),
) -> tuple[Examples, int]:
    """Embed the kept thumbnails of these photos with `base`; returns the examples and how
    many photos could not be carried over (thumbnail missing or unreadable). `new_base`:
    the labels were made on another base (an upgrade, an imported backup); not so for the
    base they were made on (repair), whose labels stay as they are. `made_with`: the labels
    of the model they were taught (see meta.carried_labels)."""
    if new_base:
        # A label of yours that the base writes otherwise (another Unicode form, case or
        # spacing: "Fast Food" for "fast_food") is the base's, not a twin class beside it.
        labels = carried_labels(labels, base.meta.labels, made_with)
    else:  # 'Fast Food' made beside this base's 'fast_food' is a label of its own
        labels = [known_label(label, base.meta.labels) for label in labels]
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
