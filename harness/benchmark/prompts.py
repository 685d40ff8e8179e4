"""Prompt sets for ``--prompts``: a file of the user's, or a built-in set named in ``PROMPT_SETS``.

Built-in sets:

- ``held-out``: the embedded model's 64 evaluation prompts (``harness.lab.scenes.held_out_prompts``), open
  captions with (shape, colour, count) combinations its training data never shows; ``--metric fidelity``
  and ``--metric coverage`` score them.
- ``held-out-closed``: the 64 evaluation prompts of the closed grammar (``harness.lab.shapes``), for models
  trained on ``harness data shapes --grammar closed``.
- ``seed``: the prompts of the original Flash Diffusion demo's examples, a short general set for SD 1.5.

A file of that name in the working folder wins over a built-in set, so nobody's file is ever shadowed.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError

SEED_PROMPTS = (
    "a beautiful landscape with mountains and a lake, sunset, highly detailed",
    "a futuristic city at night, neon lights, cyberpunk style",
    "a cat wearing sunglasses",
    "a serene forest path",
    "a majestic eagle in flight",
    "underwater coral reef",
    "a steampunk airship floating above clouds",
    "a beautiful sunset over mountains",
    "a futuristic cityscape at night",
    "an astronaut floating in space",
    "a pokemon character",
)


def _held_out() -> list[str]:
    from harness.lab.scenes import held_out_prompts

    return held_out_prompts()


def _held_out_closed() -> list[str]:
    from harness.lab.shapes import held_out_prompts

    return held_out_prompts()


PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "held-out": _held_out,
    "held-out-closed": _held_out_closed,
    "seed": lambda: list(SEED_PROMPTS),
}


def load_prompts(name_or_path: str) -> list[str]:
    """The prompts of a file (one per line, or JSONL with a ``prompt`` field) or of a built-in set."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path]()
    if not path.is_file():
        raise HarnessError(f"--prompts '{name_or_path}' is neither a file nor a built-in prompt set; pass a text "
                           f"file with one prompt per line or one of: {', '.join(PROMPT_SETS)}.")
    return read_prompt_file(path)


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a file: one per line, or JSONL (a ``.jsonl`` file, or one whose first line starts with
    ``{``) with a text ``prompt`` on every line.

    A bad line stops the run instead of being skipped: the prompts are the benchmark's workload, and every
    prompt after a skipped one would draw other seeds (image i of prompt p uses seed + p * num_images + i).
    """
    lines = [(number, line.strip()) for number, line in enumerate(_read_text(path).split("\n"), 1) if line.strip()]
    if lines and (path.suffix == ".jsonl" or lines[0][1].startswith("{")):
        prompts = [_jsonl_prompt(path, number, line) for number, line in lines]
    else:
        prompts = [line for _, line in lines]
    if not prompts:
        raise HarnessError(f"prompt file '{path}' holds no prompts; write one prompt per line.")
    return prompts


def _read_text(path: Path) -> str:
    """The file as text, or one line saying why it is not UTF-8 text (a byte-order mark is allowed)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise HarnessError(f"cannot read prompt file '{path}': {error.strerror or error}; check that it is a "
                           "readable file.") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise HarnessError(f"prompt file '{path}' is UTF-16 text; save it as UTF-8.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise HarnessError(f"prompt file '{path}' is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
                           "save it as UTF-8.") from None
    if "\0" in text:  # valid UTF-8 still, but a prompt never holds one: UTF-16 without its mark, or a binary file
        line = text.count("\n", 0, text.index("\0")) + 1
        raise HarnessError(f"prompt file '{path}' holds a NUL byte on line {line}: it is binary or UTF-16, not UTF-8 "
                           "text; save it as UTF-8.")
    return text


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    """The prompt of one JSONL line, or one line naming the line and what is wrong with it."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
        problem: str | None = "not JSON"
    else:
        problem = _row_problem(row)
    if problem is not None:
        raise HarnessError(f"line {number} of {path}: {problem}; write every line of a JSONL prompt file as "
                           '{"prompt": "..."} (a line is never skipped: the prompts after it would draw other seeds).')
    prompt: str = row["prompt"]
    return prompt.strip()


def _row_problem(row: object) -> str | None:
    if not isinstance(row, dict):
        return f"{_kind(row)}, not an object"
    if "prompt" not in row:
        return "no 'prompt' field"
    if not isinstance(row["prompt"], str):
        return f"'prompt' is {_kind(row['prompt'])}, not text"
    if not row["prompt"].strip():
        return "'prompt' is empty"
    surrogate = lone_surrogate(row["prompt"])
    if surrogate is not None:
        return (f"'prompt' holds the escape {surrogate}, half of a surrogate pair without its other half, which is no "
                "character: write the character itself, or both halves of its pair (e.g. \\ud83d\\ude00)")
    return None


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in ``text`` as its escape (``\\ud800``), or None when every character is one.

    JSON's ``\\ud800`` escape without its pair, and a command-line byte that is not UTF-8 (Python keeps it as
    ``\\udcff``), become such halves: no tokenizer or file can take them.
    """
    found = _SURROGATE.search(text)
    return None if found is None else f"\\u{ord(found.group()):04x}"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _kind(value: object) -> str:
    """A JSON value's kind, as a message names it."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "a list" if isinstance(value, list) else "an object"
