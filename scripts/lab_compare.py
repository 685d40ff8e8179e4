"""Draw the README's comparison grid from the embedded lab: the teacher, undistilled and the shipped LoRA.

    python scripts/lab_compare.py LAB_DIR WINNER OUT_PNG

Rows, top to bottom: the teacher at 30 steps, the model without LoRA at 2 steps, the WINNER LoRA at 2 and
4 steps; columns: the first seed of held-out prompts 1, 9, 17, 27, 35, 43, 51 and 59 (one of each
held-out combination), from the images the lab's runs saved.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from harness import comparison_grid

PROMPTS = (1, 9, 17, 27, 35, 43, 51, 59)
SEEDS_PER_PROMPT = 4
SCALE = 2


def main() -> None:
    lab, winner, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    rows = [
        ("teacher | 30 steps | cfg 7.5", lab / "teacher" / "baseline" / "baseline_s30_i{index}_seed100.png"),
        ("undistilled | 2 steps", lab / "teacher" / "image_s2_i{index}_seed100.png"),
        (f"shipped {winner} LoRA | 2 steps", lab / winner / "image_s2_i{index}_seed100.png"),
        (f"shipped {winner} LoRA | 4 steps", lab / winner / "image_s4_i{index}_seed100.png"),
    ]
    comparison_grid([
        (label, [_tile(str(pattern).format(index=prompt * SEEDS_PER_PROMPT)) for prompt in PROMPTS])
        for label, pattern in rows
    ]).save(out)


def _tile(path: str) -> Image.Image:
    image = Image.open(path).convert("RGB")
    return image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)

if __name__ == "__main__":
    main()
