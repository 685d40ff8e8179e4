"""Print which LoRA of the embedded lab ships: the one that meets most of the issue's targets at 2 and 4 steps,
then the best mean of the ranking metric there.

    python scripts/lab_winner.py LEADERBOARD_JSON NAME [NAME ...]

NAME is a LoRA's training run name without its ``_lora`` suffix (distill, lcm, flash, lcm_flash): the rows of
``harness leaderboard`` whose LoRA lies in a folder ``NAME_lora`` are that LoRA's. Only the
local-student rows count, so a LoRA is judged as local-student and flash-lcm sample it. The targets are the LoRA
targets of issue 12 as ``lab_targets.py`` checks them, at each of 2 and 4 steps: fidelity within 0.05 of the
teacher's, at least 0.20 above the model without LoRA (``undistilled``) at the same steps, coverage within 0.10
of the teacher's. Each LoRA's tally goes to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lab_targets import LORA_STEPS, Figures, lora_targets


def row_figures(row: dict) -> Figures:
    """A leaderboard row's fidelity and coverage."""
    return Figures(row["metrics"]["fidelity"], row["metrics"]["coverage"])


def main() -> None:
    board, names = Path(sys.argv[1]), sys.argv[2:]
    document = json.loads(board.read_text(encoding="utf-8"))
    if document["metric"] != "fidelity":
        sys.exit(f"{board}: ranked by {document['metric']}; the lab's targets are on fidelity")
    rows = document["rows"]
    teacher = next((row for row in rows if row["baseline"]), None)
    undistilled = {row["steps"]: row for row in rows if row["sampler"] == "undistilled"}
    if teacher is None or not all(steps in undistilled for steps in LORA_STEPS):
        sys.exit(f"{board}: the lab needs the teacher's row and undistilled at {LORA_STEPS} steps")
    scores = {}
    for name in names:
        mine = {row["steps"]: row for row in rows
                if row["sampler"] == "local-student" and row["steps"] in LORA_STEPS and row["value"] is not None
                and f"/{name}_lora/" in f"{row['lora']}/"}
        if len(mine) == len(LORA_STEPS):
            checks = [target.met for steps in LORA_STEPS for target in lora_targets(
                row_figures(mine[steps]), row_figures(teacher), row_figures(undistilled[steps]), steps)]
            mean = sum(mine[steps]["value"] for steps in LORA_STEPS) / len(LORA_STEPS)
            scores[name] = (sum(checks), mean)
            print(f"{name}: {sum(checks)} of {len(checks)} targets met, mean fidelity {mean:.3f}", file=sys.stderr)
    if not scores:
        sys.exit(f"{board}: no local-student rows at {LORA_STEPS} steps for any of {', '.join(names)}")
    print(max(scores, key=scores.__getitem__))


if __name__ == "__main__":
    main()
