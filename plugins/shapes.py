"""shapes: ``harness data shapes``, the synthetic captioned shapes data set of ``harness.shapes``."""

from __future__ import annotations

import click

import harness
from harness import shapes


@click.group("data")
def data():
    """Generate training data sets."""


@data.command("shapes")
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to create (must not exist or be empty).")
@click.option("--n", "n", type=int, default=10000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same files.")
@click.option("--resolution", type=int, default=64, show_default=True,
              help=f"Image side in pixels: a multiple of 8, at least {shapes.MIN_RESOLUTION}.")
def shapes_command(out, n, seed, resolution):
    """Write a captioned data set of coloured shapes on plain backgrounds.

    Captions read like "a small red circle at the top on a blue background". Writes OUT/images/000000.png
    and OUT/captions/000000.txt, ..., the layout `harness train --data_dir` reads. The 64 held-out
    evaluation captions of harness.shapes.held_out_prompts() never occur.
    """
    folder = shapes.write_dataset(out, n, seed, resolution)
    click.echo(f"wrote {n} images and captions ({resolution}x{resolution}, seed {seed}) to {folder}")


@harness.hookimpl
def register_commands(cli):
    cli.add_command(data)
