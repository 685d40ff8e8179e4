"""shapes: ``harness data shapes``, the synthetic captioned shapes data set of ``harness.lab.shapes``."""

from __future__ import annotations

import click

import harness
from harness.lab import dataset, shapes


@click.group("data")
def data():
    """Generate training data sets."""


@data.command("shapes")
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to create (must not exist or be empty).")
@click.option("--n", "n", type=int, default=10000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same files.")
@click.option("--resolution", type=int, default=64, show_default=True,
              help=f"Image side in pixels: a multiple of 8 from {shapes.MIN_RESOLUTION} to "
                   f"{shapes.MAX_RESOLUTION}.")
@click.option("--grammar", type=click.Choice(dataset.GRAMMARS), default="open", show_default=True,
              help="open: captions leave shape, colour, size, place or background unsaid, one to three objects "
                   "(harness.lab.scenes); closed: every caption fixes the whole picture "
                   "(the first embedded model's data).")
def shapes_command(out, n, seed, resolution, grammar):
    """Write a captioned data set of coloured shapes on plain backgrounds.

    Open captions read like "two blue squares on a white background" or "a large shape at the top";
    closed ones like "a small red circle at the top on a blue background". Writes OUT/images/000000.png
    and OUT/captions/000000.txt, ..., the layout `harness train --data_dir` reads. No held-out evaluation
    combination (`--prompts held-out`, or held-out-closed for the closed grammar) ever occurs.
    """
    folder = dataset.write_dataset(out, n, seed, resolution, grammar, notify=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {n} images and captions ({resolution}x{resolution}, seed {seed}, {grammar} grammar) "
               f"to {folder}")


@harness.hookimpl
def register_commands(cli):
    cli.add_command(data)
