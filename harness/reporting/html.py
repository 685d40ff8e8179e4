"""One self-contained HTML page per run (``index.html``) and one per comparison of two runs.

The pages reach no network: no CDN, no external CSS, scripts or fonts. A Content-Security-Policy meta tag
holds the browser to that too: only the page's own inline style and script, and images from files or
``data:`` URIs, may load.

Images are referenced in two ways, each chosen for where its page lives:

- the run page (``harness report DIR --html``, ``harness bench --html``) sits in its run folder, so it names
  the grids and plots by their paths relative to that folder and stays small, however large the grids are;
- the compare page (``harness compare A B --html OUT.html``) may be written anywhere and moved or mailed,
  so it embeds every image as a ``data:`` URI and stands alone.

Every image a record names must lie inside its run folder: an absolute name, one with ``..`` or one that
leads out through a link is refused like a file that does not exist. The page then shows ``missing: NAME``
in the image's place, and the writer returns one warning per such file; the rest of the page is still
written. Everything taken from records (prompts, sampler names, errors) is HTML-escaped.

A small inline script writes, once the page has loaded, how many images loaded and how many are broken
(``data-images-loaded``, ``data-images-broken``) and any script error (``data-js-errors``) onto ``<body>``,
so a headless browser's DOM dump tells whether the page shows everything.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from harness.errors import HarnessError
from harness.records.files import write_text_atomic
from harness.records.schema import Record, successful
from harness.records.store import RECORDS_FILE
from harness.reporting import report

HTML_FILE = "index.html"

CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
# Every page harness writes carries this tag near its top; it tells a page that may be replaced from any other file.
PAGE_MARK = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'.encode()
PAGE_HEAD_BYTES = 1024

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fff; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; } h3 { font-size: 1rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.failed, .note { color: #a00; }
.gallery { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.8rem; color: #555; overflow-wrap: anywhere; }
.missing { border: 2px dashed #a00; color: #a00; padding: 2rem 1rem; font-family: monospace; }
.runs { display: grid; grid-template-columns: repeat(auto-fit, minmax(28rem, 1fr)); gap: 2rem; }
""".strip()

LOAD_CHECK = """<script>
window.onerror = function (message) {
  document.body.dataset.jsErrors = (document.body.dataset.jsErrors || "") + message + "\\n";
};
window.addEventListener("load", function () {
  var loaded = 0;
  for (var i = 0; i < document.images.length; i++) {
    if (document.images[i].complete && document.images[i].naturalWidth > 0) loaded++;
  }
  document.body.dataset.imagesLoaded = loaded;
  document.body.dataset.imagesBroken = document.images.length - loaded;
});
</script>"""


class Table(NamedTuple):
    """A titled table whose cells are already formatted (shared with the text reports)."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]


class Side(NamedTuple):
    """One run of a comparison: its label ("A", "B"), the path the user gave, and its records."""

    label: str
    source: Path
    records: Sequence[Record]


def _text(value: Any) -> str:
    """A value as escaped text: floats as %g, like the markdown tables; nested values as JSON."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (dict, list, tuple, bool)) or value is None:
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return html.escape(text)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; a row shorter than the headers is a failed record, whose error spans the rest."""
    body = []
    for row in rows:
        cells = [f"<td>{_text(cell)}</td>" for cell in row[:-1]]
        span = len(headers) - len(row) + 1
        last = f'<td colspan="{span}" class="failed">' if span > 1 else "<td>"
        cells.append(f"{last}{_text(row[-1])}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_text(header)}</th>" for header in headers)
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _key_values(mapping: dict[str, Any]) -> str:
    return html_table(["key", "value"], [[key, value] for key, value in mapping.items()])


MAX_EMBEDDED_BYTES = 200_000_000  # bytes of images one self-contained page embeds of each run


class ImageSource:
    """Image tags for the files one run's records name; collects a warning per file it cannot show."""

    def __init__(self, run_dir: Path, embed: bool) -> None:
        self.run_dir = Path(run_dir)
        self.embed = embed  # data: URIs instead of paths relative to the run folder
        self.embedded = 0  # bytes of images embedded so far (records could name one large file a thousand times)
        self.warnings: list[str] = []
        self._warned: set[str] = set()

    def figure(self, name: Any, caption: str) -> str:
        """The image with its caption, or a visible ``missing: NAME`` box in its place."""
        problem = self._problem(name)
        if problem is None:
            try:
                body = f'<img src="{html.escape(self._src(name))}" alt="{_text(caption)}">'
            except OSError as error:
                problem = f"cannot be read ({error.strerror or error})"
        if problem is not None:
            self._warn(str(name), problem)
            body = f'<div class="missing">missing: {_text(name)}</div>'
        return f"<figure>{body}<figcaption>{_text(caption)}</figcaption></figure>"

    def exists(self, name: str) -> bool:
        return (self.run_dir / name).is_file()

    def _problem(self, name: Any) -> str | None:
        """Why the file a record names cannot be shown, or None when it can."""
        if not report.inside_run_folder(self.run_dir, name):
            return "lies outside the run folder (an absolute path, '..' or a link out of it)"
        if not (self.run_dir / name).is_file():
            return "does not exist"
        if self.embed and self.embedded + (self.run_dir / name).stat().st_size > MAX_EMBEDDED_BYTES:
            return (f"is not embedded: the page holds {self.embedded / 1e6:.0f} MB of images already, and embeds at "
                    f"most {MAX_EMBEDDED_BYTES / 1e6:.0f} MB")
        return None

    def _src(self, name: str) -> str:
        if not self.embed:
            return quote(Path(name).as_posix(), errors="surrogateescape")  # a non-UTF-8 name: its own bytes
        mime = mimetypes.guess_type(name)[0] or "image/png"
        data = (self.run_dir / name).read_bytes()
        self.embedded += len(data)
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    def _warn(self, name: str, problem: str) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        self.warnings.append(f"image '{name}' named in {self.run_dir / RECORDS_FILE} {problem}; "
                             f"the page shows 'missing: {name}' in its place.")


def _gallery(figures: Sequence[str]) -> str:
    return f'<div class="gallery">{"".join(figures)}</div>'


def _summary_table(records: Sequence[Record]) -> str:
    headers, rows = report.summary_rows(records)
    rows = [row if record.ok else [record.sampler, record.steps, record.guidance_scale, f"failed: {record.error}"]
            for row, record in zip(rows, records)]
    return html_table(headers, rows)


def run_sections(records: Sequence[Record], images: ImageSource, level: int) -> list[str]:
    """The timing and stage tables, plots, comparison grids and per-step grids of one run."""
    from harness.reporting.plots import LATENCY_PLOT, QUALITY_PLOT  # matplotlib loads only when a page is made

    heading = f"h{level}"
    if not records:
        return ["<p>No measurements.</p>"]
    parts = [f"<{heading}>Timing</{heading}>", _summary_table(records)]
    if report.any_noisy(records):
        parts.append(f'<p class="note">{_text(report.NOISY_NOTE)}</p>')
    if report.any_nonfinite(records):
        parts.append(f'<p class="note">{_text(report.NONFINITE_NOTE)}</p>')
    ok = successful(records)
    if ok:
        parts += [f"<{heading}>Stages (one instrumented call)</{heading}>", html_table(*report.stage_rows(records))]
    plots = [images.figure(name, caption)
             for name, caption in ((LATENCY_PLOT, "seconds per image against steps"),
                                   (QUALITY_PLOT, "quality against seconds per image, Pareto front in red"))
             if images.exists(name)]
    comparisons = [images.figure(comparison.path,
                                 f"{comparison.baseline_sampler} {comparison.baseline_steps} steps (top), "
                                 f"{record.sampler} {record.steps} steps (bottom)")
                   for record, measured in ok for comparison in measured.comparisons]
    grids = [images.figure(measured.grid, f"{record.sampler}, {record.steps} steps") for record, measured in ok
             if measured.grid]  # --save_images none writes no grid
    for title, figures in (("Plots", plots), ("Comparison grids", comparisons), ("Grids per step count", grids)):
        if figures:
            parts += [f"<{heading}>{title}</{heading}>", _gallery(figures)]
    return parts


def _document(title: str, body: Sequence[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        PAGE_MARK.decode(),
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title>",
        f"<style>\n{STYLE}\n</style>",
        "</head>",
        "<body>",
        LOAD_CHECK,
        *body,
        "</body>",
        "</html>",
        "",
    ])


def _first(records: Sequence[Record]) -> Record:
    """The record the run's settings are read from: the first successful one, else the first (all failed)."""
    return next((record for record, _ in successful(records)), records[0])


def _overview(records: Sequence[Record]) -> str:
    """One line on what the numbers were measured on, above the tables."""
    first = _first(records)
    environment = first.environment
    width, height = first.measured.image_size if first.measured is not None else ("?", "?")
    failed = len(records) - len(successful(records))
    return (f"<p>model {_text(first.config.get('model'))} on {_text(environment.get('device_name'))} "
            f"({_text(environment.get('device'))}, {_text(environment.get('dtype'))}), "
            f"images {_text(width)}x{_text(height)}; "
            f"{len(records)} measurement(s), {failed} failed</p>")


def run_page(run_dir: Path, records: Sequence[Record]) -> tuple[str, list[str]]:
    """The run's page and the warnings about images it could not show."""
    run_dir = Path(run_dir)
    images = ImageSource(run_dir, embed=False)
    title = f"harness run {run_dir.resolve().name}"
    body = [f"<h1>{_text(title)}</h1>"]
    if records:
        body.append(_overview(records))
    body += run_sections(records, images, level=2)
    notices = [f"{record.sampler} ({record.steps} steps): {warning}"
               for record, measured in successful(records) for warning in measured.warnings]
    if notices:
        body += ["<h2>Warnings</h2>", "<ul>", *(f"<li>{_text(notice)}</li>" for notice in notices), "</ul>"]
    if records:
        first = _first(records)
        body += ["<h2>Configuration</h2>", _key_values(first.config),
                 "<h2>Environment</h2>", _key_values(first.environment)]
    return _document(title, body), images.warnings


def check_run_page(run_dir: Path) -> Path:
    """The run folder's ``index.html``, refused when a file there is not a page harness wrote."""
    path = Path(run_dir) / HTML_FILE
    if not replaceable(path):
        raise HarnessError(f"'{path}' exists and is not a page harness wrote; move it out of the run folder, then "
                           f"write the page with harness report '{run_dir}' --html.")
    return path


def write_run_page(run_dir: Path, records: Sequence[Record]) -> list[str]:
    """Write ``index.html`` into the run folder; return one warning per image it could not show."""
    path = check_run_page(run_dir)
    text, warnings = run_page(run_dir, records)
    _write(path, text, "free some space or make the run folder writable")
    return warnings


def _run_folder(source: Path) -> Path:
    """A comparison side is a run folder or its records file; images are named relative to the folder."""
    return source if source.is_dir() else source.parent


def compare_page(sides: Sequence[Side], tables: Sequence[Table], notes: Sequence[str]) -> tuple[str, list[str]]:
    """The comparison tables above each run's own tables and grids, side by side; images embedded."""
    title = "harness compare " + " vs ".join(str(side.source) for side in sides)
    body = [f"<h1>{_text(title)}</h1>", *(f'<p class="note">{_text(note)}</p>' for note in notes)]
    for table in tables:
        body += [f"<h2>{_text(table.title)}</h2>", html_table(table.headers, table.rows)]
    warnings: list[str] = []
    columns = []
    for side in sides:
        images = ImageSource(_run_folder(side.source), embed=True)
        sections = run_sections(side.records, images, level=3)
        columns.append(f"<section><h2>{_text(side.label)}: {_text(side.source)}</h2>{''.join(sections)}</section>")
        warnings += images.warnings
    body.append(f'<div class="runs">{"".join(columns)}</div>')
    return _document(title, body), warnings


def write_compare_page(out: Path, sides: Sequence[Side], tables: Sequence[Table], notes: Sequence[str]) -> list[str]:
    """Write the comparison page to ``out`` (and nothing else); return one warning per image it could not show."""
    out = Path(out)
    if not out.parent.is_dir():
        raise HarnessError(f"cannot write '{out}': the folder '{out.parent}' does not exist; create it or pass "
                           "--html a path in an existing folder.")
    if not replaceable(out):
        raise HarnessError(f"--html '{out}' is an existing file that is not a page harness wrote (such as a run's "
                           f"{RECORDS_FILE}); pass --html a new file name, e.g. compare.html.")
    text, warnings = compare_page(sides, tables, notes)
    _write(out, text, "free some space or pass --html a path in a writable folder")
    return warnings


def replaceable(path: Path) -> bool:
    """Whether a page may be written to ``path``: nothing is there, or a page harness wrote (an earlier run's or
    comparison's), never a file of a run (records.jsonl, an image) or a page of someone else."""
    try:
        if not path.exists():
            return True
    except OSError:
        return True  # a name too long: the write fails and says so
    if not path.is_file():
        return False  # a folder, or a FIFO that reading would wait on forever
    try:
        with path.open("rb") as handle:
            head = handle.read(PAGE_HEAD_BYTES)
    except OSError:
        return False
    return head.startswith(b"<!DOCTYPE html>") and PAGE_MARK in head


def _write(path: Path, text: str, fix: str) -> None:
    """Write atomically; a failure is one line that names the file and the fix, not a traceback."""
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise HarnessError(f"cannot write '{path}': {error.strerror or error}; {fix}.") from None
