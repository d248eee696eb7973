"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SafesteerError(Exception):
    """A problem the user can fix (bad input, missing file, no network); never a bug."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message, to quote inside a one-line SafesteerError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
