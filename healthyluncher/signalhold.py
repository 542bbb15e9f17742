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
import signal
import threading
from collections.abc import Iterator
from typing import Any

HELD = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then deliver the first one
    that came. Only the main thread receives signals: in another thread this does nothing.
    A signal that is ignored, or whose handler is not Python's, is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    replaced: dict[int, Any] = {}  # signal.getsignal's handlers
    try:
        for name in HELD:
            number = getattr(signal, name)
            handler = signal.getsignal(number)
            if handler is None or handler == signal.SIG_IGN:
                continue
            replaced[number] = handler
            signal.signal(number, lambda signum, frame: arrived.append(signum))
        yield
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)
        if arrived:
            signal.raise_signal(arrived[0])  # acts here, as it would have at its arrival
