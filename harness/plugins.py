"""Plugin discovery: built-in plugins, installed entry points and loose plugin files, one manager.

Built-in plugins are listed in ``DEFAULT_PLUGINS`` and registered by the same code path as the
third-party ones found in the ``harness`` entry-point group, so they get no special treatment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pluggy

from harness import hookspecs
from harness.errors import HarnessError

ENTRY_POINT_GROUP = "harness"
PLUGIN_DIRS_ENV = "HARNESS_PLUGINS"
TRACE_ENV = "HARNESS_TRACE_HOOKS"

DEFAULT_PLUGINS = (
    "harness_plugins.flash_lcm",
    "harness_plugins.vanilla_sd",
    "harness_plugins.local_student",
    "harness_plugins.distill",
    "harness_plugins.pretrain",
    "harness_plugins.undistilled",
    "harness_plugins.lcm",
    "harness_plugins.shapes",
    "harness_plugins.image_metrics",
    "harness_plugins.fidelity",
    "harness_plugins.clip_score",
)


@dataclass
class PluginInfo:
    """Where a loaded (or broken) plugin came from."""

    name: str
    source: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registered:
    """A sampler or trainer class together with the plugin that registered it."""

    name: str
    kind: str
    cls: type
    source: str

    @property
    def description(self) -> str:
        return getattr(self.cls, "description", "") or ""


class Registry:
    """Everything the plugins registered, built once per process (or per ``--plugin-dir`` set)."""

    def __init__(self, plugin_dirs: Iterable[str | os.PathLike] = ()):
        self.pm = pluggy.PluginManager("harness")
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get(TRACE_ENV):
            self.pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
            self.pm.enable_tracing()
        self.plugins: dict[str, PluginInfo] = {}
        self.samplers: dict[str, Registered] = {}
        self.trainers: dict[str, Registered] = {}
        self.metrics: dict[str, Registered] = {}

        for module_name in DEFAULT_PLUGINS:
            self._register_import(module_name, module_name, "built-in", importlib.import_module)
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
            self._register_import(entry_point.name, entry_point, source, lambda ep: ep.load())
        for directory in plugin_dirs:
            for path in sorted(Path(directory).glob("*.py")):
                self._register_import(path.stem, path, f"file {path}", _import_file)

        self._collect("register_samplers", "sampler", self.samplers)
        self._collect("register_trainers", "trainer", self.trainers)
        self._collect("register_metrics", "metric", self.metrics)

    def _register_import(self, name: str, target, source: str, importer: Callable) -> None:
        # A plugin that fails to import is reported as broken; the others still load.
        if name in self.plugins:
            return
        try:
            module = importer(target)
            self.pm.register(module, name=name)
        except Exception as error:  # noqa: BLE001 - any failure in third-party code is reported
            self.plugins[name] = PluginInfo(name, source, error=f"{type(error).__name__}: {error}")
            return
        hooks = sorted(caller.name for caller in self.pm.get_hookcallers(module) or [])
        self.plugins[name] = PluginInfo(name, source, hooks=hooks)

    def _collect(self, hook_name: str, kind: str, into: dict[str, Registered]) -> None:
        # Calling each implementation ourselves tells us which plugin registered which class.
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            source = self.plugins[impl.plugin_name].source

            def register(cls, _source=source):
                name = getattr(cls, "name", None)
                if not name:
                    raise HarnessError(f"{kind} class {cls!r} from {_source} has no `name`; set one.")
                if name in into:
                    raise HarnessError(
                        f"{kind} '{name}' is registered twice ({into[name].source} and {_source}); "
                        "uninstall one of the plugins."
                    )
                into[name] = Registered(name, kind, cls, _source)

            impl.function(register=register)

    def broken(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if info.error]

    def sampler(self, name: str) -> Registered:
        return _lookup(self.samplers, name, "sampler")

    def trainer(self, name: str) -> Registered:
        return _lookup(self.trainers, name, "trainer")

    def metric(self, name: str) -> Registered:
        return _lookup(self.metrics, name, "metric")


def _lookup(table: dict[str, Registered], name: str, kind: str) -> Registered:
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise HarnessError(f"unknown {kind} '{name}'; known {kind}s: {known}.")
    return table[name]


def _import_file(path: Path):
    module_name = f"harness_plugin_file_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def plugin_dirs_from_env() -> list[str]:
    value = os.environ.get(PLUGIN_DIRS_ENV, "")
    return [part for part in value.split(os.pathsep) if part]


_registries: dict[tuple[str, ...], Registry] = {}


def get_registry(plugin_dirs: Iterable[str | os.PathLike] = ()) -> Registry:
    """The registry for these plugin folders (plus ``HARNESS_PLUGINS``), built on first use."""
    dirs = tuple(str(Path(d).resolve()) for d in [*plugin_dirs_from_env(), *plugin_dirs])
    for directory in dirs:
        if not Path(directory).is_dir():
            raise HarnessError(f"plugin folder '{directory}' does not exist; fix --plugin-dir / {PLUGIN_DIRS_ENV}.")
    if dirs not in _registries:
        _registries[dirs] = Registry(dirs)
    return _registries[dirs]
