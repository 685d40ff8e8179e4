"""Write the embedded model's card: the pretraining run's card, the run that trained it on, and the lab.

    python scripts/embedded_card.py PRETRAIN_MODEL TEACHER_MODEL LEADERBOARD_MD WINNER OUT_MD

PRETRAIN_MODEL and TEACHER_MODEL are the ``final/`` folders of the two pretrain runs of
``scripts/build_embedded_model.sh`` (each holds the README.md its run wrote), LEADERBOARD_MD the lab's
``harness leaderboard`` table, WINNER the LoRA that ships (distill, lcm, flash or lcm_flash).
"""

from __future__ import annotations

import sys
from pathlib import Path

LAB = """## The lab

The teacher (30 DDIM steps, CFG 7.5), the model without LoRA on the few-step schedule (`undistilled`),
and the four few-step LoRAs trained from it (`harness train --plugin distill` 200 steps, `lcm` 2,000,
`flash` 400; rank 8, batch 8, AdamW 1e-3; then `flash` for 600 more steps on the lcm LoRA, AdamW 3e-4,
its timestep mixture on the 2-step sampler's timesteps: `lcm+flash`), sampled like local-student
(LCMScheduler, trailing, guidance 0), plus `tcd` on the lcm LoRA: the 64 held-out prompts x 4 seeds
(seed 100), `--metric fidelity coverage`, from `scripts/build_embedded_model.sh`. The shipped LoRA
(`tiny-sd-flash-lora`) is {winner}, the one that meets most of the issue's targets at 2 and 4 steps
(`scripts/lab_winner.py`; then the best mean fidelity there).

"""


def _body(card: str) -> str:
    """A run's card without its title and the paragraph that introduces the model."""
    paragraphs = card.split("\n\n")
    return "\n\n".join(paragraphs[2:]) if paragraphs[0].startswith("# ") else card


def main() -> None:
    pretrain, teacher, board, winner, out = sys.argv[1:6]
    first = (Path(pretrain) / "README.md").read_text(encoding="utf-8")
    second = (Path(teacher) / "README.md").read_text(encoding="utf-8")
    table = Path(board).read_text(encoding="utf-8")
    table = table.split("\n", 1)[1] if table.startswith("#") else table
    card = (first.rstrip("\n") + "\n\n## Trained on: the teacher that ships\n\n" + _body(second).rstrip("\n")
            + "\n\n" + LAB.format(winner=winner) + table)
    Path(out).write_text(card, encoding="utf-8")


if __name__ == "__main__":
    main()
