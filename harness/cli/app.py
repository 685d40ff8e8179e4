"""The ``harness`` command line: bench, report, plugins, plus whatever plugins add."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from harness.benchmark import distributed, launch
from harness.benchmark.launch import CORE_OPTIONS
from harness.benchmark.plan import plan
from harness.benchmark.runner import BenchRun
from harness.benchmark.spec import BenchOptions, BenchSpec
from harness.benchmark.timing import TimingSettings
from harness.cli.compare import compare_command
from harness.cli.leaderboard import leaderboard_command
from harness.cli.support import MultiValueCommand, click_errors, say, warn
from harness.cli.train import train
from harness.errors import ExitCode, HarnessError
from harness.hooks.registry import PLUGIN_DIRS_ENV, Registry, get_registry
from harness.models import loading as models
from harness.models.speed import SpeedOptions
from harness.options import build, click_options, multi_value_flags
from harness.records import store as records
from harness.reporting import html as html_report
from harness.reporting import report
from harness.reporting.markdown import markdown_table
from harness.version import __version__


class HarnessGroup(click.Group):
    """Loads plugins (with the group's ``--plugin-dir``) before listing or resolving a command."""

    def _registry(self, ctx: click.Context) -> Registry:
        registry = get_registry(ctx.params.get("plugin_dir") or ())
        if self.built_in is None:
            self.built_in = dict(self.commands)  # the commands harness itself adds, before any plugin's
        if registry not in self.by_registry:
            # Each plugin set its own commands (one process may parse command lines of several: the API, tests).
            self.commands = dict(self.built_in)
            registry.commands_added = True
            # A plugin command may not take a built-in's name: that plugin is broken, and said so on every command.
            for info in registry.add_commands(self, reserved=GENERATED_COMMANDS):
                warn(f"the plugin '{info.name}' ({info.source}) is broken: {info.error}; fix or uninstall that "
                     "plugin (see `harness plugins`).")
            self.by_registry[registry] = dict(self.commands)
        self.commands = dict(self.by_registry[registry])
        return registry

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._registry(ctx)
        return sorted({*super().list_commands(ctx), *GENERATED_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        registry = self._registry(ctx)
        if name in GENERATED_COMMANDS:
            return GENERATED_COMMANDS[name](registry)
        return super().get_command(ctx, name)

    built_in: dict[str, click.Command] | None = None
    by_registry: weakref.WeakKeyDictionary[Registry, dict[str, click.Command]] = weakref.WeakKeyDictionary()

    # Parsing (including --help, which loads plugins) and running are where the core's errors surface.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with click_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with click_errors():
            return super().invoke(ctx)


@click.group(cls=HarnessGroup)
@click.version_option(__version__, prog_name="harness")
@click.option("--plugin-dir", "plugin_dir", multiple=True, type=click.Path(file_okay=False),
              help=f"Also load every *.py plugin file in this folder (repeatable; or set {PLUGIN_DIRS_ENV}).")
def cli(plugin_dir: tuple[str, ...]) -> None:
    """Benchmark and distil few-step text-to-image diffusion samplers."""
    models.quiet_libraries()


BENCH_HELP = """Generate images with one or more samplers and time them under one protocol.

Example: harness bench --sampler flash-lcm --steps 2 4 8 --seed 42 --compare_baseline"""

EVAL_HELP = """Evaluate a trained LoRA against the baseline (the seed's eval_lora.sh).

The baseline (--baseline_steps 30, --baseline_guidance 7.5) and the student (--lora_path, each of --steps,
guidance 0) run through the same machinery as `harness bench --compare_baseline`: comparison grids,
records and the timing table.

Example: harness eval --lora_path ./checkpoints/my_lora_student/lora/final --steps 2 4 8 --seed 42"""

def make_bench_command(registry: Registry, name: str = "bench", default_samplers: tuple[str, ...] = ("flash-lcm",),
                       always_compare: bool = False, help_text: str = BENCH_HELP) -> click.Command:
    params = [param for options_class in CORE_OPTIONS for param in click_options(options_class)]
    installed: dict[str, Mapping[str, object]] = {"samplers": registry.samplers, "metrics": registry.metrics}
    for param in params:
        if param.name == "samplers":
            param.default = default_samplers
        if param.name in installed:
            param.help = f"{param.help} Installed: {', '.join(sorted(installed[param.name])) or 'none'}."
    # A plugin's own options join the command; their values reach the plugin typed, through its Options.
    plugin_options, plugin_params = launch.plugin_options(registry, {param.name for param in params if param.name})
    params += plugin_params

    def callback(**values: Any) -> None:
        context = click.get_current_context()
        given = {name for name in plugin_options
                 if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
        plugin_values = {name: values.pop(name) for name in plugin_options}
        options = build(BenchOptions, values)
        if always_compare:
            options = dataclasses.replace(options, compare_baseline=True)
        spec = launch.build_spec(registry, options, build(TimingSettings, values), build(SpeedOptions, values),
                                 plugin_values, {name: plugin_options[name] for name in given})
        run_bench(registry, spec, options)

    return MultiValueCommand(name, params=params, callback=callback, help=help_text,
                             multi_value=[flag for cls in CORE_OPTIONS for flag in multi_value_flags(cls)])


GENERATED_COMMANDS = {
    "bench": make_bench_command,
    "eval": lambda registry: make_bench_command(registry, "eval", ("local-student",), True, EVAL_HELP),
}


def run_bench(registry: Registry, spec: BenchSpec, options: BenchOptions) -> None:
    """One process, or one of several started by torchrun / accelerate launch (see harness.benchmark.distributed)."""
    world = distributed.world_from_env()
    try:
        if options.dry_run:  # the plan only: no model is resolved or loaded
            if world.is_main:
                tasks = plan(spec, registry, default_prompt="", seed=spec.seed or 0).tasks
                click.echo(json.dumps({"spec": spec.config_dict(spec.seed, {"prompts": list(spec.prompts)}),
                                       "tasks": [dataclasses.asdict(task) for task in tasks]}, indent=2, default=str))
            return
        with launch.prepared_run(registry, spec, options, world, notify=say) as run:
            run_and_report(run, options, world)
    except HarnessError as error:
        if world.is_main:
            raise
        if not isinstance(error, distributed.ProcessLost):
            sys.exit(error.exit_code)  # rank 0 says why: the same bad input, or a failure all ranks were told about
        error.message = world.label(world.rank) + error.message  # this rank lost rank 0, which cannot say so
        raise


def run_and_report(run: BenchRun, options: BenchOptions, world: distributed.World) -> None:
    """Measure with a progress bar, then print the table (and write the HTML page); exit codes as documented."""
    main = world.is_main  # rank 0 reports for every rank: the others' measurements and errors reach it
    if main and run.model.notice:
        say(run.model.notice)
    quiet = options.quiet or not main
    if not quiet:
        processes = f"; {world.size} processes" if world.size > 1 else ""
        say(f"model: {run.model.name} ({run.model.location}) on {run.device}, {run.dtype}{processes}; "
            f"writing to {run.outdir}")

    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    with click.progressbar(length=len(run.tasks), label="bench", file=sys.stderr,
                           hidden=quiet, show_pos=True, item_show_func=lambda item: item) as bar:
        run.on_progress = lambda task: bar.update(1, f"{task.sampler} {task.steps} steps")
        run.on_warning = _warn_below_the_bar
        try:
            # With --json, stdout carries the records alone: what plugins print while they run goes to stderr.
            with contextlib.redirect_stdout(sys.stderr) if options.as_json else contextlib.nullcontext():
                run.run()
        except KeyboardInterrupt:
            interrupted = True

    if not main:
        if interrupted:
            sys.exit(ExitCode.INTERRUPTED)
        return
    finished = run.records
    if interrupted and run.records_path.is_file():
        # A signal can land between a record's line and the in-memory list or summary.md: the file is the truth.
        try:
            finished = report.rebuild(run.outdir, on_warning=lambda warning: _warn([warning]))
        except HarnessError:  # not one whole record reached the file, or summary.md could not be rewritten
            finished = records.read_records(run.records_path, on_skip=lambda _: None)
    if options.html:
        _warn(html_report.write_run_page(run.outdir, finished))
    if options.as_json:
        click.echo(records.dump(finished))
    else:
        click.echo(report.summary_table(finished))
        # Only what is there: a summary.md the disk refused is named by an error below, never claimed here.
        unwritten = {Path(error.filename).name for error in run.unwritten if error.filename}
        names = ["records", "images", *(["summary.md"] if records.SUMMARY_FILE not in unwritten else []),
                 *(["index.html"] if options.html else [])]
        click.echo(err=True)
        say(f"{', '.join(names[:-1])} and {names[-1]} in {run.outdir}")
    if interrupted:
        click.echo(f"interrupted: {len(finished)} finished measurement(s) kept in {run.records_path}", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    if run.errors:
        for error in run.errors:
            say(f"Error: {error}")
        sys.exit(ExitCode.FAILED)


def _warn_below_the_bar(warning: str) -> None:
    click.echo(err=True)  # off the progress bar's line
    warn(warning)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        warn(warning)


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


@cli.command(name="report")
@click.argument("run_folder", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--html",
    is_flag=True,
    help="Also write RUN_DIR/index.html: tables, grids, plots, configuration and environment on one "
    "self-contained page (images by relative path).",
)
def report_command(run_folder: str, html: bool) -> None:
    """Rebuild summary.md and every grid of RUN_DIR from its records.jsonl alone."""
    run_dir = Path(run_folder)
    if html:
        html_report.check_run_page(run_dir)  # before summary.md and the grids are rebuilt
    try:
        run_records = report.rebuild(run_dir, on_warning=lambda warning: _warn([warning]))
    except OSError as error:
        raise HarnessError(
            f"cannot write to '{run_dir}': {error.strerror or error}; free some space or make the run folder writable."
        ) from None
    if html:
        _warn(html_report.write_run_page(run_dir, run_records))
    click.echo(report.summary_table(run_records))


@cli.command(name="plugins")
@click.option("--all", "show_all", is_flag=True, help="Also list every loaded plugin module and its hooks.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def plugins_command(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List installed samplers, trainers and metrics, and where they came from."""
    registry = get_registry(ctx.parent.params.get("plugin_dir") or () if ctx.parent else ())
    rows: list[dict[str, str | None]] = [
        {"name": entry.name, "kind": entry.kind, "source": entry.source, "description": entry.description}
        for table in (registry.samplers, registry.trainers, registry.metrics)
        for entry in table.values()
    ]
    rows += [
        {"name": info.name, "kind": "broken", "source": info.source, "description": info.error}
        for info in registry.broken()
    ]
    if show_all:
        rows += [
            {"name": info.name, "kind": "plugin", "source": info.source, "description": ", ".join(info.hooks)}
            for info in registry.plugins.values()
            if not info.error
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(markdown_table([list(row.values()) for row in rows], ["name", "kind", "source", "description"]))


cli.add_command(compare_command)
cli.add_command(leaderboard_command)
cli.add_command(train)
