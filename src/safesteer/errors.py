"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SafesteerError(Exception):
    """A problem the user can fix (bad input, missing file, no network); never a bug."""
