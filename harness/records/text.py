"""Text from outside harness (prompts, labels, folder names, what records and plugins say) made safe for where it lands.

- :func:`terminal_text`: control characters (ESC and the rest of C0 and C1, DEL) and the invisible characters that
  reorder or break lines (bidirectional overrides, U+2028) shown as escapes such as ``\\x1b``, so a prompt file or a
  record cannot set the window title, clear the screen or forge a line of harness's output;
- :func:`markdown_cell`: that, and ``|`` escaped, so a value stays in its cell of a GitHub markdown table;
- :func:`markdown_code`: an inline code span whatever backticks the value holds;
- :func:`name_problem`: why a name a plugin registers (a sampler, metric, trainer or command) cannot be one: names
  become file and folder names and command-line words.
"""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, and the format and separator characters that move or hide text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_NAME = 100


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def terminal_text(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every control or invisible layout character shown as an escape (``\\x1b``, ``\\n``).

    ``keep_newlines`` keeps line ends of a block harness laid out itself (a table); a one-line message (a warning,
    an error) escapes them too, so nothing it quotes can start a line of its own.
    """
    text = str(text)
    if keep_newlines:
        return "\n".join(_UNSAFE.sub(_escape, line) for line in text.split("\n"))
    return _UNSAFE.sub(_escape, text)


def markdown_cell(text: object) -> str:
    """``text`` as one cell of a GitHub markdown table: one line, and every ``|`` escaped."""
    return terminal_text(text).replace("|", "\\|")


def markdown_code(text: object) -> str:
    """``text`` as an inline code span, on one line, fenced by more backticks than any run of them inside."""
    body = terminal_text(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    padded = f" {body} " if body.startswith("`") or body.endswith("`") else body
    return f"{fence}{padded}{fence}"


def name_problem(name: object, what: str) -> str | None:
    """Why ``name`` cannot name a ``what`` (it becomes a file or folder name and a command-line word); None if fine."""
    if not isinstance(name, str) or not name:
        return f"{what} name {name!r} is not a non-empty text"
    shown = repr(name[:MAX_NAME])
    if len(name) > MAX_NAME:
        return f"{what} name {shown}... is longer than {MAX_NAME} characters"
    if not name.isprintable() or any(char.isspace() for char in name):
        return f"{what} name {shown} holds a space, a control or an invisible character"
    if "/" in name or "\\" in name:
        return f"{what} name {shown} holds a path separator ('/' or '\\')"
    if ".." in name or name.startswith((".", "-")):
        return f"{what} name {shown} holds '..' or starts with '.' or '-'"
    return None
