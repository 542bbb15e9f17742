"""What the `luncher` command shows: consoles, tables, progress bars and its one error boundary."""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from healthyluncher import to_json
from healthyluncher.cli_streams import cells, pad
from healthyluncher.errors import Command, CommittedInterrupt, LuncherError, Param, debug_wanted

if TYPE_CHECKING:
    from healthyluncher import Prediction
    from healthyluncher.events import Progress


class _Console:
    """A rich Console created on first use: `--json` output and `--help` never import rich's
    rendering (about 20 ms of every cold start)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            console = Console(highlight=False, soft_wrap=True, **self._options)
            if console.width < 1:  # COLUMNS=0: rich drew nothing at all, errors included
                console.width = shutil.get_terminal_size().columns or 80  # 3.10: a 0x0 pty
            self._console = console
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        """A line of markup; where the stream is not a terminal, plain text with the tags
        dropped, and rich (about 50 ms to import) is not loaded for it."""
        stream = sys.stderr if self._options.get("stderr") else sys.stdout
        if options or len(objects) != 1 or not isinstance(objects[0], str) or stream.isatty():
            self.real().print(*objects, **options)
        else:
            stream.write(MARKUP.sub("", objects[0]).replace("\\[", "[") + "\n")
            stream.flush()  # as rich's own print does

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


out = _Console()
err = _Console(stderr=True)


def printable(text: str) -> str:
    """`text` with every control or format character (ESC, CR, NUL, newline, U+202E...)
    shown as an escape: a message stays one line, and a name from a file cannot move the
    cursor, erase the screen or reverse the text around it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def escape(text: str) -> str:
    """rich.markup.escape (written out: importing it loads most of rich, ~40 ms, piped too)
    of the text with its control characters shown as escapes (`printable`)."""
    text = _MARKUP_LIKE.sub(lambda m: f"{m[1]}{m[1]}\\{m[2]}", printable(text))
    return text + "\\" if text.endswith("\\") and not text.endswith("\\\\") else text


_MARKUP_LIKE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")  # a tag, as rich reads one


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers
    style: str = ""  # rich style of every cell, at a terminal


def print_table(title: str, columns: list[Column], rows: list[list[tuple[str, str]]]) -> None:
    """A table: drawn by rich at a terminal; piped, plain columns separated by two spaces
    (grep- and awk-friendly, and no rich import). Cells are (text, rich style or "")."""
    rows = [[(printable(cell), style) for cell, style in row] for row in rows]
    if not sys.stdout.isatty():
        widths = [
            max([cells(c.header)] + [cells(row[i][0]) for row in rows])
            for i, c in enumerate(columns)
        ]

        def line(texts: list[str]) -> str:
            parts = [
                pad(text, width, right=column.right)
                for text, width, column in zip(texts, widths, columns, strict=True)
            ]
            return "  ".join(parts).rstrip()

        # A title is a note (--quiet: the header first, as predict's rows have it).
        text = ([] if quiet[0] else [title]) + [line([c.header for c in columns])]
        text += [line([cell for cell, _ in row]) for row in rows]
        sys.stdout.write("\n".join(text) + "\n")
        return
    from rich.table import Table

    table = Table(title=None if quiet[0] else title, title_justify="left")
    for column in columns:
        table.add_column(
            column.header,
            justify="right" if column.right else "left",
            style=column.style or None,
            overflow="fold",  # a cell too wide is wrapped: a path or digest is never cut
        )
    for row in rows:
        table.add_row(
            *(
                f"[{style}]{escape(cell)}[/{style}]" if style else escape(cell)
                for cell, style in row
            )
        )
    out.print(table)


def say(text: str) -> None:
    """A line of plain text (no markup) on stdout."""
    sys.stdout.write(text + "\n")


debug_requested = [False]  # set by --debug
models_dir_option: list[Path | None] = [None]  # set by --models-dir
quiet = [False]  # set by --quiet: results and errors only
json_mode = [False]  # set by a command's --json: errors are JSON on stdout too
# Commands that never change the models directory (after first use has set it up).
READ_ONLY = frozenset({"predict", "status", "export_backup", "examples", "labels_list"})


collector_paused = [False]  # the garbage collector, while luncher's own process starts
stopped_by = [signal.SIGINT]  # the signal that stopped the command (Ctrl-C unless told)


def stop_on_signals() -> None:
    """SIGTERM (`kill`, `timeout`, a service manager) and SIGHUP (the terminal closed) stop
    a command as Ctrl-C does, so it cleans up and says so: they ended the process where it
    stood. The first one stops it; later ones do not cut that cleanup short."""

    def stop(signum: int, frame: object) -> None:
        for name in STOPPING:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        stopped_by[0] = signal.Signals(signum)
        raise KeyboardInterrupt

    for name in STOPPING:
        signal.signal(getattr(signal, name), stop)


STOPPING = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def reporting(command: Callable[..., None]) -> Callable[..., None]:
    """Turn errors into one red line on stderr and exit 1 (a traceback only with --debug);
    with --json, the error is also one JSON object on stdout: {"error": message}."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        json_mode[0] = bool(kwargs.get("as_json"))
        try:
            from healthyluncher.api import quiet_default_logger  # every command's own import

            quiet_default_logger()  # luncher's process is its own (see cli_app.main)
            if collector_paused[0]:  # by luncher's own process to start up (__main__.run)
                collector_paused[0] = False
                gc.freeze()  # what start-up loaded: the collector goes over the command's
                gc.enable()
            command(*args, **kwargs)
        except LuncherError as exc:
            message = in_options(exc, kwargs.get("ctx"))
            if json_mode[0]:
                json_line({"error": message})
            err.print(f"[red]error:[/red] {escape(message)}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            word = "interrupted" if stopped_by[0] == signal.SIGINT else "terminated"
            if isinstance(exc, CommittedInterrupt):
                word += " after the change was saved"
            elif command.__name__ not in READ_ONLY:
                word += ": the models directory was not changed"
            if json_mode[0]:
                json_line({"error": word})
            err.print(f"[yellow]{word}[/yellow]")
            raise typer.Exit(128 + stopped_by[0]) from None
        except BrokenPipeError:
            # The reader went away (`luncher predict --json photos/ | head`): stop quietly,
            # and keep Python from complaining while it flushes stdout on exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except Exception as exc:
            if debug_requested[0] or debug_wanted(os.environ.get("LUNCHER_DEBUG")):
                raise
            message = f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            if json_mode[0]:
                json_line({"error": message})
            err.print(f"[red]error:[/red] {escape(message)}")
            raise typer.Exit(1) from None

    return wrapper


def in_options(exc: LuncherError, ctx: Any) -> str:
    """The error in the command line's words: each API parameter it names is the option
    of that name (the command's, else a global one), as typed: `--trainable-layers 2`,
    `--int8`, `--examples DIR`."""
    options: dict[str, Any] = {}
    while ctx is not None:  # the command's own options first, then its group's
        for option in getattr(ctx.command, "params", ()):
            if option.param_type_name == "option":
                options.setdefault(option.name, option)
        ctx = ctx.parent

    def spell(param: Param) -> str:
        option = options.get(param.name)
        if option is None:
            flag = "--" + param.name.replace("_", "-")
        elif param.value is False and option.secondary_opts:  # --drop-personalization
            flag = max(option.secondary_opts, key=len)
        else:
            flag = max(option.opts, key=len)
        if isinstance(param.value, bool):
            return flag
        if param.value is not None:
            return f"{flag} {param.value}"
        return f"{flag} {param.example}" if param.example else flag

    return exc.render(spell, command_line)


def command_line(command: str) -> str:
    """A `luncher ...` command to suggest, as the user must type it to act on this models
    directory: with `--models-dir DIR` when it was given so (the bare command opens the
    default one). A directory from $LUNCHER_MODELS_DIR keeps the bare command, which the
    variable still applies to."""
    given = models_dir_option[0]
    if given is None:
        return command
    from healthyluncher.api import open as open_models  # as the command opened it

    named = shlex.quote(str(open_models(given).models_dir))
    return command.replace("luncher ", f"luncher --models-dir {named} ", 1)


def suggest(command: Command) -> str:
    """`command` in backticks, as the user must type it (`command_line`), in rich markup."""
    return escape(f"`{command_line(command.cli)}`")


@contextmanager
def spinner(message: str, show: bool = True) -> Iterator[None]:
    if show and err.is_terminal and not quiet[0]:
        with err.status(message):
            yield
    else:
        yield


@contextmanager
def progress_bars() -> Iterator[Any]:
    """A progress callback drawing rich bars on stderr (silent when not a terminal)."""
    if quiet[0] or not sys.stderr.isatty() or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        console=err.real(),
        transient=True,
        disable=not err.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def report(event: Progress) -> None:
        if event.stage not in tasks:
            tasks[event.stage] = bars.add_task(event.stage, total=event.total, loss="")
        loss = "" if event.loss is None else f"loss {event.loss:.3f}"
        bars.update(tasks[event.stage], completed=event.done, total=event.total, loss=loss)

    with bars:
        yield report


def json_line(result: object) -> None:
    """A result as one JSON object on a line (`healthyluncher.to_json`'s); non-ASCII stays
    readable."""
    text = json.dumps(to_json(result), ensure_ascii=False, allow_nan=False)
    # A file name that is not UTF-8 holds lone surrogates (\udce9 for the byte 0xe9): as
    # escapes, the line stays UTF-8 and Python's json.loads and os.fsencode give the bytes.
    sys.stdout.write(SURROGATE.sub(lambda c: f"\\u{ord(c[0]):04x}", text) + "\n")
    sys.stdout.flush()


SURROGATE = re.compile(r"[\ud800-\udfff]")


@contextmanager
def counting(total: int) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr for more than a few photos at a terminal; the block calls
    the function it gets once per photo."""
    if total <= 8 or quiet[0] or not err.is_terminal:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
    from rich.progress import Progress as Bars

    with Bars(
        TextColumn("photos"), BarColumn(), MofNCompleteColumn(), console=err.real(), transient=True
    ) as bars:
        task = bars.add_task("photos", total=total)
        yield lambda: bars.advance(task)


class RowPrinter:
    """Prediction rows printed one by one as they come (so Ctrl-C keeps them), in columns
    sized from the photos' names up front."""

    def __init__(self, title: str, labels: Sequence[str] | None, paths: Sequence[object]) -> None:
        self.title = title
        self.labels = list(labels) if labels is not None else None
        self.width = min(60, max([5, *(cells(printable(str(p))) for p in paths)]))
        self.started = False

    def print(self, row: Prediction, name: str | None = None) -> None:
        labels = self.labels or list(row.probabilities)
        if not self.started:
            self.started = True
            note(self.title)
            label_width = max(5, *(cells(x) for x in labels))
            self.label_width = label_width
            header = [pad("photo", self.width), pad("label", label_width), "probability"]
            header += [pad(x, max(6, cells(x)), right=True) for x in labels]
            sys.stdout.write("  ".join(header).rstrip() + "\n")
        texts = [
            pad(printable(str(row.path) if name is None else name), self.width),
            pad(row.label, self.label_width),
            f"{row.probability:.1%}".rjust(11),
        ]
        texts += [
            pad(f"{row.probabilities.get(x, 0.0):.1%}", max(6, cells(x)), right=True)
            for x in labels
        ]
        if sys.stdout.isatty():  # the label in bold, the other classes dim
            texts = [escape(c) for c in texts]
            texts[1] = f"[bold]{texts[1]}[/bold]"
            texts[3:] = [f"[dim]{c}[/dim]" for c in texts[3:]]
            out.print("  ".join(texts).rstrip())
            return
        sys.stdout.write("  ".join(texts).rstrip() + "\n")
        sys.stdout.flush()


def note(text: str) -> None:
    """An informational line on stdout (rich markup), left out by --quiet; piped, plain."""
    if not quiet[0]:
        out.print(text)


# rich's markup tags ([bold], [/bold], [red]...), dropped when the output is not a terminal.
MARKUP = re.compile(r"(?<!\\)\[/?[a-z][a-z ]*\]")


def training_settings(hp: dict[str, Any]) -> str:
    """Hyperparameters as `status` shows them: epochs, learning rate, optimizer, views."""
    return (
        f"{hp['epochs']} epochs, lr {hp['learning_rate']}, {hp['optimizer']}, {views_setting(hp)}"
    )


def views_setting(hp: dict[str, Any]) -> str:
    views = hp["augment_views"]
    if views == 1:
        return "1 view per photo"
    if hp.get("view_budget", 0) > 0:
        return f"up to {views} views per photo, {hp['view_budget']} per retrain"
    return f"{views} views per photo"


def duplicates(found: Sequence[Any], shown: int = 3) -> str:
    """A retrain's duplicates, escaped, on one line: '2 duplicate photo(s): b.jpg (the
    same photo as a.jpg), c.jpg (already taught as 'healthy')'; past `shown`, a count."""
    named = ", ".join(f"{item.path} ({item.reason})" for item in found[:shown])
    more = f", and {len(found) - shown} more (--json lists them)" if len(found) > shown else ""
    return escape(f"{len(found)} duplicate photo(s): {named}{more}")
