"""Print which LoRA of the embedded lab ships: the best mean of the ranking metric at 2 and 4 steps.

    python scripts/lab_winner.py LEADERBOARD_JSON NAME [NAME ...]

NAME is a LoRA's training run name without its ``_lora`` suffix (distill, lcm, flash): the rows of
``harness leaderboard`` whose LoRA lies in a folder ``NAME_lora`` are that LoRA's. Only the
local-student rows count, so a LoRA is judged as local-student and flash-lcm sample it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = (2, 4)


def main() -> None:
    board, names = Path(sys.argv[1]), sys.argv[2:]
    document = json.loads(board.read_text(encoding="utf-8"))
    sign = 1 if document["higher_is_better"] else -1
    scores = {}
    for name in names:
        values = [row["value"] for row in document["rows"]
                  if row["sampler"] == "local-student" and row["steps"] in STEPS and row["value"] is not None
                  and f"/{name}_lora/" in f"{row['lora']}/"]
        if len(values) == len(STEPS):
            scores[name] = sign * sum(values) / len(values)
    if not scores:
        sys.exit(f"{board}: no local-student rows at {STEPS} steps for any of {', '.join(names)}")
    print(max(scores, key=scores.__getitem__))


if __name__ == "__main__":
    main()
