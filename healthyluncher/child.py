"""A job of ours run by a child Python: for ONNX Runtime's Python tools (the artifact
generator, the quantizer), which configure the root logger (logging.basicConfig), log
through it, set warning filters and write to the process's stderr as they work. In a
process of their own they change nothing of the program that imports the library; the
price is a Python starting and importing onnx and ONNX Runtime, about 1 s.

The parent writes one JSON line, {"job": "healthyluncher.module:function", "args": ...},
then any bytes, to the child's stdin; the child calls function(args, data) and writes one
JSON line back on its own copy of stdout: {"result": ...} or {"error": {...}}.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from healthyluncher.errors import Command, LuncherError, Param, Part, debug_wanted

# How the child starts: with the program's import path as it is now (a program may have
# added to it), this package's directory first, and not the current directory (where a
# program may keep files named like the modules it imports).
_BOOT = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); import healthyluncher.child"
_BOOT += "; healthyluncher.child.main()"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class JobError(Exception):
    """What a job raised in the child, by name: `kind` (the exception's type), `message`,
    and `errno` for an OSError."""

    def __init__(self, kind: str, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.errno = errno


def python() -> str | None:
    """This Python's interpreter, when a child can be started with it: not in a frozen
    application, nor where Python is embedded and sys.executable is the host program
    (a web server's module, say)."""
    executable = sys.executable
    if not executable or getattr(sys, "frozen", False):
        return None
    if not os.path.basename(executable).lower().startswith(("python", "pypy")):
        return None
    return executable


def run(job: str, args: dict[str, Any], data: bytes = b"", *, what: str) -> Any:
    """Run `job` in a child Python and return its result; raises JobError for what the
    job raised, LuncherError for what it raised as one, or for a child that stopped without
    an answer (`what` names the work in that message)."""
    executable = python()
    if executable is None:
        raise LuncherError(f"{what} needs a Python interpreter to run in, and there is none here")
    request = json.dumps({"job": job, "args": args}).encode() + b"\n"
    debug = debug_wanted(os.environ.get("LUNCHER_DEBUG"))
    path = [_PACKAGE_ROOT, *(entry for entry in sys.path if entry)]
    done = subprocess.run(
        [executable, "-c", _BOOT, json.dumps(path)],
        input=request + data,
        stdout=subprocess.PIPE,
        stderr=None if debug else subprocess.DEVNULL,  # ONNX Runtime's own lines
        check=False,
    )
    reply = _reply(done.stdout)
    if reply is None:
        code = done.returncode
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        raise LuncherError(f"{what} stopped unexpectedly ({how})")
    if "error" not in reply:
        return reply["result"]
    error = reply["error"]
    if error.get("luncher"):
        raise LuncherError(*_parts(error.get("parts"), error["message"]))
    raise JobError(error["kind"], error["message"], error.get("errno"))


def _parts(parts: Any, message: str) -> list[Part]:
    """A LuncherError's message parts as the child sent them, or its text alone."""
    if not isinstance(parts, list):
        return [message]
    rebuilt: list[Part] = []
    for part in parts:
        if isinstance(part, str):
            rebuilt.append(part)
        elif isinstance(part, dict) and isinstance(part.get("param"), list):
            name, value, example = (part["param"] + [None, None, ""])[:3]
            rebuilt.append(Param(str(name), value, str(example or "")))
        elif isinstance(part, dict) and isinstance(part.get("command"), list):
            cli, api = (part["command"] + ["", ""])[:2]
            rebuilt.append(Command(str(cli), str(api)))
        else:
            return [message]
    return rebuilt


def _reply(output: bytes) -> dict[str, Any] | None:
    lines = output.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def main() -> None:
    """The child: its process is the job's, so ONNX Runtime's tools may log, warn and
    write to stderr as they like (the parent discards that stderr)."""
    answer = os.dup(1)
    os.dup2(2, 1)  # print() and C++ output go where stderr goes: the answer's fd stays clean
    warnings.simplefilter("ignore")  # PYTHONWARNINGS=error must not fail the job
    logging.disable(logging.CRITICAL)
    request = json.loads(sys.stdin.buffer.readline())
    data = sys.stdin.buffer.read()
    reply: dict[str, Any]
    try:
        module, name = str(request["job"]).split(":")
        if not module.startswith("healthyluncher."):
            raise ValueError(f"not a job of ours: {module}")
        reply = {"result": getattr(importlib.import_module(module), name)(request["args"], data)}
    except LuncherError as exc:  # its parameters travel as such: the CLI names its options
        parts = [
            p if isinstance(p, str) else {"command" if isinstance(p, Command) else "param": list(p)}
            for p in exc.parts
        ]
        reply = {"error": {"luncher": True, "message": str(exc), "parts": parts}}
    except Exception as exc:
        errno = exc.errno if isinstance(exc, OSError) else None
        reply = {"error": {"kind": type(exc).__name__, "message": str(exc), "errno": errno}}
    os.write(answer, json.dumps(reply, default=str).encode() + b"\n")
