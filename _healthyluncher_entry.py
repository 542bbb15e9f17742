"""The `luncher` command's entry point: outside the healthyluncher package on purpose.

A console script imports its entry point's module before calling it, and importing any
module of a package runs the package's `__init__` first (with `typing`, about 12 ms):
with `healthyluncher.__main__:run` as the entry point, Ctrl-C in that time printed a
traceback. This module imports nothing before its guard, so Ctrl-C at any moment of
start-up (or later) ends with one line and exit code 130. Only pip's generated script,
which finds this module and calls `run`, runs before the guard.

The process is luncher's own, so once the command has ended (its files written, synced and
published, its lock released with the process) and every atexit handler has run, it ends
with its exit status at once: Python's finalization would only take apart, one object at a
time, what typer, numpy and ONNX Runtime built (and run ONNX Runtime's C++ destructors),
about 20 ms of every command. Standard output and error are flushed first, C's stdio too;
when a flush fails, or the command ended with an exception, Python ends the process as
it always did, and reports that as before. Only a call from the top level of the main
module (pip's script) is the end of the process: a program that calls `run` from a
function of its own (a test, say) goes on, and exits in its own way.
"""

# The status the command ended with, once it has ended with one (see _end).
_status: list[int | None] = [None]


def run() -> None:
    _status[0] = None
    try:
        try:
            import sys

            caller = sys._getframe(1)  # pip's script: the top level of the main module
            in_main = caller.f_globals.get("__name__") == "__main__"
            own = in_main and caller.f_code.co_name == "<module>"
            if own:
                import atexit  # built into the interpreter

                atexit.register(_end)  # registered first: it runs after every other handler
            from healthyluncher.__main__ import run as luncher

            luncher(own_process=own)
        except KeyboardInterrupt:
            import sys

            sys.stderr.write("interrupted\n")
            raise SystemExit(130) from None
    except SystemExit as done:
        _status[0] = _exit_status(done.code)
        raise
    _status[0] = 0


def _exit_status(code: object) -> int | None:
    """The exit status Python gives SystemExit(code), where it is a plain number; None
    (Python's own exit) for anything it would print first."""
    if code is None:
        return 0
    if type(code) is int and 0 <= code <= 255:
        return code
    return None


def _end() -> None:
    """End the process with the command's status, after flushing what it wrote."""
    status = _status[0]
    if status is None:
        return
    import os
    import sys

    try:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None and not stream.closed:
                stream.flush()
        if "ctypes" in sys.modules:  # a C library may have written through C's stdio
            import ctypes

            ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - Python's own exit reports it, as it always did
        return
    os._exit(status)
