"""The errors users see, and the exit codes of every command.

The core raises plain exceptions; the CLI (``harness.cli.app``) turns a :class:`HarnessError` into one line,
``Error: <message>``, and its exit code, in one place.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a ``harness`` command's exit status means (the docs' errors page lists them)."""

    #: Everything asked was done.
    OK = 0
    #: The command ran, but a measurement or a check failed (a sampler's error, ``compare --fail-above``).
    FAILED = 1
    #: A problem the user can fix: a bad option, a missing file, a model that cannot load.
    USAGE = 2
    #: A crash inside harness or a plugin (a bug, not your input): the traceback is printed above one line.
    INTERNAL_ERROR = 3
    #: Ctrl-C or SIGTERM; finished results are kept.
    INTERRUPTED = 130


class HarnessError(Exception):
    """A problem the user can fix, told in one line that names the problem and the fix."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RecordError(HarnessError):
    """A line of a results or state file that is not what harness wrote; readers add where it is."""


def one_line(error: BaseException) -> str:
    """The error in one line: a HarnessError's own text, anything else as ``Type: first line``.

    A first line that ends in a colon only announces what follows (torch's "Error(s) in loading state_dict
    for UNet2DConditionModel:"), so the line after it, the one naming the problem, joins it, with a count of
    any further lines.
    """
    if isinstance(error, HarnessError):
        text = str(error.message)
    else:
        text = f"{type(error).__name__}: {str(error).strip()}".rstrip(": ")
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    if not lines[0].endswith(":") or len(lines) == 1:
        return lines[0]
    further = len(lines) - 2
    return f"{lines[0]} {lines[1]}" + (f" (and {further} more)" if further else "")
