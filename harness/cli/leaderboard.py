"""``harness leaderboard``: rank the samplers and LoRAs of several runs; it parses and prints, the ranking is
``harness.reporting.leaderboard``'s."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.support import say, warn
from harness.reporting.leaderboard import (
    LEADERBOARD_JSON,
    LEADERBOARD_MD,
    LEADERBOARD_PLOT,
    build_leaderboard,
    default_outdir,
    parse_labels,
    write_leaderboard,
)
from harness.reporting.runs import load_runs, setup_warning, title

LEADERBOARD_HELP = """Rank the samplers and LoRAs of several runs by a quality metric, beside their latency.

RUN_DIR... are folders of `harness eval` or `harness bench` runs (or their records.jsonl) scored with the
same --metric on the same prompts and seeds (--prompts, --seed, --num_images); runs that differ are refused.
Every successful measurement is a row: the entry (the sampler, plus its LoRA's name: RUN for a LoRA at
.../RUN/lora/final), steps, guidance, median seconds per image, the metric and every other metric the records
hold, the rank by the metric among the rows of the same step count (1 = best), whether the row is on the
Pareto front of quality against seconds per image, and, for a LoRA that `harness train` wrote, the optimizer
steps, minutes and steps/s its training took. A baseline that several runs measured (each `harness eval`
measures one) is shown once, from the first run given that has it, on top.

Writes leaderboard.md, leaderboard.json and leaderboard.png (the metric against seconds per image, one line
per entry across step counts, the Pareto front in red) into --outdir, and prints the table.

\b
Example:
  harness eval --lora_path checkpoints/distill/lora/final --steps 1 2 4 8 --metric fidelity --outdir runs/distill
  harness leaderboard runs/teacher runs/distill runs/lcm runs/flash --metric fidelity"""


@click.command(name="leaderboard", help=LEADERBOARD_HELP)
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metric", metavar="NAME",
              help="The metric to rank by (default: the first one the records have values for).")
@click.option("--label", "labels", metavar="RUN_DIR=NAME", multiple=True,
              help="Name the few-step entries of one run (of a run with baselines only, its baselines): their "
                   "rows read 'SAMPLER (NAME)' instead of 'SAMPLER (LORA NAME)'. Repeatable.")
@click.option("--outdir", type=click.Path(path_type=Path), metavar="DIR",
              help="Where the three files go (default: results/<UTC time>-leaderboard).")
def leaderboard_command(run_dirs: tuple[Path, ...], metric: str | None, labels: tuple[str, ...],
                        outdir: Path | None) -> None:
    runs = load_runs(run_dirs, warn)
    board = build_leaderboard(runs, metric, parse_labels(labels, runs), warn)
    warning = setup_warning(runs)
    if warning:
        say(warning)
    outdir = outdir if outdir is not None else default_outdir()
    write_leaderboard(outdir, board, title(runs))
    click.echo(board.table())
    click.echo(err=True)
    say(f"{LEADERBOARD_MD}, {LEADERBOARD_JSON} and {LEADERBOARD_PLOT} in {outdir}")
