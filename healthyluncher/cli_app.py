"""The `luncher` application object and its global options, shared by the command modules."""

# No `from __future__ import annotations` here: typer reads the annotations at run time.

import os
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
import typer.core

from healthyluncher.cli_output import (
    debug_requested,
    err,
    json_line,
    models_dir_option,
    quiet,
    stop_on_signals,
)
from healthyluncher.cli_streams import OutputLost, guard_streams, output_lost
from healthyluncher.settings import MAX_PIXEL_STATISTIC, backup_name_problem
from healthyluncher.version import __version__

if TYPE_CHECKING:
    from healthyluncher.api import Luncher

CONTEXT = {"help_option_names": ["-h", "--help"]}


class LuncherGroup(typer.core.TyperGroup):
    """The command group: global options are accepted after the command too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            hoisted = hoist_global_options(list(args))
        except MissingValue as exc:  # as click says it of the option before the command
            usage_error = typer.BadParameter.__mro__[1]  # click's UsageError (typer's own)
            raise usage_error(str(exc), ctx) from None
        return super().parse_args(ctx, hoisted)

    def list_commands(self, ctx: Any) -> list[str]:
        """In the order they are used (typer lists them as the modules registered them)."""
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


ORDER = ["predict", "retrain", "undo", "forget", "examples", "labels", "status", "reset"]
ORDER += ["export", "import", "make-updatable", "repair"]


def _usage_metavar(self: typer.core.TyperArgument, ctx: Any, *, usage: bool = False) -> str:
    """Required arguments in usage lines as PHOTO_OR_DIR..., not typer's {PHOTO_OR_DIR...}."""
    text = _typer_metavar(self, ctx, usage=usage)
    return text[1:-1] if usage and text.startswith("{") and text.endswith("}") else text


_typer_metavar = typer.core.TyperArgument.make_metavar
typer.core.TyperArgument.make_metavar = _usage_metavar  # type: ignore[method-assign]


app = typer.Typer(
    cls=LuncherGroup,
    context_settings=CONTEXT,
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion, as typer makes them
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: wraps at any width instead of cutting names
    help="Personalize a lunch-photo classifier (healthy / fast food) on your own machine.",
)


def given_path(text: str) -> Path:
    """A path argument; Path("") is the current directory, so `luncher forget "$UNSET"`
    forgot every photo there: an empty one is a usage error."""
    if not text:
        raise typer.BadParameter("an empty path (an unset variable?)")
    SPELLINGS.setdefault(Path(text), text)
    return Path(text)


# Paths as they were typed or read: Path drops './' and doubled slashes, and results name
# a photo as it was given (`find . | luncher predict --json -` is matched by path).
SPELLINGS: dict[Path, str] = {}


def spelled(item: Path, found: Path) -> str:
    """How the photo `found`, that the input `item` gave, is named in results."""
    text = SPELLINGS.get(item, str(item))
    return text if found == item else os.path.join(text, found.relative_to(item))


def file_path(text: str) -> Path:
    """A backup's path. `-`, a stream for photos and for tar, is refused rather than
    written or read as a file named '-' in the current directory."""
    if text == "-":
        raise typer.BadParameter("give a file name: a backup cannot be a stream (./- is a file)")
    return given_path(text)


def backup_target(text: str) -> Path:
    """The archive export writes: a file name that says .tar.gz, which it holds."""
    path = file_path(text)
    problem = backup_name_problem(text)
    if problem:
        raise typer.BadParameter(problem)
    return path


@app.callback()
def main_options(
    ctx: typer.Context,
    models_dir: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option(
            "--models-dir",
            metavar="DIR",
            help="Where models and your examples live. Default: $LUNCHER_MODELS_DIR, "
            "else your user data directory.",
            show_default=False,
            parser=given_path,
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of unexpected errors.")
    ] = False,
    quiet_option: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Print results and errors only: no progress, no notes."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show the version and exit.",
            callback=lambda value: _print_version(value),
            is_eager=True,
        ),
    ] = False,
) -> None:
    debug_requested[0] = debug
    SPELLINGS.clear()  # of this command's paths only (a program may run several)
    quiet[0] = quiet_option
    models_dir_option[0] = models_dir
    ctx.obj = {"models_dir": models_dir}


# The --json option of every command: one JSON object (JSON lines for per-photo output).
JSON = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"luncher (healthyluncher) {__version__}")
        raise typer.Exit()


# Global options a user may type after the command (`luncher predict --models-dir X a.jpg`),
# as gh and git accept them: moved before the command before typer parses the line.
GLOBAL_FLAGS = ("--debug", "--quiet", "-q")
GLOBAL_VALUES = ("--models-dir",)


class MissingValue(Exception):
    """A global option that takes a value, last on the line without it; or the command."""

    def __init__(self, option: str) -> None:
        missing = "Missing command." if option == "command" else ""
        super().__init__(missing or f"Option '{option}' requires an argument.")


def hoist_global_options(argv: list[str]) -> list[str]:
    """argv with the global options found after the command moved in front of it."""
    command = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command is None:
        return _without_a_command(argv)
    # The value of a global option before the command is not the command.
    while command > 0 and argv[command - 1] in GLOBAL_VALUES:
        command = next(
            (i for i in range(command + 1, len(argv)) if not argv[i].startswith("-")), None
        )
        if command is None:
            return _without_a_command(argv)
    front, rest, moved = argv[:command], argv[command:], []
    # Every command takes --json, the group none: `luncher --json status` was "No such
    # option: --json (Possible options: --version)". It moves behind the command's own.
    late = ["--json"] if "--json" in front else []
    front = [arg for arg in front if arg != "--json"]
    kept: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            kept += late + rest[i:]
            late = []
            break
        if arg in GLOBAL_FLAGS:
            moved.append(arg)
        elif arg in GLOBAL_VALUES:
            # Last, without its value (`--models-dir $UNSET`): moved in front, it took the
            # command for its value ("No such command 'lunch.jpg'.").
            if i + 1 == len(rest):
                raise MissingValue(arg)
            moved += [arg, rest[i + 1]]
            i += 1
        elif arg.split("=", 1)[0] in GLOBAL_VALUES:
            moved.append(arg)
        else:
            kept.append(arg)
        i += 1
    return front + moved + kept + late


def _without_a_command(argv: list[str]) -> list[str]:
    """`luncher --json` was "No such option: --json": every command takes it, and what is
    missing is the command (--help and --version go on without it)."""
    if "--json" in argv and not {"--version", "--help", "-h"} & set(argv):
        raise MissingValue("command")
    return [arg for arg in argv if arg != "--json"]


def luncher(ctx: typer.Context) -> "Luncher":
    from healthyluncher import api

    def waiting(message: str) -> None:
        if not quiet[0]:
            err.print(f"[yellow]waiting:[/yellow] {message}")

    return api.open((ctx.obj or {}).get("models_dir"), on_wait=waiting)


def with_stdin(paths: list[Path]) -> list[Path]:
    """`-` stands for newline-separated paths read from standard input, or NUL-separated
    ones (`find -print0`: a name may hold a newline, never a NUL), taken as they are; blank
    lines are left out."""
    if Path("-") not in paths:
        return paths
    # The file system's bytes, decoded as it names files (a Latin-1 name from `find` was
    # a UnicodeDecodeError where a UTF-8 locale makes standard input strict).
    buffer = getattr(sys.stdin, "buffer", None)
    text = os.fsdecode(buffer.read()) if buffer is not None else sys.stdin.read()
    if "\0" in text:
        names = [name for name in text.split("\0") if name]
    else:
        # Each line as it is, less a Windows line end: a name may begin or end with a space
        # (stripped, 'lunch.png ' from `ls` was 'lunch.png: cannot read').
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        names = [line for line in lines if line.strip()]
    for name in names:
        SPELLINGS.setdefault(Path(name), name)
    read = [Path(name) for name in names]
    expanded: list[Path] = []
    for path in paths:
        expanded.extend(read if path == Path("-") else [path])
    return expanded


def ask(question: str, *, default: bool) -> bool:
    """A yes/no question to the person at the terminal, asked on stderr: stdout carries
    results alone (click's confirm writes its prompt's last space to stdout, in front of
    the JSON). Ctrl-C or the end of input (Ctrl-D) is typer.Abort, as with click."""
    while True:
        sys.stderr.write(f"{question} [{'Y/n' if default else 'y/N'}]: ")
        sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            sys.stderr.write("\n")  # the line the answer would have ended
            raise typer.Abort()
        answer = line.strip().lower()
        if answer in ("y", "yes", "n", "no", ""):
            return answer.startswith("y") if answer else default
        sys.stderr.write("Error: invalid input\n")


def bounded(low: float, high: float, *, above: bool = False) -> Callable[[str], float]:
    """The parser of a number option the API bounds: a value it would refuse (NaN, 1e400,
    which is inf, or one past the bounds) is a usage error here, not an error of the
    command. Whole-number options get typer's min and max instead."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a number.") from None
        if not ((low < value) if above else (low <= value)) or not value <= high:  # NaN too
            raise typer.BadParameter(
                f"{value:g} is not in the range {low:g}{'<' if above else '<='}x<={high:g}."
            )
        return value

    return number


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """Numbers separated by commas, each finite and within the API's bounds."""
    if text is None:
        return None
    number = bounded(-MAX_PIXEL_STATISTIC, MAX_PIXEL_STATISTIC)
    try:
        return tuple(number(part) for part in text.split(","))
    except typer.BadParameter as exc:
        raise typer.BadParameter(
            f"{exc.message[:-1]} (expected numbers separated by commas, got {text!r}).",
            param_hint=f"'{option}'",
        ) from None


def names(text: str | None, option: str) -> list[str] | None:
    """Names separated by commas; an empty text (an unset shell variable, most often) is
    refused, not read as "no names given"."""
    if text is None:
        return None
    if not text.strip():
        raise typer.BadParameter(
            "no names given (an unset variable?); e.g. healthy,fast_food", param_hint=f"'{option}'"
        )
    return [part.strip() for part in text.split(",")]


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Preset(str, Enum):
    """Pixel normalizations by name (modelsetup.PRESETS)."""

    imagenet = "imagenet"
    inception = "inception"
    unit = "unit"
    raw = "raw"


def main() -> None:
    """Run `luncher` (healthyluncher.cli, which imports this, has registered its commands)."""
    import logging
    import warnings

    # luncher's process is its own, so its output is settled here, not by the library:
    # Pillow warns about damaged metadata it recovers from (errors are reported per file),
    # ONNX Runtime's Python tools log advice, and ONNX Runtime itself logs a few things
    # outside any session (`reporting` quiets it as a command starts: `luncher --help`
    # imports neither it nor numpy). With a handler on the root logger, the library also
    # writes training files in this process rather than in a child Python.
    warnings.simplefilter("ignore")  # every error is one line of its own; no other text
    logging.getLogger().addHandler(logging.NullHandler())
    guard_streams()
    stop_on_signals()
    code: object = 0
    try:
        try:
            _run_app()
        finally:  # what is still buffered fails here, not silently as the process ends
            sys.stdout.flush()
    except OutputLost as exc:  # `reporting` tells a command's own
        code = 1  # told here: not again below
        output_lost(exc)
    except SystemExit as done:
        code = done.code
        raise
    finally:  # a failure that click swallowed (in --help, --version) must not exit 0
        lost = getattr(sys.stdout, "lost", None)
        if lost is not None and code in (0, None):
            output_lost(lost)


def _run_app() -> None:
    if "--json" not in sys.argv[1:]:
        app(prog_name="luncher")
        return
    # A usage error (exit 2) is one JSON object too. typer keeps click's classes private:
    # its errors are known by what they have (a message and an exit code).
    try:
        code = app(prog_name="luncher", standalone_mode=False)
    except Exception as exc:
        if type(exc).__name__ == "Abort":  # Ctrl-C or end of input at a question
            json_line({"error": "Aborted!"})
            sys.stderr.write("Aborted!\n")
            raise SystemExit(1) from None
        if not hasattr(exc, "format_message") or not hasattr(exc, "show"):
            raise
        json_line({"error": exc.format_message()})
        exc.show()
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def in_options(source: str) -> str:
    """Where the preprocessing came from, in make-updatable's options."""
    preset = re.fullmatch(r"the (\w+) preset", source)
    if preset:
        return f"--preprocessing {preset[1]}"
    if source == "the given mean and std":
        return "--mean/--std"
    return source.replace("mean and std)", "mean and std; --preprocessing says otherwise)")
