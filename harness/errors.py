"""The one exception type users see: a single line that names the problem and the fix."""

import click


class HarnessError(click.ClickException):
    """A problem the user can fix. The CLI prints ``Error: <message>`` and exits with code 2."""

    exit_code = 2
