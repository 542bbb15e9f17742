"""The project's own exception: an error the user can fix, with a message written for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeAlias


class Param(NamedTuple):
    """A parameter of the public API that an error message names, as the caller wrote it or
    should: `trainable_layers=2` to a Python caller. The command line names its option
    instead (`--trainable-layers 2`): it spells the message with `LuncherError.render`."""

    name: str  # the API's parameter: "trainable_layers"
    value: object = None  # the value given or to give, or None: the parameter alone
    example: str = ""  # what a value looks like ("DIR"), when the message asks for one

    def __str__(self) -> str:
        if self.value is not None:
            return f"{self.name}={self.value!r}"
        return f"{self.name}=..." if self.example else self.name


class Command(NamedTuple):
    """Something to run that an error message suggests: the command line's (`luncher
    undo`) and the Python API's (`Luncher.undo()`). `str` gives the API's: a Python caller
    reads the message; the command line spells it with `LuncherError.render`."""

    cli: str  # "luncher reset --purge"
    api: str  # "Luncher.reset(purge=True)"

    def __str__(self) -> str:
        return f"`{self.api}`"


# The commands messages suggest, in both interfaces' words.
UNDO = Command("luncher undo", "Luncher.undo()")
REPAIR = Command("luncher repair", "Luncher.repair()")
RESET_PURGE = Command("luncher reset --purge", "Luncher.reset(purge=True)")
PREDICT_BASE = Command("luncher predict --base", "Luncher.predict(photos, base=True)")
RETRAIN = Command("luncher retrain", "Luncher.retrain()")
FORGET = Command("luncher forget", "Luncher.forget()")
MAKE_UPDATABLE = Command(
    "luncher make-updatable MODEL.onnx", "healthyluncher.make_updatable(model)"
)
MAKE_UPDATABLE_KEEPING = Command(
    "luncher make-updatable MODEL.onnx --keep-personalization",
    "healthyluncher.make_updatable(model, keep_personalization=True)",
)
# A base of your own labels in place of the current one (whatever it is: `force`), which
# stays an undo away with its personalization.
MAKE_UPDATABLE_EXAMPLES = Command(
    "luncher make-updatable MODEL.onnx --examples DIR --force",
    "healthyluncher.make_updatable(model, examples=..., force=True)",
)

# A message in parts: text, and the API parameters and commands it names.
Part: TypeAlias = str | Param | Command
Message: TypeAlias = tuple[Part, ...]

# What ends a line (str.splitlines), shown as its escape: a message stays one line whatever
# it quotes (a file name read with its newline, `f.readlines()`).
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class LuncherError(Exception):
    """A problem the user can act on. The CLI prints it as one line and exits 1.

    The message is text, the API parameters it names (`Param`) and the commands it
    suggests (`Command`): `str(error)` names them as Python callers write them, `render` as
    another interface names them."""

    def __init__(self, *parts: Part) -> None:
        parts = tuple(p.translate(_LINE_BREAKS) if isinstance(p, str) else p for p in parts)
        self.parts = parts
        super().__init__("".join(map(str, parts)))

    def __reduce__(self) -> tuple[object, ...]:
        # Made again from its parts (pickled by multiprocessing, say), not from the text.
        return type(self), self.parts, self.__dict__

    def render(self, spell: Callable[[Param], str], typed: Callable[[str], str] = str) -> str:
        """The message with each parameter it names spelled by `spell`, and each command
        it suggests as the command line's, as `typed` says it is typed (with the options
        that name the models directory, say)."""
        return "".join(
            part
            if isinstance(part, str)
            else f"`{typed(part.cli)}`"
            if isinstance(part, Command)
            else spell(part)
            for part in self.parts
        )


class CommittedInterrupt(KeyboardInterrupt):
    """Ctrl-C after a change was saved (state.json switched), while it cleaned up."""


class StorageError(LuncherError):
    """The models directory cannot be written (a full disk, no permission): no photo is to
    blame, so the whole command stops rather than skipping photos one by one."""


class DamagedError(LuncherError):
    """A file of the models directory that cannot be parsed (not one that cannot be read)."""


class DamagedViewsError(DamagedError):
    """The saved head inputs of the user's photos cannot be read; the undo steps share
    them, so `repair` embeds the photos again from their thumbnails."""


class UnknownLabelError(LuncherError):
    """A retrain names a label the model does not have (a typo, most often)."""

    def __init__(
        self, label: str, known: tuple[str, ...], how: str = "pass new_label=True"
    ) -> None:
        self.label, self.known, self.how = label, known, how
        super().__init__(self.message(how))

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.label, self.known, self.how), self.__dict__

    def message(self, how: str) -> str:
        """The one-line refusal, with `how` a new label is asked for (API or CLI)."""
        import difflib

        lowered = {k.lower(): k for k in self.known}
        close = difflib.get_close_matches(self.label.lower(), list(lowered), n=1, cutoff=0.6)
        hint = f"; did you mean {lowered[close[0]]!r}?" if close else "."
        return (
            f"{self.label!r} is not a label of this model ({', '.join(self.known)}){hint} "
            f"To add it as a new label, {how}"
        )


DEBUG_OFF = frozenset({"", "0", "false", "no", "off"})


def debug_wanted(value: str | None) -> bool:
    """Whether `LUNCHER_DEBUG` set to `value` asks for debug output (tracebacks, a child
    Python's own lines): unset, empty, `0`, `false`, `no` and `off` (any case, spaces
    around ignored) mean no; any other value means yes (`1`, `true`, `yes`, `on`, `2`)."""
    return value is not None and value.strip().lower() not in DEBUG_OFF
