"""GitHub markdown tables whose cells cannot break out: every text cell escaped (``harness.records.text``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tabulate import tabulate

from harness.records.text import markdown_cell


def markdown_table(rows: Iterable[Sequence[Any]], headers: Sequence[Any], **options: Any) -> str:
    """``rows`` under ``headers`` as a GitHub markdown table (tabulate's); a text cell with ``|``, a line end or a
    control character stays in its cell, shown escaped. Numbers are left to tabulate to align."""
    cells = [[markdown_cell(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    return tabulate(cells, headers=[markdown_cell(header) for header in headers], tablefmt="github", **options)
