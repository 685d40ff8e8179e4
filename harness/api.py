"""The Python API: ``harness.bench(...)`` and ``harness.train(plugin, ...)``, the commands without a shell.

Keywords are the command-line options' names (``sampler``, ``steps``, ``num_images``, ``prompts``, ``metric``,
a plugin's own options...), values are Python values (a list or a single value for an option that takes
several). Both functions apply exactly the command line's checks - they call the same functions
(:mod:`harness.benchmark.launch`, the trainer's own checks) - so a bad input raises the one-line
:class:`~harness.errors.HarnessError` the command would print, a folder that holds a run is refused unless
``overwrite=True``, and two runs never share a folder. They print nothing: no progress bars, no library
notices; pass ``on_progress`` / ``on_step`` to follow a run.

    import harness

    records = harness.bench(sampler=["flash-lcm"], steps=[2, 4], prompt="a red circle", seed=1,
                            warmup=0, repeats=1, outdir="run")
    print(records[0].measured.timing.seconds_per_image)
    result = harness.train("distill", data_dir="shapes", max_steps=10, output_dir="ckpt")
    print(result.final)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.benchmark.plan import Task
    from harness.hooks.registry import Registry
    from harness.records.schema import Record
    from harness.training.state import StepReport

log = logging.getLogger("harness")

# Options of `harness bench` that are about what the command prints; a Python caller has the return value.
PRINTING_ONLY = {"as_json": "read the returned records", "quiet": "the API prints nothing",
                 "dry_run": "call harness.benchmark.launch.build_spec and harness.benchmark.plan.plan"}


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` made: the final weights' folder, the run folder, and the command that benchmarks them."""

    final: Path
    run_dir: Path
    benchmark_command: str


def bench(*, registry: Registry | None = None, on_progress: Callable[[Task], None] | None = None,
          on_warning: Callable[[str], None] | None = None, **options: Any) -> list[Record]:
    """Run ``harness bench`` with these options; return the run's records (one per sampler and step count).

    A measurement that failed is a record with ``error`` set, as in ``records.jsonl``; the run goes on with
    the others. ``on_progress(task)`` is called after each measurement, ``on_warning(text)`` for each warning
    (by default they go to the ``harness`` logger). ``registry`` defaults to the installed plugins.
    """
    from harness.benchmark import distributed, launch
    from harness.benchmark.spec import BenchOptions
    from harness.benchmark.timing import TimingSettings
    from harness.hooks.registry import get_registry
    from harness.models.loading import quiet_libraries
    from harness.models.speed import SpeedOptions
    from harness.options import build, click_options
    from harness.reporting import html as html_report

    registry = registry if registry is not None else get_registry()
    core = [param for options_class in launch.CORE_OPTIONS for param in click_options(options_class)]
    owners, plugin_params = launch.plugin_options(registry, {param.name for param in core if param.name})
    params = [*core, *plugin_params]
    by_keyword = keyword_map(params)
    named = {keyword: by_keyword[keyword].name for keyword in options if keyword in by_keyword}
    for keyword, name in named.items():
        if name in PRINTING_ONLY:
            raise HarnessError(f"harness.bench() has no {keyword}= option ({PRINTING_ONLY[name]}); leave it out.")
    values = parse_keywords("harness.bench()", params, options)
    plugin_values = {name: values.pop(name) for name in owners}
    bench_options = build(BenchOptions, values)
    given = {name: owners[name] for name in owners if name in named.values()}  # a plugin option not left at default
    spec = launch.build_spec(registry, bench_options, build(TimingSettings, values), build(SpeedOptions, values),
                             plugin_values, given)
    quiet_libraries()
    warn = on_warning or log.warning
    world = distributed.world_from_env()
    with launch.prepared_run(registry, spec, bench_options, world, notify=log.info) as run:
        run.on_warning = warn
        if on_progress is not None:
            run.on_progress = on_progress
        run.run()
    if bench_options.html and world.is_main:
        for warning in html_report.write_run_page(run.outdir, run.records):
            warn(warning)
    if run.unwritten:  # the records are whole on disk; what could not be written is one line, as on the CLI
        from harness.reporting.report import unwritten

        raise HarnessError(f"{unwritten(run.outdir, run.unwritten)}; free some space or make the run folder "
                           f"writable. The records are in {run.records_path}.")
    return list(run.records)


def train(plugin: str, *, registry: Registry | None = None, on_step: Callable[[StepReport], None] | None = None,
          **options: Any) -> TrainResult:
    """Run ``harness train --plugin PLUGIN`` with these options (the trainer's own, by name); return what it made.

    ``on_step(report)`` is called after each optimisation step with the step, loss and learning rate.
    """
    from harness.hooks.registry import get_registry
    from harness.models.loading import quiet_libraries
    from harness.options import click_options
    from harness.training.config import check_run_name

    registry = registry if registry is not None else get_registry()
    entry = registry.trainer(plugin)
    config_class = entry.cls.config_class
    values = parse_keywords(f"harness.train({plugin!r})", list(click_options(config_class)), options)
    check_run_name(values["run_name"])
    quiet_libraries()
    trainer = entry.cls(config_class(**values), plugin_manager=registry.pm, on_step=on_step or (lambda _: None),
                        notify=log.info)
    final = trainer.train()
    return TrainResult(final=Path(final), run_dir=Path(trainer.run_dir),
                       benchmark_command=trainer.benchmark_command(final))


def parse_keywords(caller: str, params: list[click.Parameter], keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Option values by field name, from keywords named as the command-line flags, each checked as click checks it.

    A keyword is a flag without its dashes, in either spelling (``num_images``, ``sampler``); the field name
    (``samplers``) is taken too. Options not given take their defaults.
    """
    by_keyword = keyword_map(params)
    ctx = click.Context(click.Command(caller))
    values: dict[str, Any] = {param.name: param.get_default(ctx) for param in params if param.name}
    for keyword, value in keywords.items():
        found = by_keyword.get(keyword)
        if found is None:
            close = ", ".join(sorted(k for k in by_keyword if k[:3] == keyword[:3])[:3])
            hint = f"did you mean {close}?" if close else "the command's --help lists the options"
            raise HarnessError(f"{caller} has no option {keyword}=; {hint}")
        param = found
        assert param.name is not None
        if isinstance(param, click.Option) and param.is_flag and keyword in _secondary(param):
            value = not value  # no_fuse=True is fuse=False
        if param.multiple and (isinstance(value, (str, bytes)) or not isinstance(value, Iterable)):
            value = (value,)
        try:
            values[param.name] = param.type_cast_value(ctx, value)
        except click.BadParameter as error:
            raise HarnessError(f"{keyword}={value!r}: {error.message}") from None
    return values


def keyword_map(params: Iterable[click.Parameter]) -> dict[str, click.Parameter]:
    """Each keyword a caller may pass, to its parameter: every flag without its dashes, in either spelling, and
    the field name."""
    by_keyword: dict[str, click.Parameter] = {}
    for param in params:
        for flag in [*param.opts, *param.secondary_opts]:
            if flag.startswith("-"):
                by_keyword.setdefault(_keyword(flag), param)
        if param.name:
            by_keyword.setdefault(param.name, param)
    return by_keyword


def _keyword(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _secondary(param: click.Option) -> set[str]:
    return {_keyword(flag) for flag in param.secondary_opts}
