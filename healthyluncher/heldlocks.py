"""Which thread holds which lock file, so that a thread never waits for a lock it holds
itself, and a process forked meanwhile does not keep its parent's locks.

A progress callback that asks for a change (`lun.undo()` inside `lun.retrain`) runs in the
thread that holds the models directory's lock: waiting for it would wait forever, so it is
refused at once. A child forked while another thread held a lock (a `multiprocessing`
worker started during an `UpdateTask`) inherits the descriptor, and an flock lasts until
every copy of it is closed: the child would hold the models directory for its whole life,
and every change of the parent would wait for it, then fail. The child closes its copies of
the locks that threads other than the forking one held (those threads do not exist in it)
and drops those of the forking thread (a worker started from a progress callback), and
objects that keep thread locks of their own are told (`after_fork_in_child`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from healthyluncher.errors import LuncherError

# Each held lock: its descriptor -> (the holding thread, the locked file, exclusive or not).
_held: dict[int, tuple[int, tuple[int, int], bool]] = {}
_guard = threading.Lock()
# Methods to call in a forked child: weakly held, so that an object can go away.
_on_fork: weakref.WeakSet[Any] = weakref.WeakSet()
# Modules' own thread locks (namespace, name), made anew in a forked child.
_module_locks: list[tuple[dict[str, Any], str]] = []
# What a forked child must never destroy (see `kept_in_child`).
_inherited: list[Any] = []


@contextlib.contextmanager
def holding(fd: int, path: Path, *, exclusive: bool) -> Iterator[None]:
    """Around the wait for an flock on `fd` and the block it guards: LuncherError at once
    when this thread holds the file already and either lock is exclusive (shared locks
    nest); the descriptor is registered while the block runs."""
    info = os.fstat(fd)
    me, key = threading.get_ident(), (info.st_dev, info.st_ino)
    with _guard:
        mine = [ex for thread, held, ex in _held.values() if (thread, held) == (me, key)]
        if mine and (exclusive or any(mine)):
            raise LuncherError(
                f"{path.parent} is being changed by a call that has not returned yet (this "
                "one was made from its callback): make this call after that one returns"
            )
        _held[fd] = (me, key, exclusive)
    try:
        yield
    finally:
        with _guard:
            _held.pop(fd, None)


def module_lock(namespace: dict[str, Any], name: str) -> threading.Lock:
    """A module's lock `namespace[name]` (its `globals()`), a new one in a forked child:
    another thread may have held it at the fork, and would never release it there."""
    _module_locks.append((namespace, name))
    return threading.Lock()


def after_fork_in_child(owner: Any) -> None:
    """Call `owner._after_fork_in_child()` in a child forked from this process."""
    _on_fork.add(owner)


def kept_in_child(parents: Any) -> None:
    """In a forked child: `parents` (the parent's ONNX Runtime sessions) is never destroyed.
    A session's destructor waits for its thread pool's threads, which a forked child does
    not have: dropping one there hung the child before it ran a line of its own."""
    _inherited.append(parents)


def _forked() -> None:
    global _guard
    _guard = threading.Lock()  # another thread may have held it at the fork
    for namespace, name in _module_locks:
        namespace[name] = threading.Lock()
    me = threading.get_ident()
    for fd, (thread, _, _) in list(_held.items()):
        del _held[fd]  # the parent's lock, not the child's
        with contextlib.suppress(OSError):
            if thread != me:  # its thread is gone
                os.close(fd)
            else:  # a worker started from a callback: the block that closes `fd` never
                _drop_lock(fd)  # ends in it, or ends later and closes the number then
    for owner in list(_on_fork):
        reset: Callable[[], None] = owner._after_fork_in_child
        reset()


def _drop_lock(fd: int) -> None:
    """The descriptor number `fd` no longer refers to the locked file (an flock lasts while
    any copy of its descriptor is open) but to the null device, so closing it stays safe."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)
