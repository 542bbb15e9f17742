"""Files written so that nothing half-written stands where a reader looks (fsync, replace),
and the advisory lock that keeps writers apart."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from healthyluncher import heldlocks
from healthyluncher.errors import DamagedError, LuncherError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Temporary file in the same directory, flush, fsync, then os.replace.

    `durable=False` skips the fsyncs, for files that are only a cache: after a power cut
    they may be missing or torn, and a torn one is simply computed again.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, data: Any, *, compact: bool = False, durable: bool = True) -> None:
    """Write JSON atomically: indented, or `compact` (one line, C-speed encoding: a list of
    thousands of photos indented costs tens of milliseconds per write). `durable=False`
    leaves the fsyncs to the caller: a file in a staging directory, which publishing
    fsyncs whole (`fsync_tree`) before anyone can read it."""
    if compact:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    else:
        text = json.dumps(data, sort_keys=True, indent=2)
    atomic_write_bytes(path, (text + "\n").encode(), durable=durable)


def sweep(folder: Path, used: set[str]) -> None:
    """Remove the files of `folder` whose name up to the first dot is not in `used`
    (<digest>.jpg, <digest>.v2x8.npy, <hash>.npy), and the .<name>.<random>.tmp files a
    killed atomic write left (scandir: only a file to remove costs a stat)."""
    if not folder.is_dir():  # missing, or a file in its place (damage that fails every write)
        if os.path.lexists(folder):
            with contextlib.suppress(OSError):
                os.unlink(folder)
        return
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            stale = name.startswith(".") and name.endswith(".tmp")
            if stale or (name.split(".")[0] not in used and entry.is_file()):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def remove_empty_folders(parent: Path) -> None:
    """Remove the empty folders in `parent`, then `parent` if that leaves it empty."""
    if not parent.is_dir():
        return
    with os.scandir(parent) as entries:
        folders = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    for folder in [*folders, parent]:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def parse_json(text: str | bytes) -> Any:
    """json.loads, with nesting too deep for the decoder's recursion (100,000 brackets in a
    hostile file) a ValueError like any other malformed JSON, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def not_regular(folder: Path) -> Path | None:
    """The first file under `folder` that is a named pipe, a device or a link to one: its
    reader would block forever or never reach its end."""
    for top, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # gone, or a broken link: its reader says so
                if not stat.S_ISREG(os.stat(os.path.join(top, name)).st_mode):
                    return Path(top, name)
    return None


def regular(path: Path) -> Path:
    """`path`, once it is known to be a regular file (FileNotFoundError, or OSError for a
    named pipe or a device in the models directory: numpy and ONNX Runtime would wait on a
    pipe forever, or read /dev/zero until memory runs out)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return path


MAX_JSON_BYTES = 64 * 2**20  # none luncher writes comes near (taught.json, 10,000 photos: 2 MB)


def read_json(path: Path) -> Any:
    """A JSON file of the models directory; one that is not a regular file (a link to
    /dev/zero would fill the memory, a named pipe block every command forever) or is too
    large for one luncher writes is damaged, unread."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):  # before fdopen, which refuses a directory
            os.close(fd)
            raise DamagedError(f"{path} is damaged (a directory)")
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(info.st_mode):
                raise DamagedError(f"{path} is damaged (not a regular file)")
            if info.st_size > MAX_JSON_BYTES:
                raise DamagedError(f"{path} is damaged (larger than any file luncher writes)")
            return parse_json(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except OSError as exc:  # another user's 0600 file is unreadable, not damaged
        raise LuncherError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DamagedError(f"{path} is damaged ({exc})") from None


# numpy's own words for a file it cannot read, in the user's: it would tell them to load
# a damaged or hostile file "unsafely" (with pickle), or speak of memory maps and headers.
_NUMPY_WORDS = (
    (
        ("pickled", "Failed to interpret", "reading array header", "not a zip file"),
        "not a numpy file",
    ),
    (("Object arrays", "Python objects"), "it holds Python objects, not numbers"),
    (
        ("mmap length", "Failed to read all data", "not fully written", "No data left"),
        "it is cut short",
    ),
)


def numpy_problem(exc: BaseException) -> str:
    """What is wrong with a file numpy could not load, said plainly."""
    if isinstance(exc, KeyError) and exc.args:  # str() would quote it: "'x is not a file...'"
        return str(exc.args[0]).replace("is not a file in the archive", "is missing")
    if isinstance(exc, OSError) and exc.strerror:  # not "[Errno 2] No such file...: 'x'"
        return exc.strerror
    text = str(exc)
    for marks, words in _NUMPY_WORDS:
        if any(mark in text for mark in marks):
            return words
    return text


FSYNC_THREADS = 8  # threads that fsync a directory's files at once (see fsync_tree)


# Larger model files are refused unread: protobuf parses no message over 2 GiB, so a larger
# model keeps its weights in external data files (a phone-sized classifier is tens of MB).
MAX_MODEL_BYTES = 2**31 - 1


def open_regular(path: Path, kind: str) -> IO[bytes]:
    """`path` opened for reading if it is a regular file, else a LuncherError that calls
    what it should be `kind` ("a backup"): a named pipe without a writer would block the
    open forever (O_NONBLOCK: it does not), and a pipe or a device may never end."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    except FileNotFoundError:
        raise LuncherError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LuncherError(f"{path}: is a directory, not {kind}") from None
    except OSError as exc:
        raise LuncherError(f"{path}: cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise LuncherError(f"{path}: {what}, not {kind}")
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_model_file(path: Path) -> bytes:
    """The model file's bytes; a pipe, a device or a huge file is refused before reading
    (a FIFO would block forever and /dev/zero fill the memory)."""
    with open_regular(path, "an ONNX model") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_MODEL_BYTES:
            raise LuncherError(
                f"{path}: {size / 2**30:.1f} GiB is too large: an ONNX file is at most 2 GiB "
                "(a larger model keeps its weights in external data files)"
            )
        try:
            return handle.read()
        except OSError as exc:
            raise LuncherError(f"{path}: cannot read: {exc.strerror}") from None


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`; returns when all are durable.

    The fsyncs run at once, on a few threads: a journaling filesystem commits concurrent
    ones together, where one after another each waits for a commit of its own (ext4, 10
    new files and their directory, medians of 16: 33 ms in turn, 1 ms at once). Each
    fsync still has to succeed; the first error is raised once all have ended."""
    files: list[str] = []
    folders: list[Path] = []
    for dirpath, _, filenames in os.walk(root):
        files.extend(os.path.join(dirpath, name) for name in filenames)
        folders.append(Path(dirpath))
    errors: list[BaseException] = []

    def sync(paths: list[str], dirs: list[Path]) -> None:
        try:
            for path in paths:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            for folder in dirs:
                fsync_dir(folder)
        except BaseException as exc:  # raised in the caller's thread below
            errors.append(exc)

    count = max(1, min(FSYNC_THREADS, len(files)))
    threads = [
        threading.Thread(
            target=sync,
            args=(files[i::count], folders[i::count]),
            name="fsync",
            daemon=True,
        )
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# The file a working folder's owner holds locked while it uses the folder.
FOLDER_OWNER = ".owner"


@contextlib.contextmanager
def owned_folder(path: Path, *, mode: int = 0o777) -> Iterator[Path]:
    """A new working folder, held by this process (an advisory lock on its owner file)
    while the block runs, and removed on leaving. One that a killed process leaves is
    `abandoned`, for whoever cleans up to remove."""
    path.mkdir(mode=mode)  # outside the `try`: a folder that exists is not ours to remove
    try:
        with exclusive_lock(path / FOLDER_OWNER, timeout=0, busy=f"{path} is in use"):
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def abandoned(folder: Path) -> bool:
    """A working folder that no process holds (its owner was killed)."""
    try:
        with exclusive_lock(folder / FOLDER_OWNER, timeout=0, busy="in use"):
            return True
    except LuncherError:
        return False


# Seconds of waiting for a lock after which the waiting process says so.
WAIT_NOTICE = 0.5


# Why a reader cannot open or create the lock file for writing: the directory (or the file)
# is read-only to it.
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def exclusive_lock(
    path: Path, *, timeout: float, busy: str, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """An advisory exclusive lock on the file `path` (created if missing), held while the
    block runs: flock on POSIX (released when the descriptor closes, so also when the
    process dies), the filelock package elsewhere. After `timeout` seconds of waiting,
    LuncherError(busy); `on_wait` is called once if the wait passes WAIT_NOTICE."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        with _file_lock(path, timeout, busy):
            yield
        return
    _no_folder_at(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno in _READ_ONLY:  # a read-only mount, or a folder of another user's
            raise LuncherError(
                f"cannot change {path.parent}: {exc.strerror}; nothing was changed"
            ) from None
        what = f"cannot open the lock file {path}: {exc.strerror}"
        if exc.errno == errno.EISDIR:
            what = f"{path} is damaged (a directory, not the lock file): remove it"
        raise LuncherError(what) from None
    with _flocked(fd, fcntl.LOCK_EX, path, timeout, busy, on_wait):
        yield


@contextlib.contextmanager
def shared_lock(
    path: Path, *, timeout: float, busy: str, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """A shared lock on the file `path`, which keeps `exclusive_lock` out but not other
    readers: opened for reading, so it is taken where the reader cannot write (a read-only
    mount, another user's folder). Where the file is missing and cannot be made, no writer
    of this directory has made it either, and the block runs without a lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: filelock's locks are exclusive
        try:
            with open(path, "a"):  # filelock needs to write it
                lockable = True
        except OSError:
            lockable = False
        with _file_lock(path, timeout, busy) if lockable else contextlib.nullcontext():
            yield
        return
    _no_folder_at(path)
    try:  # not blocking: a named pipe there would wait for a writer forever
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno not in _READ_ONLY:
                raise LuncherError(f"cannot open the lock file {path}: {exc.strerror}") from None
            yield
            return
    except OSError as exc:
        raise LuncherError(f"cannot open the lock file {path}: {exc.strerror}") from None
    with _flocked(fd, fcntl.LOCK_SH, path, timeout, busy, on_wait):
        yield


def _no_folder_at(path: Path) -> None:
    """An empty directory in place of the lock file (it failed every writer) is removed."""
    if path.is_dir():  # rmdir removes nothing else (a link: ENOTDIR), so races are safe
        with contextlib.suppress(OSError):
            os.rmdir(path)


@contextlib.contextmanager
def _flocked(
    fd: int, kind: int, path: Path, timeout: float, busy: str, on_wait: Callable[[], None] | None
) -> Iterator[None]:
    """flock(fd, kind) while the block runs; closes `fd` (which releases it) on leaving.
    A lock this thread holds already is refused at once (`heldlocks`)."""
    import fcntl

    try:
        with heldlocks.holding(fd, path, exclusive=kind == fcntl.LOCK_EX):
            started = time.monotonic()
            told = False
            while True:
                try:
                    fcntl.flock(fd, kind | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - started
                    if waited >= timeout:
                        raise LuncherError(busy) from None
                    if not told and waited > WAIT_NOTICE and on_wait is not None:
                        told = True
                        on_wait()
                    time.sleep(0.05)
                except OSError as exc:  # e.g. a filesystem without locks
                    raise LuncherError(f"cannot lock {path}: {exc.strerror}") from None
            yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, busy: str) -> Iterator[None]:  # pragma: no cover
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise LuncherError(busy) from None
    try:
        yield
    finally:
        lock.release()
