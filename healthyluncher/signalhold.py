"""The last steps of a change that is already saved run to their end before a signal acts.

Once state.json names the new state, a change still deletes what it promised to delete (a
forgotten photo's thumbnail and head inputs) and what no state names any more. Ctrl-C,
SIGTERM or SIGHUP arriving then cut those deletions short: the user was told the change
was saved, and a forgotten photo stayed on disk until some later change. `signals_held`
records such a signal instead, and delivers it to the handler that was in place once the
block ends, so it acts exactly as it would have, only a moment later.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Iterator
from typing import Any

HELD = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then deliver the first one
    that came. Only the main thread receives signals: in another thread this does nothing.
    A signal that is ignored, or whose handler is not Python's, is left as it is: one that
    C code installed (faulthandler.register, a library, the program embedding Python) is
    not what signal.getsignal reports, so it is asked of the system (`_foreign`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[tuple[int, Any]] = []  # each signal, and the frame it came in
    replaced: dict[int, Any] = {}  # signal.getsignal's handlers
    try:
        for name in HELD:
            number = getattr(signal, name)
            handler = signal.getsignal(number)
            if handler is None or handler == signal.SIG_IGN:
                continue
            before = _action(number)
            replaced[number] = handler
            signal.signal(number, lambda signum, frame: arrived.append((signum, frame)))
            if before is not None and _foreign(before, _action(number)):
                # Not Python's: putting Python's handler back would lose it for good.
                del replaced[number]
                signal.signal(number, handler)  # Python's own record of it, as it was
                _restore(number, before)
        yield
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)
        if arrived:  # acts here, as it would have at its arrival
            number, frame = arrived[0]
            handler = replaced.get(number)
            if callable(handler):
                # Run as Python would have run it. Raising the signal again would also
                # write to a wake-up fd a second time (asyncio's add_signal_handler): the
                # loop would run its callback twice for one signal.
                handler(number, frame)
            else:  # SIG_DFL: the system's action
                signal.raise_signal(number)


# Larger than any system's struct sigaction; its first field is the handler's address.
_ACTION_SIZE = 512


def _action(number: int) -> ctypes.Array[ctypes.c_char] | None:
    """The system's action for signal `number` (a struct sigaction), None where unknown."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        return None
    try:
        libc = ctypes.CDLL(None)
        action = ctypes.create_string_buffer(_ACTION_SIZE)
        return action if libc.sigaction(number, None, action) == 0 else None
    except (OSError, AttributeError):
        return None


def _foreign(
    before: ctypes.Array[ctypes.c_char], python: ctypes.Array[ctypes.c_char] | None
) -> bool:
    """Whether `before` runs a handler other than the default and Python's own (`python`,
    the action signal.signal installs)."""
    handler = ctypes.c_void_p.from_buffer(before).value or 0
    if handler in (0, 1):  # SIG_DFL, SIG_IGN: what getsignal reports them as
        return False
    return python is not None and handler != (ctypes.c_void_p.from_buffer(python).value or 0)


def _restore(number: int, action: ctypes.Array[ctypes.c_char]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).sigaction(number, action, None)
