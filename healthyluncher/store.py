"""The models directory: where it is, what its files are called, and how it changes atomically.

Layout (every directory below is immutable once published, but for the weights file of an
undo step, which becomes a link to the same bytes of its base's: see weightsfile.py)::

    MODELS_DIR/
      state.json          which base and personal directories are current
      .lock               held by any process that writes (and shared by export)
      base-<id>/          the pristine base: model.onnx, frozen.onnx, head.onnx,
                          artifacts/, meta.json, replay.npz (optional)
      personal-<id>/      the personalized copy: model.onnx, weights.npz, checkpoint,
                          examples.npz, meta.json
      examples/           the examples' head inputs, shared by the copies (segments.py)
      cache/<base>/       head inputs of the user's photos, by content hash

Every change goes through one `Transaction`: under the lock, new directories are staged in
hidden directories and renamed into place, then `state.json` is replaced once, and only
then is anything deleted. A crash at any point leaves the previous state.json, which names
only complete directories; directories no longer named are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from healthyluncher import fileio, segments, weightsfile
from healthyluncher.errors import REPAIR, CommittedInterrupt, DamagedError, LuncherError, Param
from healthyluncher.signalhold import signals_held
from healthyluncher.state import State, numbered, recover

ENV_VAR = "LUNCHER_MODELS_DIR"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
# Seconds a writer waits for another luncher process to finish.
LOCK_TIMEOUT = 120.0

T = TypeVar("T")


class Files:
    """Names of the files inside base and personal directories."""

    MODEL = "model.onnx"
    MODEL_DATA = "model.data"  # the large frozen weights of model.onnx and frozen.onnx
    FROZEN = "frozen.onnx"
    HEAD = "head.onnx"
    HEAD_WEIGHTS = "head_weights.npz"  # the head's trained weights, for the numpy trainer
    TEMPLATE = "personal.template"  # see template.py
    ARTIFACTS = "artifacts"
    META = "meta.json"
    REPLAY = "replay.npz"
    WEIGHTS = "weights.npz"
    CHECKPOINT = "checkpoint"
    EXAMPLES = "examples.npz"
    TAUGHT = "taught.json"  # each example photo's file name and when it was taught
    SCORES = "scores.npz"  # what the personalized model says about each example photo
    FLOORS = "floors.npz"  # the memory rows' nearest conflicting replayed examples
    THUMBNAILS = "thumbnails"


def resolve_models_dir(option: Path | None = None) -> Path:
    """--models-dir, then $LUNCHER_MODELS_DIR, then the per-user data directory. A name of
    spaces alone (a slip) is refused rather than set up in the current directory."""
    env = os.environ.get(ENV_VAR)
    if (option is not None or env) and not str(option if option is not None else env).strip():
        if option is not None:
            raise LuncherError(Param("models_dir"), f" {str(option)!r} is only spaces: name one")
        raise LuncherError(f"{ENV_VAR}={env!r} is only spaces: name a folder, or unset it")
    try:
        if option is not None:
            return option.expanduser().resolve()
        if env:
            return Path(env).expanduser().resolve()
        from platformdirs import user_data_path

        return user_data_path("healthyluncher", appauthor=False) / "models"
    except RuntimeError:  # no HOME and no account entry (a container's user), for `~`
        why = "cannot find your home directory for the models directory (HOME is not set)"
        raise LuncherError(
            f"{why}: set HOME or {ENV_VAR}, or give ", Param("models_dir", example="DIR")
        ) from None


class ModelStore:
    """One models directory. Readers need no lock; writers hold `lock()`."""

    def __init__(self, root: Path, *, on_wait: Callable[[str], None] | None = None) -> None:
        self.root = root
        # Told once, in words, when a writer has to wait for another process's lock.
        self.on_wait = on_wait

    def _refuse_foreign_folder(self) -> None:
        """A folder that holds other files is not taken over as a models directory (reset
        would delete what it thinks is its cache)."""
        if (self.root / STATE_FILE).exists() or not self.root.is_dir():
            return
        ours = ("base-", "personal-", ".staging-", ".scratch-")
        foreign = [
            entry.name
            for entry in self.root.iterdir()
            if not entry.name.startswith(ours)
            and entry.name not in (LOCK_FILE, Files.THUMBNAILS, "cache", segments.FOLDER)
        ]
        if foreign:
            raise LuncherError(
                f"{self.root} is not a models directory: it holds other files ({foreign[0]}, "
                "...); choose an empty or new folder with ",
                Param("models_dir"),
            )

    def ensure_exists(self) -> None:
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.root.mkdir(mode=0o700, exist_ok=True)  # private: it holds your photos
        except OSError as exc:
            raise LuncherError(
                f"cannot create the models directory {self.root}: {exc.strerror}"
            ) from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time: an advisory lock on the models directory's lock file."""
        self.ensure_exists()
        with fileio.exclusive_lock(self.root / LOCK_FILE, **self._lock_words()):
            yield

    @contextlib.contextmanager
    def read_lock(self) -> Iterator[None]:
        """No writer while a reader reads many files (export), and no write by the reader:
        a shared lock on the lock file opened for reading, so a read-only models directory
        (a copy mounted read-only, another user's folder) can be read too."""
        with fileio.shared_lock(self.root / LOCK_FILE, **self._lock_words()):
            yield

    def _lock_words(self) -> dict[str, Any]:
        """How long to wait for another process's lock, and what to say meanwhile."""
        changing = f"another luncher process is changing {self.root}"

        def waiting() -> None:
            if self.on_wait is not None:
                self.on_wait(
                    f"{changing}; this one goes on when it is done (at most {LOCK_TIMEOUT:.0f} s)"
                )

        busy = f"{changing}; try again when it is done"
        return {"timeout": LOCK_TIMEOUT, "busy": busy, "on_wait": waiting}

    # -- state -------------------------------------------------------------------------

    def read_state(self) -> State:
        """state.json; DamagedError when it cannot be parsed (`recover_state` then)."""
        path = self.root / STATE_FILE
        repair = ("run ", REPAIR, " to rebuild it from the models directory")
        try:
            data = fileio.read_json(path)
        except FileNotFoundError:  # a new directory; or one whose state.json was deleted,
            if any(self.root.glob("base-*")):  # whose bases and copies are recovered
                raise DamagedError(f"{path} is missing; ", *repair) from None
            return State()
        except DamagedError as exc:
            raise DamagedError(f"{exc}; ", *repair) from None
        return State.from_json(data, path, repair)

    def current_state(self) -> State:
        """state.json, or the state `luncher repair` would write when it is damaged: a
        reader never fails on a damaged state.json."""
        try:
            return self.read_state()
        except DamagedError:
            return self.recover_state()

    def read_consistently(self, load: Callable[[State], T], attempts: int = 8) -> T:
        """`load(state)` for the current state. A writer may switch the state and remove
        the directories it named while `load` reads them: then `load` fails, state.json
        has changed, and `load` runs again on the new state (a real failure, with the
        state unchanged, is raised)."""
        state = self.current_state()
        for _ in range(attempts - 1):
            try:
                return load(state)
            except (LuncherError, OSError):
                newer = self.current_state()
                if newer == state:
                    raise
                state = newer
        return load(state)

    def recover_state(self) -> State:
        """The newest complete state the directories hold (see `state.recover`)."""
        return recover(self.root, Files.META, Files.MODEL)

    def write_state(self, state: State) -> None:
        try:
            if state.personal:  # the current copy's weights file, never a link
                weightsfile.own(self.root / state.personal)
            path = self.root / STATE_FILE
            if path.is_dir() and not path.is_symlink():  # damage: no rename replaces it
                shutil.rmtree(path)
            fileio.write_json(path, state.to_json())
        except OSError as exc:
            raise self._cannot_write(exc) from None

    def base_dir(self, state: State | None = None) -> Path | None:
        state = state or self.read_state()
        return self.root / state.base if state.base else None

    def personal_dir(self, state: State | None = None) -> Path | None:
        state = state or self.read_state()
        return self.root / state.personal if state.personal else None

    # -- publishing --------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic change, under the lock. The block stages and publishes directories
        and names the new state with `commit`; on leaving it, state.json is written once,
        then the deletions the block asked for run, then unnamed directories are removed.
        If the block fails, what it published is removed and state.json is untouched.
        A damaged state.json is first replaced by the newest complete state
        (`recover_state`), so no command ever needs a reset because of it."""
        self._refuse_foreign_folder()
        with self.lock():
            repaired = False
            try:
                state = self.read_state()
            except DamagedError:
                state = self.recover_state()
                repaired = True
            txn = Transaction(self, state, repaired=repaired)
            if repaired:
                txn.commit(state)  # written even if the block changes nothing else
            try:
                yield txn
            except BaseException:
                for name in txn.published:
                    shutil.rmtree(self.root / name, ignore_errors=True)
                raise
            if txn.next_state is None:
                return
            try:
                with signals_held():  # a saved change deletes what it promised first
                    self.write_state(txn.next_state)
                    for action in txn.deferred:
                        with contextlib.suppress(OSError):
                            action()
                    self.collect_garbage(txn.next_state)
            except KeyboardInterrupt:
                # Whether the change happened decides what the user is told.
                with contextlib.suppress(LuncherError, OSError):
                    if self.read_state() == txn.next_state:
                        raise CommittedInterrupt() from None
                raise

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A hidden working directory inside the models directory, removed on leaving; one
        that a killed process leaves is removed by the next writer (`collect_garbage`)."""
        self.ensure_exists()
        path = self.root / f".scratch-{uuid.uuid4().hex[:12]}"
        try:
            with contextlib.ExitStack() as held:
                # Held while in use: a writer's cleanup then leaves the directory alone. It
                # is made and taken under the writers' lock, so that no cleanup runs between.
                with self.lock():
                    held.enter_context(fileio.owned_folder(path))
                yield path
        except OSError as exc:  # a full disk or a read-only directory, as in `staging`
            raise self._cannot_write(exc) from None

    @contextlib.contextmanager
    def staging(self, work: bool = False) -> Iterator[Path]:
        """A hidden directory to fill; removed if the block fails, and on leaving if `work`."""
        self.ensure_exists()
        path = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            yield path
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise self._cannot_write(exc) from None
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if work:
            shutil.rmtree(path, ignore_errors=True)

    def _cannot_write(self, exc: OSError) -> LuncherError:  # a full or read-only disk
        reason = f"{exc.strerror or exc}; the models directory was not changed"
        return LuncherError(f"cannot write to {self.root}: {reason}")

    def _publish_dir(self, staged: Path, kind: str) -> str:
        """Make a staged directory durable and give it its final name."""
        fileio.fsync_tree(numbered(staged, self.root, Files.META))  # see state.SEQUENCE
        name = f"{kind}-{uuid.uuid4().hex[:12]}"
        os.replace(staged, self.root / name)
        fileio.fsync_dir(self.root)
        return name

    def collect_garbage(self, state: State) -> None:
        """Remove what state.json no longer names (call with the lock held): directories,
        then the thumbnails and cached head inputs of photos that no kept state has among
        its examples (a cancelled retrain's, a forgotten photo's), cache folders left empty,
        and a killed writer's temporary files (all written under the lock: none in use)."""
        keep = state.names()
        for entry in self.root.iterdir():
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)  # a state.json a killed writer was writing
                continue
            if not entry.is_dir() or name in keep:
                continue
            if name.startswith(".scratch-") and not fileio.abandoned(entry):
                continue  # an import still reading its archive there
            if name.startswith(("base-", "personal-", ".staging-", ".scratch-")):
                shutil.rmtree(entry, ignore_errors=True)
        for step in (state.step(), *state.history):
            if step.personal:
                weightsfile.tidy(self.root / step.personal)
            if step.personal and step.base and step.personal != state.personal:
                weightsfile.share(self.root / step.personal, self.root / step.base)
        self._collect_user_files(state)

    def _collect_user_files(self, state: State) -> None:
        import zipfile

        import numpy as np

        used: set[str] = set()
        current: set[str] = set()  # the current copy's examples are their photos' cache
        used_segments: set[str] = set()
        for name in state.names():
            if not name.startswith("personal-"):
                continue
            try:
                examples = fileio.regular(self.root / name / Files.EXAMPLES)
                with np.load(examples, allow_pickle=False) as data:
                    digests = set(data["digests"].tolist())  # str, at C speed
                    if "segments" in data.files:
                        used_segments.update(str(s) for s in data["segments"].tolist())
            except (OSError, KeyError, ValueError, zipfile.BadZipFile):
                return  # cannot tell what is used: keep everything
            used, current = used | digests, current | (digests if name == state.personal else set())
        fileio.sweep(self.root / segments.FOLDER, {name.split(".")[0] for name in used_segments})
        fileio.sweep(self.root / Files.THUMBNAILS, used)
        cache = self.root / "cache"
        for folder in cache.iterdir() if cache.is_dir() else ():
            fileio.sweep(folder, used - current)
        fileio.remove_empty_folders(cache)  # made again by the next photo to cache

    # -- embedding cache ---------------------------------------------------------------

    def has_user_files(self) -> bool:  # thumbnails or cached head inputs of your photos
        return (self.root / Files.THUMBNAILS).exists() or (self.root / "cache").exists()

    def thumbnail(self, digest: str) -> Path:
        """A small JPEG of a photo you trained on, kept so it can be embedded again."""
        return self.root / Files.THUMBNAILS / f"{digest}.jpg"

    def remove_thumbnails(self, digests: set[str] | None = None) -> int:
        """Remove the given thumbnails, or all of them."""
        folder = self.root / Files.THUMBNAILS
        if not folder.exists():
            return 0
        if digests is None:
            count = sum(1 for _ in folder.iterdir())
            shutil.rmtree(folder, ignore_errors=True)
            return count
        count = 0
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.thumbnail(digest).unlink()
                count += 1
        return count

    def cache_dir(self, key: str) -> Path:
        """Cached head inputs for one base and cut (`BaseMeta.embedding_key`)."""
        return self.root / "cache" / key[:16]

    def clear_cache(self) -> int:
        cache = self.root / "cache"
        count = sum(1 for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
        shutil.rmtree(cache, ignore_errors=True)
        return count


class Transaction:
    """What one change of the models directory publishes and switches to (see
    `ModelStore.transaction`)."""

    def __init__(self, store: ModelStore, state: State, *, repaired: bool = False) -> None:
        self.store = store
        self.state = state  # as read under the lock
        self.repaired = repaired  # state.json was damaged; `state` was recovered
        self.published: list[str] = []
        self.next_state: State | None = None
        self.deferred: list[Callable[[], object]] = []

    def staging(self, work: bool = False) -> contextlib.AbstractContextManager[Path]:
        return self.store.staging(work)

    def publish(self, staged: Path, kind: str) -> str:
        """Give a filled staging directory its final name (not yet current)."""
        name = self.store._publish_dir(staged, kind)
        self.published.append(name)
        return name

    def commit(self, state: State) -> None:
        """The state to switch to when the transaction ends."""
        self.next_state = state

    def after_commit(self, action: Callable[[], object]) -> None:
        """Run once the new state is written: deletions that must not happen if the change
        does not (a forgotten photo's thumbnail goes only once no state names it)."""
        self.deferred.append(action)
