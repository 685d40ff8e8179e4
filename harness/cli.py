"""The ``harness`` command line: bench, report, plugins, plus whatever plugins add."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from tabulate import tabulate

from harness import __version__, distributed, records, report
from harness.compare import compare_command
from harness.errors import HarnessError
from harness.plugins import PLUGIN_DIRS_ENV, get_registry
from harness.prompts import load_prompts
from harness.speed import ATTENTION_CHOICES, SpeedOptions
from harness.timing import TimingSettings

_NUMBER = re.compile(r"-?\d+(\.\d+)?")


class MultiValueCommand(click.Command):
    """Lets ``--steps 2 4 8`` mean ``--steps 2 --steps 4 --steps 8`` for options marked multi-value.

    Click has no options with a variable number of values, so the arguments are rewritten before
    click parses them; a repeated flag keeps working too.
    """

    def __init__(self, *args, multi_value: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.multi_value = set(multi_value)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value(args, self.multi_value))


def expand_multi_value(args: list[str], flags: set[str]) -> list[str]:
    expanded: list[str] = []
    flag, has_value = None, False
    for index, arg in enumerate(args):
        if arg == "--":
            return expanded + args[index:]
        if flag and (not arg.startswith("-") or _NUMBER.fullmatch(arg)):
            if has_value:
                expanded.append(flag)
            expanded.append(arg)
            has_value = True
            continue
        flag, has_value = None, False
        name, _, value = arg.partition("=")
        if name in flags:
            flag, has_value = name, bool(value)
        expanded.append(arg)
    return expanded


class HarnessGroup(click.Group):
    """Loads plugins (with the group's ``--plugin-dir``) before listing or resolving a command."""

    def _registry(self, ctx: click.Context):
        registry = get_registry(ctx.params.get("plugin_dir") or ())
        if not getattr(registry, "commands_added", False):
            registry.commands_added = True
            registry.pm.hook.register_commands(cli=self)
        return registry

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._registry(ctx)
        return sorted({*super().list_commands(ctx), *GENERATED_COMMANDS})

    def get_command(self, ctx: click.Context, name: str):
        registry = self._registry(ctx)
        if name in GENERATED_COMMANDS:
            return GENERATED_COMMANDS[name](registry)
        return super().get_command(ctx, name)


@click.group(cls=HarnessGroup)
@click.version_option(__version__, prog_name="harness")
@click.option("--plugin-dir", "plugin_dir", multiple=True, type=click.Path(file_okay=False),
              help=f"Also load every *.py plugin file in this folder (repeatable; or set {PLUGIN_DIRS_ENV}).")
def cli(plugin_dir):
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


def main() -> None:
    cli(prog_name="harness")


def _alias(name: str) -> tuple[str, ...]:
    """Both the click-style and the seed's spelling: ("--num-images", "--num_images")."""
    dashed = "--" + name.replace("_", "-")
    return (dashed,) if "_" not in name else (dashed, "--" + name)


BENCH_HELP = """Generate images with one or more samplers and time them under one protocol.

Example: harness bench --sampler flash-lcm --steps 2 4 8 --seed 42 --compare_baseline"""

EVAL_HELP = """Evaluate a trained LoRA against the baseline (the seed's eval_lora.sh).

The baseline (--baseline_steps 30, --baseline_guidance 7.5) and the student (--lora_path, each of --steps,
guidance 0) run through the same machinery as `harness bench --compare_baseline`: comparison grids,
records and the timing table.

Example: harness eval --lora_path ./checkpoints/my_lora_student/lora/final --steps 2 4 8 --seed 42"""


def make_bench_command(registry, name: str = "bench", default_samplers: tuple[str, ...] = ("flash-lcm",),
                       always_compare: bool = False, help_text: str = BENCH_HELP) -> click.Command:
    params = [
        click.Option(["--sampler", "-s", "samplers"], multiple=True, default=default_samplers, show_default=True,
                     help="Sampler(s) to run; several values after one flag or a repeated flag. "
                          f"Installed: {', '.join(sorted(registry.samplers))}."),
        click.Option(["--prompt"], help="Text prompt (default: a prompt suited to the model)."),
        click.Option(["--prompts", "prompts_file"], metavar="FILE|SET",
                     help="File of prompts (one per line, or JSONL with a 'prompt' field) or a built-in set: "
                          "held-out (the embedded model's 64 evaluation prompts), seed (the demo's prompts)."),
        click.Option(["--steps"], multiple=True, type=click.IntRange(min=1), default=(2, 4, 8), show_default=True,
                     help="Inference steps of the few-step samplers, e.g. --steps 2 4 8."),
        click.Option(["--seed"], type=int, help="Random seed; also put into file names, as the seed demo does."),
        click.Option(["--outdir"], type=click.Path(file_okay=False),
                     help="Output folder (default: a new results/<UTC time>-<samplers>/)."),
        click.Option([*_alias("num_images"), "num_images"], type=click.IntRange(min=1), default=1, show_default=True,
                     help="Images per prompt and step setting."),
        click.Option([*_alias("compare_baseline"), "compare_baseline"], is_flag=True,
                     help="Also run vanilla-sd and write comparison grids (baseline top, few-step bottom)."),
        click.Option([*_alias("baseline_steps"), "baseline_steps"], type=click.IntRange(min=1), default=30,
                     show_default=True, help="Steps of baseline samplers."),
        click.Option([*_alias("baseline_guidance"), "baseline_guidance"], type=click.FloatRange(min=0), default=7.5,
                     show_default=True, help="Guidance scale of baseline samplers."),
        click.Option([*_alias("baseline_outdir"), "baseline_outdir"], type=click.Path(file_okay=False),
                     help="Folder for baseline images (default: OUTDIR/baseline)."),
        click.Option([*_alias("lora_path"), "lora_path"],
                     help="Local LoRA folder or .safetensors file; takes precedence over --lora_id."),
        click.Option([*_alias("lora_id"), "lora_id"],
                     help="Hub LoRA id (default: jasperai/flash-sd on SD 1.5, the shipped LoRA on embedded)."),
        click.Option(["--model"], help="sd15, sd15-arch (random weights, timing only), embedded, a hub id or a "
                                       "diffusers folder "
                                       "(default: sd15 with CUDA, else embedded)."),
        click.Option(["--dtype"], type=click.Choice(["float16", "bfloat16", "float32", "fp16", "bf16", "fp32"]),
                     help="Default: float16 on CUDA, float32 elsewhere."),
        click.Option(["--device"], help="cpu, cuda, cuda:N or mps (default: cuda when available)."),
        click.Option(["--height"], type=click.IntRange(min=8), help="Image height in pixels, a multiple of 8."),
        click.Option(["--width"], type=click.IntRange(min=8), help="Image width in pixels, a multiple of 8."),
        click.Option(["--warmup"], type=click.IntRange(min=0), default=2, show_default=True,
                     help="Unrecorded calls after the first call."),
        click.Option(["--repeats"], type=click.IntRange(min=1), default=5, show_default=True,
                     help="Measured passes over the prompts."),
        click.Option([*_alias("min_time"), "min_time"], type=click.FloatRange(min=0), default=0.0,
                     help="Keep measuring until this many seconds are recorded."),
        click.Option(["--metric", "metrics"], multiple=True,
                     help="Quality metric(s) scored on every measurement's images, outside the timed region "
                          f"(several values or a repeated flag). Installed: {', '.join(sorted(registry.metrics))}."),
        click.Option(["--batch"], type=click.IntRange(min=1),
                     help="Images per pipeline call (default: all --num_images in one call)."),
        click.Option(["--compile"], is_flag=True,
                     help="torch.compile the UNet and VAE decoder (compile time lands in first_call_s)."),
        click.Option([*_alias("channels_last"), "channels_last"], is_flag=True,
                     help="Channels-last memory format for the UNet and VAE."),
        click.Option(["--attention"], type=click.Choice(ATTENTION_CHOICES), default="default", show_default=True,
                     help="Attention kernel: diffusers' default, torch SDPA, or plain matmul + softmax."),
        click.Option([*_alias("no_fuse"), "no_fuse"], is_flag=True,
                     help="Keep the LoRA unfused (to measure what fusing buys)."),
        click.Option([*_alias("vae_slicing"), "vae_slicing"], is_flag=True, help="Decode a batch one image at a time."),
        click.Option([*_alias("vae_tiling"), "vae_tiling"], is_flag=True, help="Decode large images tile by tile."),
        click.Option(["--overwrite"], is_flag=True, help="Replace the records of an earlier run in --outdir."),
        click.Option(["--dry-run"], is_flag=True, help="Print the plan as JSON and exit without loading models."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the records as JSON instead of the table."),
        click.Option(["--quiet", "-q"], is_flag=True, help="No progress bar."),
    ]
    core_names = {param.name for param in params}
    # A plugin's own options join the command; their values reach the plugin by parameter name.
    declared: dict[str, list[str]] = {"sampler": [], "metric": []}
    for kind, table in (("sampler", registry.samplers), ("metric", registry.metrics)):
        for entry in table.values():
            for option in getattr(entry.cls, "options", []):
                if option.name in core_names:
                    raise HarnessError(f"{kind} '{entry.name}' ({entry.source}) declares option --{option.name}, "
                                       "which harness already has; rename it in the plugin.")
                if all(option.name not in names for names in declared.values()):
                    declared[kind].append(option.name)
                    params.append(option)

    def callback(**values: Any) -> None:
        plugin_values = {kind: {option: values.pop(option) for option in names} for kind, names in declared.items()}
        values["compare_baseline"] = values["compare_baseline"] or always_compare
        run_bench(registry, values, plugin_values)

    return MultiValueCommand(name, params=params, callback=callback, multi_value=("--sampler", "-s", "--steps", "--metric"),
                             help=help_text)


GENERATED_COMMANDS = {
    "bench": make_bench_command,
    "eval": lambda registry: make_bench_command(registry, "eval", ("local-student",), True, EVAL_HELP),
}


def build_spec(registry, values: dict[str, Any], plugin_values: dict[str, Any]):
    from harness import models
    from harness.runner import BenchSpec

    samplers = list(dict.fromkeys(values["samplers"]))
    for name in samplers:
        registry.sampler(name)
    for name in values["metrics"]:
        registry.metric(name)
    if values["compare_baseline"] and not any(registry.sampler(n).cls.is_baseline for n in samplers):
        samplers.append("vanilla-sd")
    for side in ("height", "width"):
        if values[side] is not None and values[side] % 8:
            raise HarnessError(f"--{side} {values[side]} is not a multiple of 8; pick e.g. {values[side] // 8 * 8 or 8}.")
    if values["batch"] is not None and values["num_images"] % values["batch"]:
        raise HarnessError(f"--num_images {values['num_images']} is not a multiple of --batch {values['batch']}; "
                           "make it one, so every call has the same size.")
    if values["prompt"] is not None and values["prompts_file"] is not None:
        raise HarnessError("pass either --prompt or --prompts, not both.")
    if values["prompts_file"] is not None:
        prompts = load_prompts(values["prompts_file"])
    elif values["prompt"] is not None:
        if not values["prompt"].strip():
            raise HarnessError("--prompt is empty; give the text to draw.")
        prompts = [values["prompt"]]
    else:
        prompts = None

    model_name = values["model"] or models.default_model_name(models.resolve_device(values["device"]))
    outdir = values["outdir"]
    if outdir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        outdir = Path("results") / f"{stamp}-{'-'.join(samplers)}"
    return BenchSpec(
        samplers=samplers, steps=list(dict.fromkeys(values["steps"])), prompts=prompts or [], model=model_name,
        outdir=Path(outdir), num_images=values["num_images"], seed=values["seed"],
        baseline_steps=values["baseline_steps"], baseline_guidance=values["baseline_guidance"],
        baseline_outdir=Path(values["baseline_outdir"]) if values["baseline_outdir"] else None,
        lora_path=values["lora_path"], lora_id=values["lora_id"], device=values["device"], dtype=values["dtype"],
        height=values["height"], width=values["width"],
        timing=TimingSettings(values["warmup"], values["repeats"], values["min_time"]),
        speed=SpeedOptions(compile=values["compile"], channels_last=values["channels_last"],
                           attention=values["attention"], fuse_lora=not values["no_fuse"],
                           vae_slicing=values["vae_slicing"], vae_tiling=values["vae_tiling"]),
        batch=values["batch"],
        sampler_options=plugin_values["sampler"],
        metrics=list(dict.fromkeys(values["metrics"])), metric_options=plugin_values["metric"],
    )


def run_bench(registry, values: dict[str, Any], plugin_values: dict[str, Any]) -> None:
    """One process, or one of several started by torchrun / accelerate launch (see harness.distributed)."""
    world = distributed.world_from_env()
    try:
        _run_bench(registry, values, plugin_values, world)
    except HarnessError as error:
        if world.is_main:
            raise
        if not isinstance(error, distributed.ProcessLost):
            sys.exit(error.exit_code)  # rank 0 says why: the same bad input, or a failure all ranks were told about
        error.message = world.label(world.rank) + error.message  # this rank lost rank 0, which cannot say so
        raise


def _run_bench(registry, values: dict[str, Any], plugin_values: dict[str, Any], world) -> None:
    from harness.runner import BenchRun, plan

    spec = build_spec(registry, values, plugin_values)
    if values["dry_run"]:
        if world.is_main:
            tasks = plan(spec, registry)
            click.echo(json.dumps({"spec": spec.config_dict(spec.seed), "tasks": [vars(t) for t in tasks]},
                                  indent=2, default=str))
        return

    def start():
        # Resolves device and model first: a bad one leaves no empty folder behind.
        run = BenchRun(spec, registry, world=world)
        if world.is_main:
            _prepare_outdir(spec.outdir, values["overwrite"])
        return run

    with distributed.process_group(world):
        _bench(distributed.together(start, world), values, world)


def _bench(run, values: dict[str, Any], world) -> None:
    main = world.is_main  # rank 0 reports for every rank: the others' measurements and errors reach it
    if main and run.model.notice:
        click.echo(run.model.notice, err=True)
    quiet = values["quiet"] or not main
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
            sys.exit(130)
        return
    if interrupted and run.records_path.is_file():
        # A signal can land between a record's line and the in-memory list or summary.md: the file is the truth.
        run.records = report.rebuild(run.outdir)
    if values["as_json"]:
        click.echo(records.dump(run.records))
    else:
        click.echo(report.summary_table(run.records))
        click.echo(f"\nrecords, images and summary.md in {run.outdir}", err=True)
    if interrupted:
        click.echo(f"interrupted: {len(run.records)} finished measurement(s) kept in {run.records_path}", err=True)
        sys.exit(130)
    if run.errors:
        for error in run.errors:
            click.echo(f"Error: {error}", err=True)
        sys.exit(1)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _prepare_outdir(outdir: Path, overwrite: bool) -> None:
    existing = outdir / records.RECORDS_FILE
    if existing.exists():
        if not overwrite:
            raise HarnessError(f"'{outdir}' already holds a run ({records.RECORDS_FILE}); "
                               "pass a new --outdir or add --overwrite to replace it.")
        existing.unlink()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / ".harness-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise HarnessError(f"cannot write to output folder '{outdir}': {error.strerror}; pass a writable --outdir.") from None


@cli.command(name="report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report_command(run_dir):
    """Rebuild summary.md and every grid of RUN_DIR from its records.jsonl alone."""
    run_records = report.rebuild(Path(run_dir))
    click.echo(report.summary_table(run_records))


@cli.command(name="plugins")
@click.option("--all", "show_all", is_flag=True, help="Also list every loaded plugin module and its hooks.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def plugins_command(ctx, show_all, as_json):
    """List installed samplers, trainers and metrics, and where they came from."""
    registry = get_registry(ctx.parent.params.get("plugin_dir") or ())
    rows = [
        {"name": entry.name, "kind": entry.kind, "source": entry.source, "description": entry.description}
        for table in (registry.samplers, registry.trainers, registry.metrics) for entry in table.values()
    ]
    rows += [{"name": info.name, "kind": "broken", "source": info.source, "description": info.error}
             for info in registry.broken()]
    if show_all:
        rows += [{"name": info.name, "kind": "plugin", "source": info.source, "description": ", ".join(info.hooks)}
                 for info in registry.plugins.values() if not info.error]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(tabulate([list(row.values()) for row in rows], headers=["name", "kind", "source", "description"],
                            tablefmt="github"))


cli.add_command(compare_command)

from harness.train_cli import train  # noqa: E402 - last, because train_cli uses this module's helpers

cli.add_command(train)
