"""The one exception type users see: a single line that names the problem and the fix."""

import click


class HarnessError(click.ClickException):
    """A problem the user can fix. The CLI prints ``Error: <message>`` and exits with code 2."""

    exit_code = 2


def one_line(error: BaseException) -> str:
    """The error in one line: a HarnessError's own text, anything else as ``Type: first line``."""
    if isinstance(error, HarnessError):
        text = str(error.message)
    else:
        text = f"{type(error).__name__}: {str(error).strip()}".rstrip(": ")
    return (text.strip().splitlines() or [type(error).__name__])[0]
