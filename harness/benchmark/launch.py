"""From parsed options to a run folder ready to measure into: every check of ``harness bench`` in one place.

The command line and the Python API (``harness.bench()``) both come through here, so they refuse the same
inputs with the same :class:`~harness.errors.HarnessError`, take the same locks and follow the same
overwrite rules: :func:`build_spec` checks the options against each other and the installed plugins;
:func:`prepared_run` locks the run folder, moves an earlier run aside (``--overwrite``) or refuses it, and
gives the run back to the caller, which measures and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.benchmark import distributed
from harness.benchmark.plan import RUN_IMAGE
from harness.benchmark.prompts import lone_surrogate
from harness.benchmark.runner import BenchRun
from harness.benchmark.spec import AUTO_ALL_IMAGES, MAX_SEED, BenchOptions, BenchSpec
from harness.benchmark.suites import load_prompt_set
from harness.benchmark.timing import TimingSettings
from harness.errors import HarnessError
from harness.models.speed import SpeedOptions
from harness.options import build, click_options
from harness.records import store as records
from harness.records.rundir import Replacement, RunFolder
from harness.reporting import html as html_report

if TYPE_CHECKING:
    from harness.hooks.registry import Registry

# The settings classes whose fields make the bench command's own options (and the keywords of harness.bench()).
CORE_OPTIONS = (BenchOptions, TimingSettings, SpeedOptions)


@dataclass(frozen=True)
class PluginOption:
    """A plugin's option on the bench command: which plugins declare it (the same name may be shared)."""

    kind: str  # "sampler" or "metric"
    owners: tuple[str, ...]


def plugin_options(registry: Registry, core_names: set[str]) -> tuple[dict[str, PluginOption], list[Any]]:
    """The options the installed samplers and metrics add to the command, and their click parameters.

    The same name may be declared by several plugins (they share the option); a name harness already has is
    refused, naming the plugin.
    """
    owners: dict[str, PluginOption] = {}
    params = []
    for kind, table in (("sampler", registry.samplers), ("metric", registry.metrics)):
        for entry in table.values():
            for option in click_options(entry.cls.Options):
                if option.name in core_names:
                    raise HarnessError(f"{kind} '{entry.name}' ({entry.source}) declares option --{option.name}, "
                                       "which harness already has; rename it in the plugin.")
                if option.name in owners:
                    known = owners[option.name]
                    owners[option.name] = PluginOption(known.kind, (*known.owners, entry.name))
                else:
                    owners[option.name] = PluginOption(kind, (entry.name,))
                    params.append(option)
    return owners, params


def build_spec(registry: Registry, options: BenchOptions, timing_settings: TimingSettings, speed: SpeedOptions,
               plugin_values: dict[str, Any], given: dict[str, PluginOption]) -> BenchSpec:
    """Check every option against the others before anything loads, and resolve them into a BenchSpec."""
    from harness.models import loading as models  # torch: only once the options are known to be sound

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
    prompt_suite = None
    if options.prompts_file is None and (options.prompt_column, options.prompt_count, options.prompt_source) != (
            None, None, None):
        raise HarnessError("--prompt_column, --prompt_count and --prompt_source choose the prompts of --prompts; "
                           "pass --prompts FILE or a suite (e.g. --prompts coco2017-5k), or leave them out.")
    if options.prompts_file is not None:
        prompt_set = load_prompt_set(options.prompts_file, options.prompt_column, options.prompt_seed,
                                     options.prompt_count, options.prompt_source)
        prompts, prompt_suite = prompt_set.prompts, prompt_set.suite
    elif options.prompt is not None:
        if not options.prompt.strip():
            raise HarnessError("--prompt is empty; give the text to draw.")
        surrogate = lone_surrogate(options.prompt)
        if surrogate is not None:
            raise HarnessError(f"--prompt holds a byte that is not UTF-8 text (kept as {surrogate}); set the terminal "
                               "to UTF-8, or put the prompt in a UTF-8 --prompts file.")
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
    images = max(len(prompts), 1) * options.num_images
    save_images = options.save_images or ("all" if images <= AUTO_ALL_IMAGES else "grids")
    sampler_options = {name: build(registry.sampler(name).cls.Options, plugin_values) for name in samplers}
    metric_options = {name: build(registry.metric(name).cls.Options, plugin_values) for name in options.metrics}
    return BenchSpec(
        samplers=tuple(samplers), steps=tuple(dict.fromkeys(options.steps)), prompts=tuple(prompts), model=model_name,
        prompt_suite=prompt_suite,
        outdir=Path(outdir), num_images=options.num_images, seed=options.seed,
        baseline_steps=options.baseline_steps, baseline_guidance=options.baseline_guidance,
        baseline_outdir=baseline_outdir,
        lora_path=options.lora_path, lora_id=options.lora_id, device=options.device, dtype=options.dtype,
        height=options.height, width=options.width, timing=timing_settings, speed=speed, batch=options.batch,
        sampler_options=sampler_options, metrics=tuple(dict.fromkeys(options.metrics)), metric_options=metric_options,
        save_images=save_images, reference=Path(options.reference) if options.reference else None,
        reference_stats=_reference_stats(options.reference_stats),
        save_stats=Path(options.save_stats) if options.save_stats else None,
    )


def _reference_stats(given: tuple[str, ...]) -> dict[str, Path]:
    """--reference_stats METRIC=FILE values by metric; one file per metric."""
    by_metric: dict[str, Path] = {}
    for value in given:
        name, equals, path = value.partition("=")
        if not equals or not name.strip() or not path.strip():
            raise HarnessError(f"--reference_stats {value!r} is not METRIC=FILE; e.g. --reference_stats "
                               "fid=coco2017_val.npz.")
        if name.strip() in by_metric:
            raise HarnessError(f"--reference_stats names {name.strip()} twice; give one file per metric.")
        by_metric[name.strip()] = Path(path.strip())
    return by_metric


@contextmanager
def prepared_run(registry: Registry, spec: BenchSpec, options: BenchOptions, world: distributed.World,
                 notify: Callable[[str], None]) -> Iterator[BenchRun]:
    """The run, its folder locked (an earlier run moved aside with ``--overwrite``, or refused), every process in
    the process group; on leaving, the earlier run is restored if no sampler of the new one loaded, and the locks
    are released. ``notify`` receives what a user should read (a recovered folder, a kept earlier run)."""
    run_folder = RunFolder(spec.outdir, "--outdir", _bench_entries(registry, spec.outdir), notify)
    folders = [run_folder]
    # Runs may share a --baseline_outdir: it gets its own lock, unless it is the run folder itself.
    if spec.baseline_outdir is not None and spec.baseline_outdir.resolve() != spec.outdir.resolve():
        folders.append(RunFolder(spec.baseline_outdir, "--baseline_outdir", (), notify, "baseline folder"))

    def start() -> BenchRun:
        # Resolves device and model first: a bad one leaves no empty folder behind.
        run = BenchRun(spec, registry, world=world)
        if world.is_main:
            try:
                run_folder.acquire()  # held until this process ends the run: one run per folder
                _prepare_outdir(spec.outdir, options.overwrite, run_folder.replacement)
                # After the move-aside: a baseline folder inside --outdir may have moved with the earlier run.
                for held in folders[1:]:
                    held.lock.acquire()
                if spec.baseline_outdir is not None:
                    _check_baseline_folder(run, spec.baseline_outdir, options.overwrite)
                if options.html:
                    html_report.check_run_page(spec.outdir)  # before the run, not after it
            except BaseException:
                for held in folders:
                    held.release()
                    held.remove_created()
                raise
            run.on_loaded = run_folder.replacement.commit  # the earlier run goes once the new one has a model
        return run

    with distributed.process_group(world):
        run = distributed.together(start, world)
        try:
            yield run
        finally:
            # Not one sampler loaded: the earlier run stays.
            run_folder.release(kept=f"The earlier run in '{spec.outdir}' was kept: no sampler of the new run loaded.")
            for held in folders[1:]:
                held.release()


def _is_run_file(name: str) -> bool:
    """Whether a bench run writes a file of this name into --outdir."""
    from harness.reporting.plots import LATENCY_PLOT, QUALITY_PLOT

    fixed = (records.RECORDS_FILE, records.SUMMARY_FILE, records.PROMPTS_FILE, LATENCY_PLOT, QUALITY_PLOT,
             html_report.HTML_FILE)
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
