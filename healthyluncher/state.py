"""What is current in a models directory: the base, the personalized copy, the undo steps."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthyluncher.errors import DamagedError, LuncherError, Message
from healthyluncher.fileio import read_json, write_json

STATE_FORMAT = 1
# What state.json may name: the directories this module makes.
DIRECTORY = re.compile(r"(base|personal)-[0-9a-f]{12}")
# How many earlier personalized states `undo` can go back to.
HISTORY_LIMIT = 3
# meta.json's key for the order the directories were made in: 1, 2, 3, ... (one above
# every directory's of the models directory), which file times cannot give (1-2 s on FAT,
# HFS+ and some network shares; a clock set back). Absent in older luncher's directories.
SEQUENCE = "sequence"


@dataclass
class State:
    base: str | None = None
    personal: str | None = None
    # Earlier states, newest first: what `undo` goes back to.
    history: list[Step] = field(default_factory=list)

    def step(self) -> Step:
        return Step(self.base, self.personal)

    def with_personal(self, name: str | None, *, keep_history: bool = True) -> State:
        """This state with another personal directory current; the one it replaces becomes
        the newest undo step (none with `keep_history=False`)."""
        history = [self.step(), *self.history][:HISTORY_LIMIT] if keep_history else []
        return State(base=self.base, personal=name, history=history)

    def with_base(self, base: str, personal: str | None) -> State:
        """Another base (and its personalization) current; this state is an undo step."""
        history = [self.step(), *self.history][:HISTORY_LIMIT] if self.base else []
        return State(base=base, personal=personal, history=history)

    def names(self) -> set[str]:
        """Every directory this state and its undo steps name."""
        named = {self.base, self.personal}
        for step in self.history:
            named |= {step.base, step.personal}
        return {name for name in named if name}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "base": self.base,
            "personal": self.personal,
            "history": [{"base": s.base, "personal": s.personal} for s in self.history],
        }

    @classmethod
    def from_json(cls, data: Any, path: Path, repair: Message) -> State:
        """state.json's contents, every name checked; DamagedError (which says `repair`)
        when they are not a state."""
        if not isinstance(data, dict):
            raise DamagedError(f"{path} is damaged (not a JSON object); ", *repair)
        version = data.get("format")
        if type(version) is int and version > STATE_FORMAT:
            raise LuncherError(f"{path} has an unknown format; was it written by a newer luncher?")
        if version != STATE_FORMAT:  # no format at all, or a string: damaged, not newer
            raise DamagedError(f"{path} is damaged (its format is {version!r:.20}); ", *repair)

        def named(name: object) -> str | None:
            """A directory name, or None (null, or "" as an old state.json wrote it)."""
            if name is None or name == "":
                return None
            if not isinstance(name, str) or not DIRECTORY.fullmatch(name):
                raise DamagedError(f"{path} is damaged (it names {name!r:.60}); ", *repair)
            return name

        base, personal = named(data.get("base")), named(data.get("personal"))
        entries = data.get("history") or []
        if not isinstance(entries, list):
            raise DamagedError(f"{path} is damaged (its history is not a list); ", *repair)
        history: list[Step] = []
        for entry in entries:
            if isinstance(entry, str):  # written before base switches could be undone
                history.append(Step(base, named(entry)))
            elif isinstance(entry, dict):
                history.append(Step(named(entry.get("base")), named(entry.get("personal"))))
        return cls(base=base, personal=personal, history=history)


@dataclass(frozen=True)
class Step:
    """One state `undo` can go back to: a base and its personalization (None: none)."""

    base: str | None
    personal: str | None


def sequence_of(data: dict[str, Any]) -> int | None:
    """A meta.json's SEQUENCE, checked (None where it has none: made by an older luncher)."""
    value = data.get(SEQUENCE)
    if value is not None and (type(value) is not int or not 0 < value < 2**53):
        raise LuncherError(
            f"meta.json: {SEQUENCE} must be a whole number from 1, not {value!r:.20}"
        )
    return value


def numbered(staged: Path, root: Path, meta_file: str) -> Path:
    """`staged` (about to be published in `root`) with its meta.json numbered one above
    every directory's of `root` (SEQUENCE); a directory without a meta.json is left as is.
    Called under the models directory's lock, so no two directories share a number."""
    try:
        data = read_json(staged / meta_file)
    except FileNotFoundError:
        return staged
    highest = 0
    for other in root.iterdir():
        if DIRECTORY.fullmatch(other.name):
            try:
                theirs = read_json(other / meta_file)
                if isinstance(theirs, dict):
                    highest = max(highest, sequence_of(theirs) or 0)
            except (OSError, LuncherError):  # incomplete or damaged: never current again
                continue
    write_json(staged / meta_file, {**data, SEQUENCE: highest + 1}, durable=False)
    return staged


def _order(data: dict[str, Any], meta_path: Path) -> tuple[int, int, int]:
    """How new a directory is, for `recover`: by its SEQUENCE, then (where it has none,
    or a damaged one: an older luncher's) by its meta.json's time, which an undo step's
    directory does not change (its weights file becomes a link: weightsfile.share)."""
    try:
        number = sequence_of(data)
    except LuncherError:
        number = None
    if number is not None:
        return (1, number, 0)
    return (0, 0, meta_path.stat().st_mtime_ns)


def recover(root: Path, meta_file: str, model_file: str) -> State:
    """The newest complete state the directories of `root` hold, for a damaged state.json:
    the newest base, the newest personalized copy made from it, and the other copies (of
    any base) as undo steps, newest first (so nothing of the user's is lost). A directory is
    complete when its `meta_file` parses and its `model_file` exists."""

    def meta(path: Path) -> dict[str, object] | None:
        try:
            data = read_json(path / meta_file)
        except (OSError, LuncherError):
            return None
        complete = (path / model_file).is_file()
        return data if isinstance(data, dict) and complete else None

    def newest_first(prefix: str) -> list[tuple[Path, dict[str, object]]]:
        found = []
        for path in root.glob(f"{prefix}-*"):
            if DIRECTORY.fullmatch(path.name) and path.is_dir():
                data = meta(path)
                if data is not None:
                    found.append((_order(data, path / meta_file), path, data))
        return [(p, m) for _, p, m in sorted(found, key=lambda item: item[0], reverse=True)]

    bases = newest_first("base")
    if not bases:
        return State()
    base = bases[0][0]
    # Each copy with the base it was made from: the newest base of its sha256. A copy of
    # an older base is an undo step (a new base, or one an upgrade killed before its
    # switch left unnamed, must not cost the personalization of the one before).
    # A sha256 that is no text (a mangled meta.json) names no base.
    made_from: dict[str, str] = {}
    for path, data in bases:
        if isinstance(sha := data.get("sha256"), str):
            made_from.setdefault(sha, path.name)
    steps = [
        Step(made_from[sha], p.name)
        for p, m in newest_first("personal")
        if isinstance(sha := m.get("base_sha256"), str) and sha in made_from
    ]
    current = next((step for step in steps if step.base == base.name), Step(base.name, None))
    history = [step for step in steps if step != current][:HISTORY_LIMIT]
    return State(base=base.name, personal=current.personal, history=history)
