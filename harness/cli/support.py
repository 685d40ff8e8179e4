"""What every harness command shares: multi-value options and the one conversion of core errors to click's.

Kept apart from ``harness.cli.app`` so that command modules (``harness.cli.train``, plugins' commands) use it
without importing the top-level group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from harness.errors import HarnessError
from harness.records.text import terminal_text

_NUMBER = re.compile(r"-?\d+(\.\d+)?")


class MultiValueCommand(click.Command):
    """Lets ``--steps 2 4 8`` mean ``--steps 2 --steps 4 --steps 8`` for options marked multi-value.

    Click has no options with a variable number of values, so the arguments are rewritten before
    click parses them; a repeated flag keeps working too.
    """

    def __init__(self, *args: Any, multi_value: Iterable[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.multi_value = set(multi_value)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value(args, self.multi_value))


def expand_multi_value(args: list[str], flags: set[str]) -> list[str]:
    expanded: list[str] = []
    flag, has_value = None, False
    for index, arg in enumerate(args):
        if arg == "--":
            return expanded + args[index:]
        if flag and (not arg.startswith("-") or _NUMBER.fullmatch(arg)):
            if has_value:
                expanded.append(flag)
            expanded.append(arg)
            has_value = True
            continue
        flag, has_value = None, False
        name, _, value = arg.partition("=")
        if name in flags:
            flag, has_value = name, bool(value)
        expanded.append(arg)
    return expanded


class CommandError(click.ClickException):
    """A HarnessError as click shows it: ``Error: <message>`` and the error's exit code."""

    def __init__(self, error: HarnessError):
        super().__init__(terminal_text(error.message))  # it may quote a prompt, a file name, a record
        # click declares exit_code on the class; a HarnessError's code differs per error type.
        self.exit_code = int(error.exit_code)  # type: ignore[misc]


def say(text: str, err: bool = True) -> None:
    """Print one line harness composed around text from outside (a prompt, a label, a record's field, a plugin's
    message): control characters are shown escaped, so it cannot drive the terminal or forge a line."""
    click.echo(terminal_text(text), err=err)


def warn(text: str) -> None:
    say(f"Warning: {text}")


@contextmanager
def click_errors() -> Iterator[None]:
    """The one place where the core's plain errors become click's one-line errors."""
    try:
        yield
    except HarnessError as error:
        raise CommandError(error) from None
