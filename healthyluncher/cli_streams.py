"""The process's standard streams, settled before a command runs: closed ones, a full disk
and encodings that cannot hold every character (see `guard_streams`)."""

from __future__ import annotations

import codecs
import io
import os
import sys
import unicodedata
from typing import Any

from healthyluncher.errors import LuncherError


def guard_streams() -> None:
    """A stream the shell closed (`luncher ... >&-`, `<&-`) is None in Python. Standard
    output closed: refused in one line before the command runs (its results, or the news
    that it saved a change, would be lost); standard input closed reads as empty, and
    standard error closed takes the messages no one reads (it failed the command). Standard
    output that fails (a full disk) is one line too: see Output."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - for the process
    if sys.stderr is None:  # `2>&-`: messages are dropped, as asked, and the command runs
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    if sys.stdout is None:
        sys.stderr.write(
            "error: standard output is closed: nothing was done "
            "(to discard the output, redirect it to /dev/null)\n"
        )
        raise SystemExit(1)
    codecs.register_error(ESCAPES, _escaped)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # not a test's capture, nor Output yet
            stream.reconfigure(errors=ESCAPES)
    if not isinstance(sys.stdout, Output):
        sys.stdout = Output(sys.stdout)
    if not isinstance(sys.stderr, Messages):
        sys.stderr = Messages(sys.stderr)


# The error handler of standard output and error: what their encoding cannot hold (ASCII
# in a C locale without UTF-8 mode, Windows' cp1252 in a redirected output) is written as
# \uXXXX, escapes JSON reads back as the character itself, where 'unexpected
# UnicodeEncodeError' stopped the command. (Lone surrogates are escaped before.)
ESCAPES = "healthyluncher-escapes"


def _escaped(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start : error.end]
    units = text.encode("utf-16-be", "surrogatepass")  # astral characters: two escapes
    escapes = "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
    return escapes, error.end


def escaped_length(char: str) -> int:
    """How many characters standard output writes for `char` where its encoding cannot hold
    it (the `_escaped` escapes, six per UTF-16 unit); 0 where it can."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return 3 * len(char.encode("utf-16-be", "surrogatepass"))
    except LookupError:  # an encoding Python does not know: none was escaped either
        pass
    return 0


def cells(text: str) -> int:
    """The columns `text` takes as standard output writes it: two for a wide (CJK) character,
    none for a combining mark, and an escape's length for one its encoding lacks."""
    if text.isascii():
        return len(text)
    return sum(
        escaped_length(c)
        or (0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1)
        for c in text
    )


def pad(text: str, width: int, *, right: bool = False) -> str:
    """`text` padded with spaces to `width` terminal columns (on the left if `right`)."""
    fill = " " * (width - cells(text))
    return fill + text if right else text + fill


class OutputLost(LuncherError):
    """Standard output could not be written: a full disk (`luncher predict photos/ >
    results.txt`), a quota, an I/O error."""


class Output:
    """sys.stdout, whose first failure to write (other than a reader gone: BrokenPipeError,
    which `reporting` ends quietly) is OutputLost, one line on stderr; the rest of the
    output (the --json error object among it) then goes to /dev/null, so that neither the
    error report nor Python's last flush fails again with a traceback."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.lost: OutputLost | None = None

    def write(self, text: str) -> int:
        if self.lost is not None:
            return len(text)
        try:
            return int(self._stream.write(text))
        except OSError as exc:
            raise self._lost(exc) from None

    def flush(self) -> None:
        if self.lost is not None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._lost(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _lost(self, exc: OSError) -> OSError | OutputLost:
        if isinstance(exc, BrokenPipeError):
            return exc
        _to_devnull(self._stream)
        self.lost = OutputLost(f"cannot write to standard output: {exc.strerror or exc}")
        return self.lost


class Messages:
    """sys.stderr, whose failure to write (a full disk, a reader gone) loses the messages,
    not the command: the first warning on a full disk was 'unexpected OSError', which
    stopped predict midway and hid a saved retrain's summary. There is nowhere left to say
    it, so the rest goes to /dev/null (Python's last flush included)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            self._stream.write(text)
        except OSError:
            self._drop()
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _drop(self) -> None:
        _to_devnull(self._stream)


def _to_devnull(stream: Any) -> None:
    """Point `stream`'s file descriptor at /dev/null: what is still written to it (Python's
    last flush included) goes nowhere, and fails no more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def output_lost(exc: OutputLost) -> None:
    """Tell that standard output failed, in one line, and exit 1."""
    sys.stderr.write(f"error: {exc}\n")
    raise SystemExit(1) from None
