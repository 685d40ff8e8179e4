"""The ``harness`` command line: bench, report, plugins, plus whatever plugins add."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
from tabulate import tabulate

from harness import __version__
from harness.bench import distributed
from harness.bench.prompts import load_prompts
from harness.bench.runner import MAX_SEED, RUN_IMAGE, BenchOptions, BenchRun, BenchSpec, plan
from harness.bench.timing import TimingSettings
from harness.cli.support import MultiValueCommand, click_errors
from harness.cli.train import train
from harness.errors import ExitCode, HarnessError
from harness.hooks.registry import PLUGIN_DIRS_ENV, Registry, get_registry
from harness.models.speed import SpeedOptions
from harness.options import build, click_options, multi_value_flags
from harness.records import store as records
from harness.records.rundir import FolderLock, Replacement, first_missing
from harness.reporting import html as html_report
from harness.reporting import report
from harness.reporting.compare import compare_command
from harness.reporting.leaderboard import leaderboard_command


class HarnessGroup(click.Group):
    """Loads plugins (with the group's ``--plugin-dir``) before listing or resolving a command."""

    def _registry(self, ctx: click.Context) -> Registry:
        registry = get_registry(ctx.params.get("plugin_dir") or ())
        if not registry.commands_added:
            registry.commands_added = True
            registry.pm.hook.register_commands(cli=self)
        return registry

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._registry(ctx)
        return sorted({*super().list_commands(ctx), *GENERATED_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        registry = self._registry(ctx)
        if name in GENERATED_COMMANDS:
            return GENERATED_COMMANDS[name](registry)
        return super().get_command(ctx, name)

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
    quiet_libraries()


def quiet_libraries() -> None:
    """diffusers/transformers log progress bars and notices on every load; harness reports instead.

    Set DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY to get them back.
    """
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_progress_bar()


BENCH_HELP = """Generate images with one or more samplers and time them under one protocol.

Example: harness bench --sampler flash-lcm --steps 2 4 8 --seed 42 --compare_baseline"""

EVAL_HELP = """Evaluate a trained LoRA against the baseline (the seed's eval_lora.sh).

The baseline (--baseline_steps 30, --baseline_guidance 7.5) and the student (--lora_path, each of --steps,
guidance 0) run through the same machinery as `harness bench --compare_baseline`: comparison grids,
records and the timing table.

Example: harness eval --lora_path ./checkpoints/my_lora_student/lora/final --steps 2 4 8 --seed 42"""

# The settings classes whose fields make the bench command's own options.
CORE_OPTIONS = (BenchOptions, TimingSettings, SpeedOptions)


@dataclass(frozen=True)
class PluginOption:
    """A plugin's option on the bench command: which plugins declare it (the same name may be shared)."""

    kind: str  # "sampler" or "metric"
    owners: tuple[str, ...]


def make_bench_command(registry: Registry, name: str = "bench", default_samplers: tuple[str, ...] = ("flash-lcm",),
                       always_compare: bool = False, help_text: str = BENCH_HELP) -> click.Command:
    params = [param for options_class in CORE_OPTIONS for param in click_options(options_class)]
    installed: dict[str, Mapping[str, object]] = {"samplers": registry.samplers, "metrics": registry.metrics}
    for param in params:
        if param.name == "samplers":
            param.default = default_samplers
        if param.name in installed:
            param.help = f"{param.help} Installed: {', '.join(sorted(installed[param.name])) or 'none'}."
    core_names = {param.name for param in params}
    # A plugin's own options join the command; their values reach the plugin typed, through its Options.
    plugin_options: dict[str, PluginOption] = {}
    for kind, table in (("sampler", registry.samplers), ("metric", registry.metrics)):
        for entry in table.values():
            for option in click_options(entry.cls.Options):
                if option.name in core_names:
                    raise HarnessError(f"{kind} '{entry.name}' ({entry.source}) declares option --{option.name}, "
                                       "which harness already has; rename it in the plugin.")
                if option.name in plugin_options:
                    known = plugin_options[option.name]
                    plugin_options[option.name] = PluginOption(known.kind, (*known.owners, entry.name))
                else:
                    plugin_options[option.name] = PluginOption(kind, (entry.name,))
                    params.append(option)

    def callback(**values: Any) -> None:
        context = click.get_current_context()
        given = {name for name in plugin_options
                 if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
        plugin_values = {name: values.pop(name) for name in plugin_options}
        options = build(BenchOptions, values)
        if always_compare:
            options = dataclasses.replace(options, compare_baseline=True)
        spec = build_spec(registry, options, build(TimingSettings, values), build(SpeedOptions, values),
                          plugin_values, {name: plugin_options[name] for name in given})
        run_bench(registry, spec, options)

    return MultiValueCommand(name, params=params, callback=callback, help=help_text,
                             multi_value=[flag for cls in CORE_OPTIONS for flag in multi_value_flags(cls)])


GENERATED_COMMANDS = {
    "bench": make_bench_command,
    "eval": lambda registry: make_bench_command(registry, "eval", ("local-student",), True, EVAL_HELP),
}


def build_spec(registry: Registry, options: BenchOptions, timing_settings: TimingSettings, speed: SpeedOptions,
               plugin_values: dict[str, Any], given: dict[str, PluginOption]) -> BenchSpec:
    """Check every option against the others before anything loads, and resolve them into a BenchSpec."""
    from harness.models import loading as models

    samplers = list(dict.fromkeys(options.samplers))
    for name in samplers:
        registry.sampler(name)
    for name in options.metrics:
        registry.metric(name)
    if options.compare_baseline and not any(registry.sampler(n).cls.is_baseline for n in samplers):
        samplers.append("vanilla-sd")
        registry.sampler("vanilla-sd")
    selected = {"sampler": set(samplers), "metric": set(options.metrics)}
    for name, option in given.items():
        if not selected[option.kind] & set(option.owners):
            owners = ", ".join(f"'{owner}'" for owner in option.owners)
            flag = "--sampler" if option.kind == "sampler" else "--metric"
            raise HarnessError(f"--{name.replace('_', '-')} is an option of {option.kind} {owners}, which this run "
                               f"does not use; add {flag} {option.owners[0]}, or leave the option out.")
    for side, value in (("height", options.height), ("width", options.width)):
        if value is not None and value % 8:
            raise HarnessError(f"--{side} {value} is not a multiple of 8; pick e.g. {value // 8 * 8 or 8}.")
    if options.batch is not None and options.num_images % options.batch:
        raise HarnessError(f"--num_images {options.num_images} is not a multiple of --batch {options.batch}; "
                           "make it one, so every call has the same size.")
    if options.prompt is not None and options.prompts_file is not None:
        raise HarnessError("pass either --prompt or --prompts, not both.")
    prompts: list[str] = []
    if options.prompts_file is not None:
        prompts = load_prompts(options.prompts_file)
    elif options.prompt is not None:
        if not options.prompt.strip():
            raise HarnessError("--prompt is empty; give the text to draw.")
        prompts = [options.prompt]
    if options.seed is not None and options.seed + max(len(prompts), 1) * options.num_images - 1 > MAX_SEED:
        raise HarnessError(f"--seed {options.seed} is too large: image i of prompt p draws from seed + p * "
                           f"num_images + i, which must stay at most 2**64-1; pick a smaller --seed.")

    model_name = options.model or models.default_model_name(models.resolve_device(options.device))
    outdir = options.outdir
    if outdir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        outdir = str(Path("results") / f"{stamp}-{'-'.join(samplers)}")
    baseline_outdir = Path(options.baseline_outdir) if options.baseline_outdir else None
    if baseline_outdir is not None:
        _check_baseline_path(baseline_outdir, Path(outdir))
    sampler_options = {name: build(registry.sampler(name).cls.Options, plugin_values) for name in samplers}
    metric_options = {name: build(registry.metric(name).cls.Options, plugin_values) for name in options.metrics}
    return BenchSpec(
        samplers=tuple(samplers), steps=tuple(dict.fromkeys(options.steps)), prompts=tuple(prompts), model=model_name,
        outdir=Path(outdir), num_images=options.num_images, seed=options.seed,
        baseline_steps=options.baseline_steps, baseline_guidance=options.baseline_guidance,
        baseline_outdir=baseline_outdir,
        lora_path=options.lora_path, lora_id=options.lora_id, device=options.device, dtype=options.dtype,
        height=options.height, width=options.width, timing=timing_settings, speed=speed, batch=options.batch,
        sampler_options=sampler_options, metrics=tuple(dict.fromkeys(options.metrics)), metric_options=metric_options,
    )


def run_bench(registry: Registry, spec: BenchSpec, options: BenchOptions) -> None:
    """One process, or one of several started by torchrun / accelerate launch (see harness.bench.distributed)."""
    world = distributed.world_from_env()
    try:
        launch_bench(registry, spec, options, world)
    except HarnessError as error:
        if world.is_main:
            raise
        if not isinstance(error, distributed.ProcessLost):
            sys.exit(error.exit_code)  # rank 0 says why: the same bad input, or a failure all ranks were told about
        error.message = world.label(world.rank) + error.message  # this rank lost rank 0, which cannot say so
        raise


def launch_bench(registry: Registry, spec: BenchSpec, options: BenchOptions, world: distributed.World) -> None:
    """The plan for --dry-run; otherwise the run folder (locked, an earlier run moved aside) and the run."""
    if options.dry_run:  # the plan only: no model is resolved or loaded
        if world.is_main:
            tasks = plan(spec, registry, default_prompt="", seed=spec.seed or 0).tasks
            click.echo(json.dumps({"spec": spec.config_dict(spec.seed, spec.prompts),
                                   "tasks": [dataclasses.asdict(task) for task in tasks]}, indent=2, default=str))
        return

    lock = FolderLock(spec.outdir, "--outdir")
    locks = [lock]
    # Runs may share a --baseline_outdir: it gets its own lock, unless it is the run folder itself.
    if spec.baseline_outdir is not None and spec.baseline_outdir.resolve() != spec.outdir.resolve():
        locks.append(FolderLock(spec.baseline_outdir, "--baseline_outdir", "baseline folder"))
    replacement = Replacement(spec.outdir, _bench_entries(registry, spec.outdir))

    def start() -> BenchRun:
        # Resolves device and model first: a bad one leaves no empty folder behind.
        run = BenchRun(spec, registry, world=world)
        if world.is_main:
            created = [first_missing(held.folder) for held in locks]
            try:
                lock.acquire()  # held until this process ends the run: one run per folder
                _prepare_outdir(spec.outdir, options.overwrite, replacement)
                # After the move-aside: a baseline folder inside --outdir may have moved with the earlier run.
                for held in locks[1:]:
                    held.acquire()
                if spec.baseline_outdir is not None:
                    _check_baseline_folder(run, spec.baseline_outdir, options.overwrite)
                if options.html:
                    html_report.check_run_page(spec.outdir)  # before the run, not after it
            except BaseException:
                if replacement.pending:
                    replacement.restore()
                for held in locks:
                    held.release()
                for folder in created:
                    if folder is not None:
                        shutil.rmtree(folder, ignore_errors=True)
                raise
            run.on_loaded = replacement.commit  # the earlier run goes once the new one has a model
        return run

    with distributed.process_group(world):
        run = distributed.together(start, world)
        try:
            run_and_report(run, options, world)
        finally:
            if replacement.pending:  # not one sampler loaded: the earlier run stays
                replacement.restore()
                click.echo(f"The earlier run in '{spec.outdir}' was kept: no sampler of the new run loaded.", err=True)
            for held in locks:
                held.release()


def run_and_report(run: BenchRun, options: BenchOptions, world: distributed.World) -> None:
    """Measure with a progress bar, then print the table (and write the HTML page); exit codes as documented."""
    main = world.is_main  # rank 0 reports for every rank: the others' measurements and errors reach it
    if main and run.model.notice:
        click.echo(run.model.notice, err=True)
    quiet = options.quiet or not main
    if not quiet:
        processes = f"; {world.size} processes" if world.size > 1 else ""
        click.echo(f"model: {run.model.name} ({run.model.location}) on {run.device}, {run.dtype}{processes}; "
                   f"writing to {run.outdir}", err=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    with click.progressbar(length=len(run.tasks), label="bench", file=sys.stderr,
                           hidden=quiet, show_pos=True, item_show_func=lambda item: item) as bar:
        run.on_progress = lambda task: bar.update(1, f"{task.sampler} {task.steps} steps")
        run.on_warning = lambda warning: click.echo(f"\nWarning: {warning}", err=True)
        try:
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
        except HarnessError:
            finished = []  # not one whole record reached the file
    if options.html:
        _warn(html_report.write_run_page(run.outdir, finished))
    if options.as_json:
        click.echo(records.dump(finished))
    else:
        click.echo(report.summary_table(finished))
        written = "records, images, summary.md and index.html" if options.html else "records, images and summary.md"
        click.echo(f"\n{written} in {run.outdir}", err=True)
    if interrupted:
        click.echo(f"interrupted: {len(finished)} finished measurement(s) kept in {run.records_path}", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    if run.errors:
        for error in run.errors:
            click.echo(f"Error: {error}", err=True)
        sys.exit(ExitCode.FAILED)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _is_run_file(name: str) -> bool:
    """Whether a bench run writes a file of this name into --outdir."""
    from harness.reporting.plots import LATENCY_PLOT, QUALITY_PLOT

    fixed = (records.RECORDS_FILE, records.SUMMARY_FILE, LATENCY_PLOT, QUALITY_PLOT, html_report.HTML_FILE)
    return name in fixed or RUN_IMAGE.fullmatch(name) is not None


def _bench_entries(registry: Registry, outdir: Path) -> Callable[[str], bool]:
    """Whether an entry of --outdir is a bench run's (what --overwrite replaces): its files and its baseline and
    sampler subfolders; never a user's other files (--outdir may be a project folder, with a page of its own)."""
    folders = {"baseline", *registry.samplers}

    def owned(name: str) -> bool:
        if name == html_report.HTML_FILE:
            return html_report.replaceable(outdir / name)
        return name in folders or _is_run_file(name)

    return owned


def _resolved(folder: Path, option: str) -> Path:
    try:
        return folder.resolve()
    except (RuntimeError, OSError):  # Python's own symbolic-link loop, or a name the system refuses
        raise HarnessError(f"cannot write to '{folder}': it leads into a loop of symbolic links (or is no valid "
                           f"path); pass another {option}.") from None


def _check_baseline_path(folder: Path, outdir: Path) -> None:
    """A --baseline_outdir inside --outdir must not be (or lie in) a file the run writes there."""
    try:
        inside = _resolved(folder, "--baseline_outdir").relative_to(_resolved(outdir, "--outdir")).parts
    except ValueError:
        return
    if inside and _is_run_file(inside[0]):
        raise HarnessError(f"cannot write to baseline folder '{folder}': the run writes its file '{inside[0]}' "
                           "there; pass another --baseline_outdir.")


def _check_baseline_folder(run: BenchRun, folder: Path, overwrite: bool) -> None:
    """Refuse to replace baseline images another run's records may describe, unless --overwrite."""
    existing = next((path for path in run.baseline_files() if path.exists() or path.is_symlink()), None)
    if existing is not None and not overwrite:
        raise HarnessError(f"'{folder}' already holds baseline images ({existing.name}); pass a new "
                           "--baseline_outdir or add --overwrite to replace them.")


def _prepare_outdir(outdir: Path, overwrite: bool, replacement: Replacement) -> None:
    """Refuse a folder that holds a run (or move that run aside with --overwrite) and check it is writable."""
    notice = replacement.recover()
    if notice is not None:
        click.echo(notice, err=True)
    existing = outdir / records.RECORDS_FILE
    if existing.exists() or existing.is_symlink():
        if not overwrite:
            raise HarnessError(f"'{outdir}' already holds a run ({records.RECORDS_FILE}); "
                               "pass a new --outdir or add --overwrite to replace it.")
        replacement.move_aside()
    try:
        probe = outdir / ".harness-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise HarnessError(f"cannot write to output folder '{outdir}': {error.strerror}; "
                           "pass a writable --outdir.") from None


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
        click.echo(
            tabulate(
                [list(row.values()) for row in rows],
                headers=["name", "kind", "source", "description"],
                tablefmt="github",
            )
        )


cli.add_command(compare_command)
cli.add_command(leaderboard_command)
cli.add_command(train)


def main() -> None:
    """The entry point of installs made before ``harness.cli.main`` existed (their ``harness`` script calls it)."""
    from harness.cli.main import main as launch

    launch()
