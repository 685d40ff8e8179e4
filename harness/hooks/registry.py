"""Plugin discovery: built-in plugins, installed entry points and loose plugin files, one manager.

Built-in plugins are listed in ``DEFAULT_PLUGINS`` and registered by the same code path as the
third-party ones found in the ``harness`` entry-point group, so they get no special treatment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from harness.errors import HarnessError
from harness.hooks import specs as hookspecs
from harness.records.environment import PLUGIN_FAILURES, plugin_failure
from harness.records.schema import MAX_GUIDANCE
from harness.records.text import name_problem
from harness.version import __version__

if TYPE_CHECKING:
    from harness.benchmark.metric import Metric
    from harness.benchmark.sampler import Sampler
    from harness.training.trainer import Trainer

ENTRY_POINT_GROUP = "harness"
PLUGIN_DIRS_ENV = "HARNESS_PLUGINS"
TRACE_ENV = "HARNESS_TRACE_HOOKS"
#: The distribution the built-in plugins ship in.
DISTRIBUTION = "fewstep-harness"
VERSIONS_PLUGIN = "harness.plugin-versions"

DEFAULT_PLUGINS = (
    "harness_plugins.flash_lcm",
    "harness_plugins.vanilla_sd",
    "harness_plugins.local_student",
    "harness_plugins.distill",
    "harness_plugins.pretrain",
    "harness_plugins.undistilled",
    "harness_plugins.tcd",
    "harness_plugins.dpm_solver",
    "harness_plugins.lcm",
    "harness_plugins.flash",
    "harness_plugins.shapes",
    "harness_plugins.image_metrics",
    "harness_plugins.fidelity",
    "harness_plugins.clip_score",
    "harness_plugins.lab_distance",
    "harness_plugins.set_metrics",
    "harness_plugins.preference",
)


@dataclass
class PluginInfo:
    """Where a loaded (or broken) plugin came from."""

    name: str
    source: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    #: The installed distribution that holds it and its version (None for a loose plugin file).
    distribution: str | None = None
    version: str | None = None
    #: What the plugin registered before it broke, so asking for one of them names the broken plugin.
    registered: list[str] = field(default_factory=list)


class _PluginVersions:
    """Adds ``plugins`` to the environment block: each loaded plugin's source, distribution and version."""

    def __init__(self, plugins: dict[str, PluginInfo]):
        self.plugins = plugins

    @hookspecs.hookimpl
    def harness_machine_info(self, info: dict[str, Any]) -> None:
        info["plugins"] = {name: {"source": plugin.source, "distribution": plugin.distribution,
                                  "version": plugin.version}
                           for name, plugin in self.plugins.items() if plugin.error is None}


T = TypeVar("T")


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A sampler, trainer or metric class together with the plugin that registered it."""

    name: str
    kind: str
    cls: T
    source: str

    @property
    def description(self) -> str:
        return getattr(self.cls, "description", "") or ""


@dataclass(frozen=True)
class PluginKind:
    """One kind of plugin class: the hook that registers it and the base class it must fulfil."""

    kind: str
    hook: str
    base: type


def _plugin_kinds() -> tuple[PluginKind, ...]:
    # Imported here: these modules import torch and diffusers, which `harness --help` never needs.
    from harness.benchmark.metric import Metric
    from harness.benchmark.sampler import Sampler
    from harness.training.trainer import Trainer

    return (PluginKind("sampler", "register_samplers", Sampler), PluginKind("trainer", "register_trainers", Trainer),
            PluginKind("metric", "register_metrics", Metric))


def contract_problem(cls: Any, kind: PluginKind) -> str | None:
    """What ``cls`` lacks to be a ``kind`` plugin class, in words; None when it has everything."""
    if not isinstance(cls, type) or not issubclass(cls, kind.base):
        return f"{cls!r} is not a subclass of {kind.base.__module__}.{kind.base.__name__}"
    missing = [attribute for attribute in ("name", "description") if not getattr(cls, attribute, "")]
    if missing:
        return f"{kind.kind} class {cls.__name__} does not set {' or '.join(missing)}"
    # Names become folder and file names of a run (a sampler's, its file_label) and command-line words.
    label = getattr(cls, "file_label", "")
    problem = name_problem(getattr(cls, "name", None), kind.kind) or (
        name_problem(label, f"{kind.kind} file_label") if label else None)
    if problem is not None:
        return f"{kind.kind} class {cls.__name__}: {problem}; use letters, digits, '-', '_' or '.', e.g. my-sampler"
    guidance = getattr(cls, "default_guidance", 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        return (f"{kind.kind} class {cls.__name__} has default_guidance {guidance!r}, not a number from 0 to "
                f"{MAX_GUIDANCE:g}")
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    if abstract:
        return f"{kind.kind} class {cls.__name__} does not implement {', '.join(abstract)}"
    return _settings_problem(cls, kind.kind)


def _settings_problem(cls: type, kind: str) -> str | None:
    """Trainers declare their settings as a TrainConfig dataclass; samplers and metrics as an Options one."""
    from harness.options import Options
    from harness.training.config import TrainConfig

    attribute, base = ("config_class", TrainConfig) if kind == "trainer" else ("Options", Options)
    settings = getattr(cls, attribute, None)
    if not (isinstance(settings, type) and issubclass(settings, base) and dataclasses.is_dataclass(settings)):
        return (f"{kind} class {cls.__name__} has {attribute} {settings!r}, not a dataclass subclass of "
                f"{base.__module__}.{base.__name__}")
    return None


class Registry:
    """Everything the plugins registered, built once per process (or per ``--plugin-dir`` set).

    A plugin that fails (its import raises, a hook raises, or a class it registers breaks its contract) is
    listed as broken with the reason and takes no further part; every other plugin works as usual.
    """

    def __init__(self, plugin_dirs: Iterable[str | os.PathLike[str]] = ()):
        self.pm = hookspecs.plugin_manager()
        if os.environ.get(TRACE_ENV):
            self.pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
            self.pm.enable_tracing()
        self.plugins: dict[str, PluginInfo] = {}
        self.commands_added = False  # register_commands runs once per registry, when the CLI first needs it
        self.samplers: dict[str, Registered[type[Sampler]]] = {}
        self.trainers: dict[str, Registered[type[Trainer]]] = {}
        self.metrics: dict[str, Registered[type[Metric]]] = {}

        for module_name in DEFAULT_PLUGINS:
            self._register_import(module_name, module_name, "built-in", importlib.import_module,
                                  (DISTRIBUTION, __version__))
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
            self._register_import(entry_point.name, entry_point, source, lambda ep: ep.load(),
                                  (dist.name, dist.version) if dist is not None else (None, None))
        folders: dict[Path, Path] = {}
        for directory in plugin_dirs:
            folders.setdefault(Path(directory).resolve(), Path(directory))
        for directory in folders.values():  # each folder once, in the order first given
            for path in sorted(directory.glob("*.py")):
                # Two folders may each hold a plugins.py: the second loads too, named by its path.
                name = path.stem if path.stem not in self.plugins else str(path)
                self._register_import(name, path, f"file {path}", _import_file)

        # Every record and training config names the plugins that made it, with their versions.
        self.pm.register(_PluginVersions(self.plugins), name=VERSIONS_PLUGIN)
        tables: dict[str, dict[str, Any]] = {"sampler": self.samplers, "trainer": self.trainers,
                                             "metric": self.metrics}
        for kind in _plugin_kinds():
            self._collect(kind, tables[kind.kind])

    def _register_import(self, name: str, target: Any, source: str, importer: Callable[[Any], Any],
                         distribution: tuple[str | None, str | None] = (None, None)) -> None:
        if name in self.plugins:  # two installed distributions' entry points of one name: the second is refused
            refused = f"{name} ({source})"
            self.plugins[refused] = PluginInfo(refused, source, error=f"another plugin is named '{name}' "
                                               f"({self.plugins[name].source}); uninstall or rename one of them")
            return
        try:
            # A plugin that prints while it loads must not corrupt machine-readable output (--json) on stdout.
            with contextlib.redirect_stdout(sys.stderr):
                module = importer(target)
            self.pm.register(module, name=name)
        except PLUGIN_FAILURES as error:  # any failure in third-party code is reported, sys.exit() too
            self.plugins[name] = PluginInfo(name, source, error=plugin_failure(error))
            return
        hooks = sorted(caller.name for caller in self.pm.get_hookcallers(module) or [])
        self.plugins[name] = PluginInfo(name, source, hooks=hooks, distribution=distribution[0],
                                        version=distribution[1])

    def _collect(self, kind: PluginKind, into: dict[str, Any]) -> None:
        """Call ``kind.hook`` plugin by plugin, through the plugin manager (so tracing shows each call), to
        know which plugin registered which class and to drop only the plugin that fails."""
        for plugin_name, plugin in list(self.pm.list_name_plugin()):
            info = self.plugins.get(plugin_name)
            if info is None or info.error or kind.hook not in info.hooks:
                continue
            others = [other for other in self.pm.get_plugins() if other is not plugin]
            caller = self.pm.subset_hook_caller(kind.hook, remove_plugins=others)
            added: dict[str, Registered[Any]] = {}

            def register(cls: Any, _info: PluginInfo = info, _added: dict[str, Registered[Any]] = added) -> None:
                name = getattr(cls, "name", None)
                if isinstance(name, str) and name:
                    # Before the checks: asking for a refused class by name then says why its plugin is broken.
                    _info.registered.append(name)
                problem = contract_problem(cls, kind)
                if problem is not None:
                    raise HarnessError(problem)
                name = cls.name  # a str: the contract check made sure
                if name in into or name in _added:
                    where = into[name].source if name in into else _info.source
                    raise HarnessError(f"{kind.kind} '{name}' is registered twice ({where} and {_info.source}); "
                                       "uninstall one of the plugins")
                _added[name] = Registered(name, kind.kind, cls, _info.source)

            try:
                with contextlib.redirect_stdout(sys.stderr):
                    caller(register=register)
            except PLUGIN_FAILURES as error:  # a failing plugin must not take the others down, nor end harness
                self._break(plugin_name, plugin, f"{kind.hook}: {plugin_failure(error)}")
                continue
            into.update(added)

    def add_commands(self, cli: Any, reserved: Iterable[str] = ()) -> list[PluginInfo]:
        """Let each plugin add its commands to ``cli`` (a click group), one plugin at a time; return the plugins
        this broke.

        A plugin whose ``register_commands`` fails, ends the process, or adds a command under the name of one that
        is already there (a built-in, one of ``reserved``, another plugin's) or under a name that is not a plain
        word is broken, and what it added is taken back: the commands that were there stay as they were.
        """
        broken = []
        for plugin_name, plugin in list(self.pm.list_name_plugin()):
            info = self.plugins.get(plugin_name)
            if info is None or info.error or "register_commands" not in info.hooks:
                continue
            others = [other for other in self.pm.get_plugins() if other is not plugin]
            caller = self.pm.subset_hook_caller("register_commands", remove_plugins=others)
            before = dict(cli.commands)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    caller(cli=cli)
                problem = _command_problem(before, cli.commands, set(reserved))
            except PLUGIN_FAILURES as error:
                problem = plugin_failure(error)
            if problem is not None:
                cli.commands.clear()
                cli.commands.update(before)
                self._break(plugin_name, plugin, f"register_commands: {problem}")
                broken.append(info)
        return broken

    def _break(self, plugin_name: str, plugin: Any, error: str) -> None:
        self.plugins[plugin_name].error = error
        self.pm.unregister(plugin)  # its other hooks (commands, machine info) must not run either
        self._forget(plugin_name)

    def _forget(self, plugin_name: str) -> None:
        """Drop what a plugin registered by earlier hooks, now that it is broken."""
        for table in (self.samplers, self.trainers, self.metrics):
            for name in [name for name, entry in table.items() if entry.source == self.plugins[plugin_name].source
                         and name in self.plugins[plugin_name].registered]:
                del table[name]

    def broken(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if info.error]

    def sampler(self, name: str) -> Registered[type[Sampler]]:
        return self._lookup(self.samplers, name, "sampler")

    def trainer(self, name: str) -> Registered[type[Trainer]]:
        return self._lookup(self.trainers, name, "trainer")

    def metric(self, name: str) -> Registered[type[Metric]]:
        return self._lookup(self.metrics, name, "metric")

    def _lookup(self, table: dict[str, Registered[T]], name: str, kind: str) -> Registered[T]:
        if name in table:
            return table[name]
        for info in self.broken():
            if name in info.registered:
                raise HarnessError(f"{kind} '{name}' comes from the plugin '{info.name}' ({info.source}), which is "
                                   f"broken ({info.error}); fix or uninstall that plugin.")
        known = ", ".join(sorted(table)) or "none"
        hint = ""
        if self.broken():
            names = ", ".join(f"'{info.name}'" for info in self.broken())
            hint = f" Broken plugins that may provide it: {names} (see `harness plugins`)."
        raise HarnessError(f"unknown {kind} '{name}'; known {kind}s: {known}.{hint}")


def _command_problem(before: dict[str, Any], after: dict[str, Any], reserved: set[str]) -> str | None:
    """Why the commands a plugin added (``after`` against ``before``) are not allowed, or None."""
    for name, command in after.items():
        if before.get(name) is command:
            continue
        if name in before or name in reserved:
            return f"command '{name}' is already a harness command; a plugin cannot replace it: name yours otherwise"
        problem = name_problem(name, "command")
        if problem is not None:
            return f"{problem}; use letters, digits, '-', '_' or '.'"
    gone = sorted(set(before) - set(after))
    return f"it removed the command '{gone[0]}'; a plugin cannot remove commands" if gone else None


def _import_file(path: Path) -> ModuleType:
    module_name = f"harness_plugin_file_{path.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != path.resolve():
        # Another folder's file of the same name: each file keeps a module of its own.
        module_name += "_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def plugin_dirs_from_env() -> list[str]:
    value = os.environ.get(PLUGIN_DIRS_ENV, "")
    return [part for part in value.split(os.pathsep) if part]


_registries: dict[tuple[str, ...], Registry] = {}


def get_registry(plugin_dirs: Iterable[str | os.PathLike[str]] = ()) -> Registry:
    """The registry for these plugin folders (plus ``HARNESS_PLUGINS``), built on first use."""
    dirs = tuple(str(Path(d).resolve()) for d in [*plugin_dirs_from_env(), *plugin_dirs])
    for directory in dirs:
        if not Path(directory).is_dir():
            raise HarnessError(f"plugin folder '{directory}' does not exist; fix --plugin-dir / {PLUGIN_DIRS_ENV}.")
    if dirs not in _registries:
        _registries[dirs] = Registry(dirs)
    return _registries[dirs]
