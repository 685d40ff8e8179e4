"""``harness train --plugin NAME [OPTIONS]``: run a trainer plugin with options made from its typed config.

A trainer's options depend on ``--plugin``, so ``train`` reads ``--plugin`` first and hands every other
argument to a command generated from the trainer's config dataclass; ``harness train --plugin NAME --help``
lists that trainer's options. ``accelerate launch -m harness train ...`` runs the same command in every
process.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click
import pluggy

from harness.cli.support import MultiValueCommand, say
from harness.errors import HarnessError
from harness.hooks.registry import Registered, get_registry
from harness.options import click_options, multi_value_flags
from harness.records.environment import plugin_failure
from harness.training.config import TrainConfig, check_run_name
from harness.training.state import StepReport
from harness.training.trainer import Trainer

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar as ClickProgressBar  # what click.progressbar returns

TRAIN_HELP = """Train a model with a trainer plugin: harness train --plugin NAME [OPTIONS].

`harness train --plugin NAME --help` lists the trainer's own options.

Example: harness train --plugin distill --dataset_name lambdalabs/naruto-blip-captions --max_steps 1000"""


@click.command("train", help=TRAIN_HELP, add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--plugin", "plugin_name", metavar="NAME", help="The trainer to run.")
@click.pass_context
def train(ctx: click.Context, plugin_name: str | None) -> None:
    plugin_dirs = ctx.parent.params.get("plugin_dir") if ctx.parent is not None else ()
    registry = get_registry(plugin_dirs or ())
    known = ", ".join(sorted(registry.trainers)) or "none"
    if plugin_name is None:
        if "--help" in ctx.args:
            click.echo(ctx.get_help())
            click.echo(f"\nInstalled trainers: {known}.")
            return
        raise HarnessError(f"pass --plugin NAME to choose a trainer; installed trainers: {known}.")
    entry = registry.trainer(plugin_name)
    command = make_trainer_command(entry, registry.pm)
    with command.make_context(f"--plugin {plugin_name}", list(ctx.args), parent=ctx) as trainer_ctx:
        command.invoke(trainer_ctx)


def make_trainer_command(entry: Registered[type[Trainer]], plugin_manager: pluggy.PluginManager) -> click.Command:
    """A click command with one option per field of the trainer's config class, as ``harness bench`` makes its own."""
    config_class = entry.cls.config_class

    def callback(**values: Any) -> None:
        check_run_name(values["run_name"])
        run_trainer(entry.cls, config_class(**values), plugin_manager)

    return MultiValueCommand(entry.name, params=click_options(config_class), callback=callback,
                             multi_value=multi_value_flags(config_class),
                             help=f"{entry.description}\n\nTrainer '{entry.name}' from {entry.source}.")


def run_trainer(trainer_class: type[Trainer], config: TrainConfig, plugin_manager: pluggy.PluginManager) -> None:
    progress = ProgressBar()
    trainer = trainer_class(config, plugin_manager=plugin_manager, on_step=progress.update,
                            notify=say)
    try:
        final = trainer.train()
    except KeyboardInterrupt:
        progress.close()
        click.echo("interrupted; continue from the newest checkpoint with --resume_from_checkpoint latest.", err=True)
        sys.exit(130)
    except SystemExit as error:  # the trainer plugin's code called sys.exit(): never a silent exit 0
        progress.close()
        raise HarnessError(f"trainer '{trainer_class.name}' stopped: {plugin_failure(error)}; fix or uninstall that "
                           "plugin.") from None
    progress.close()
    if trainer.is_main:
        say(f"final weights: {final}", err=False)
        say(f"benchmark them: {trainer.benchmark_command(final)}")


class ProgressBar:
    """Steps, loss, learning rate and steps/s; made at the first step report, which only the main process sends."""

    def __init__(self) -> None:
        self.bar: ClickProgressBar[str] | None = None
        self.started: tuple[int, float] | None = None

    def update(self, report: StepReport) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=report.max_steps, label="train", file=sys.stderr, show_pos=True,
                                         item_show_func=lambda text: text)
            self.bar.__enter__()
            self.bar.update(report.step - 1)
            self.started = (report.step, time.perf_counter())
        assert self.started is not None  # set together with the bar
        first_step, first_time = self.started
        elapsed = time.perf_counter() - first_time
        rate = f" | {(report.step - first_step) / elapsed:.2f} steps/s" if report.step > first_step else ""
        self.bar.update(1, f"loss {report.loss:.4g} | lr {report.lr:.3g}{rate}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
