"""The project's own exception: an error the user can fix, with a message written for them."""


class LuncherError(Exception):
    """A problem the user can act on. The CLI prints it as one line and exits 1."""
