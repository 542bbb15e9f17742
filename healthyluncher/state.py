"""What is current in a models directory: the base, the personalized copy, the undo steps."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

STATE_FORMAT = 1
# What state.json may name: the directories this module makes.
DIRECTORY = re.compile(r"(base|personal)-[0-9a-f]{12}")
# How many earlier personalized states `undo` can go back to.
HISTORY_LIMIT = 3


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


@dataclass(frozen=True)
class Step:
    """One state `undo` can go back to: a base and its personalization (None: none)."""

    base: str | None
    personal: str | None
