"""The project's own exception: an error the user can fix, with a message written for them."""


class LuncherError(Exception):
    """A problem the user can act on. The CLI prints it as one line and exits 1."""


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
        self.label, self.known = label, known
        super().__init__(self.message(how))

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
