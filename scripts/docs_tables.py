"""Rewrite the generated tables of the docs and the README from the code, or check that they are current.

A generated table sits between two marker lines in a Markdown file::

    <!-- BEGIN GENERATED: bench-options -->
    ...
    <!-- END GENERATED -->

and this script replaces what lies between them with the table named after ``BEGIN GENERATED:``:

- ``NAME-options`` for every command of ``harness`` (``bench``, ``eval``, ``report``, ``compare``,
  ``leaderboard``, ``plugins``, ``train``, ``data-shapes``, and ``harness`` itself for the group's own
  options): one row per option, read from the click command that ``harness NAME --help`` prints, plugin
  options included;
- ``train-shared-options``: the options every trainer has (``harness.training.TrainConfig``), and
  ``train-TRAINER-options`` those that ``harness train --plugin TRAINER --help`` adds or changes;
- ``exit-codes``: the members of ``harness.errors.ExitCode`` with their ``#:`` comments.

Only harness's own plugins are documented: the entry points of other installed distributions and the folders in
``HARNESS_PLUGINS`` are ignored, so the tables are the same on every machine.

    python scripts/docs_tables.py            # rewrite README.md and docs/**/*.md in place
    python scripts/docs_tables.py --check    # exit 1 and name each stale file; change nothing
"""

from __future__ import annotations

import argparse
import html
import importlib.metadata
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from unittest import mock

import click

ROOT = Path(__file__).resolve().parent.parent
REGION = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)
FLAG = re.compile(r"(?<![\w`-])(--?[a-zA-Z][\w-]*(?:/--?[a-zA-Z][\w-]*)?)")


def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# ----- the code's side -----

def load_cli() -> click.Group:
    """The ``harness`` group with harness's own plugins only (see the module docstring)."""
    os.environ.pop("HARNESS_PLUGINS", None)
    from harness.cli.app import cli
    from harness.hooks.registry import get_registry

    real = importlib.metadata.entry_points

    def no_harness_entry_points(**selection):  # the registry asks for group="harness"; other groups pass
        return [] if selection.get("group") == "harness" else real(**selection)

    with mock.patch.object(importlib.metadata, "entry_points", no_harness_entry_points):
        get_registry(())  # built now, once, and reused by every command below
    return cli


def command_at(cli: click.Group, path: Sequence[str]) -> tuple[click.Command, click.Context]:
    """The command ``harness PATH...`` and a context for it (click needs one to describe defaults)."""
    ctx = click.Context(cli, info_name="harness")
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group), f"harness {' '.join(path)}: {command.name} has no subcommands"
        found = command.get_command(ctx, name)
        if found is None:
            raise SystemExit(f"docs_tables: no command 'harness {' '.join(path)}'")
        command, ctx = found, click.Context(found, info_name=name, parent=ctx)
    return command, ctx


def trainer_options(trainer: str | None) -> tuple[list[click.Option], click.Context]:
    """The options of ``harness train --plugin TRAINER`` (``None``: the shared TrainConfig ones)."""
    from harness import TrainConfig
    from harness.hooks.registry import get_registry
    from harness.options import click_options

    config = TrainConfig if trainer is None else get_registry(()).trainer(trainer).cls.config_class
    command = click.Command(trainer or "train", params=click_options(config))
    return [p for p in command.params if isinstance(p, click.Option)], click.Context(command, info_name="train")


# ----- Markdown -----

def text(value: str) -> str:
    """Help text as one Markdown table cell: flags as code, no stray HTML, emphasis or column breaks."""
    value = " ".join(value.split()).replace("``", "`")  # reStructuredText's literals are Markdown's code
    parts = re.split(r"(`[^`]*`)", value)  # leave what the help text already quotes alone
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)
            continue
        part = html.escape(part, quote=False).replace("*", r"\*").replace("|", r"\|")
        out.append(FLAG.sub(r"`\1`", part))
    return "".join(out)


def code(value: str) -> str:
    """Inline code in a table cell. A ``|`` would end the cell on GitHub, and an escaped one shows its backslash
    in mkdocs' code spans, so such a value is an HTML code element with the bar as an entity."""
    if "|" in value:
        return "<code>" + html.escape(value, quote=False).replace("|", "&#124;") + "</code>"
    return "`" + value + "`"


def metavar(param: click.Parameter, ctx: click.Context) -> str:
    try:
        return param.make_metavar(ctx)
    except TypeError:  # click before 8.2 takes no context
        return param.make_metavar()  # type: ignore[call-arg]


def option_row(param: click.Parameter, ctx: click.Context) -> list[str]:
    if isinstance(param, click.Argument):
        kind = "argument" + (", several" if param.nargs == -1 else "") + ("" if param.required else ", optional")
        return [code(metavar(param, ctx)), "", f"({kind})"]
    assert isinstance(param, click.Option)
    flags = ", ".join(code(flag) for flag in param.opts)
    if param.secondary_opts:
        flags += " / " + ", ".join(code(flag) for flag in param.secondary_opts)
    if not param.is_flag and param.nargs != 0:
        flags += " " + code(metavar(param, ctx))
    extra = param.get_help_extra(ctx) if hasattr(param, "get_help_extra") else {}
    default = extra.get("default", "")
    meaning = param.help or ""
    if extra.get("range"):
        meaning += f" Range: `{extra['range']}`."
    if extra.get("required"):
        meaning += " Required."
    return [flags, code(default) if default else "", text(meaning)]


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def options_table(params: Iterable[click.Parameter], ctx: click.Context) -> str:
    rows = [option_row(p, ctx) for p in params if not getattr(p, "hidden", False)]
    rows = [row for row in rows if row[0] != "`--help`"]
    return table(["Option", "Default", "Meaning"], rows)


def command_table(cli: click.Group, path: Sequence[str]) -> str:
    command, ctx = command_at(cli, path)
    return options_table(command.params, ctx)


def trainer_table(name: str | None) -> str:
    params, ctx = trainer_options(name)
    if name is None:
        return options_table(params, ctx)
    shared_params, shared_ctx = trainer_options(None)
    shared = {p.name: option_row(p, shared_ctx) for p in shared_params}
    own = [p for p in params if shared.get(p.name) != option_row(p, ctx)]
    return options_table(own, ctx) if own else "This trainer has only the shared options.\n"


def exit_code_table() -> str:
    """ExitCode's members, each with the ``#:`` comment lines above it in harness/errors.py."""
    from harness import ExitCode

    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(ExitCode).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"([A-Z_][A-Z0-9_]*)\s*=", stripped)
        if match:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    rows = [[code(str(member.value)), code(f"ExitCode.{member.name}"), text(comments.get(member.name, ""))]
            for member in ExitCode]
    return table(["Exit code", "Name", "Meaning"], rows)


def generators(cli: click.Group) -> dict[str, Callable[[], str]]:
    from harness.hooks.registry import get_registry

    found: dict[str, Callable[[], str]] = {"harness-options": lambda: command_table(cli, []),
                                           "exit-codes": exit_code_table,
                                           "train-shared-options": lambda: trainer_table(None)}
    ctx = click.Context(cli, info_name="harness")
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        if isinstance(command, click.Group):
            for sub in command.list_commands(click.Context(command, info_name=name, parent=ctx)):
                found[f"{name}-{sub}-options"] = lambda path=(name, sub): command_table(cli, path)
        else:
            found[f"{name}-options"] = lambda path=(name,): command_table(cli, path)
    for trainer in get_registry(()).trainers:
        found[f"train-{trainer}-options"] = lambda trainer=trainer: trainer_table(trainer)
    return found


# ----- the files -----

class UnknownTable(Exception):
    pass


def rewrite(source: str, tables: dict[str, Callable[[], str]], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in tables:
            raise UnknownTable(f"{where}: no generated table is called '{name}'; known: {', '.join(sorted(tables))}")
        return match.group(1) + tables[name]() + match.group(4)

    return REGION.sub(replace, source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 if a file is not current.")
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md, docs/**/*.md).")
    args = parser.parse_args(argv)
    tables = generators(load_cli())
    stale = []
    for path in args.files or default_files():
        where = os.path.relpath(path, Path.cwd())
        before = path.read_text(encoding="utf-8")
        try:
            after = rewrite(before, tables, where)
        except UnknownTable as error:
            print(f"docs_tables: {error}", file=sys.stderr)
            return 2
        if after == before:
            continue
        if args.check:
            stale.append(where)
        else:
            path.write_text(after, encoding="utf-8")
            print(f"rewrote {where}")
    for where in stale:
        print(f"{where}: a generated table differs from the code; run python scripts/docs_tables.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
