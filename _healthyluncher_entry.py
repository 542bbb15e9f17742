"""The `luncher` command's entry point: outside the healthyluncher package on purpose.

A console script imports its entry point's module before calling it, and importing any
module of a package runs the package's `__init__` first (with `typing`, about 12 ms):
with `healthyluncher.__main__:run` as the entry point, Ctrl-C in that time printed a
traceback. This module imports nothing before its guard, so Ctrl-C at any moment of
start-up (or later) ends with one line and exit code 130. Only pip's generated script,
which finds this module and calls `run`, runs before the guard.
"""


def run() -> None:
    try:
        from healthyluncher.__main__ import run as luncher

        luncher()
    except KeyboardInterrupt:
        import sys

        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
