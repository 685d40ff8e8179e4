"""Prompt sets for ``--prompts``: a file of the user's, or a built-in set named in ``PROMPT_SETS``.

Built-in sets:

- ``held-out``: the embedded model's 64 evaluation prompts (``harness.shapes.held_out_prompts``), attribute
  combinations its training data never shows; ``--metric fidelity`` scores them.
- ``seed``: the prompts of the original Flash Diffusion demo's examples, a short general set for SD 1.5.

A file of that name in the working folder wins over a built-in set, so nobody's file is ever shadowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

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
    from harness.shapes import held_out_prompts

    return held_out_prompts()


PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "held-out": _held_out,
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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HarnessError(f"cannot read prompt file '{path}': {error.__class__.__name__}; pass a UTF-8 text file.") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all(line.startswith("{") for line in lines):
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                prompts.append(str(json.loads(line)["prompt"]).strip())
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HarnessError(f"prompt file '{path}' line {number} is not a JSON object with a 'prompt' field.") from None
        lines = [prompt for prompt in prompts if prompt]
    if not lines:
        raise HarnessError(f"prompt file '{path}' holds no prompts; write one prompt per line.")
    return lines
