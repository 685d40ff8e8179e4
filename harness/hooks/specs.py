"""The hooks a harness plugin can implement.

A plugin is a module (or object) with functions decorated by ``@harness.hookimpl`` whose names match
the specifications below. Built-in plugins (``harness_plugins.*``) use exactly the same hooks as
third-party ones. No hook is ever called inside a timed region.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from harness.benchmark.metric import Metric
    from harness.benchmark.sampler import Sampler
    from harness.training.trainer import Trainer

hookspec = pluggy.HookspecMarker("harness")
hookimpl = pluggy.HookimplMarker("harness")


@hookspec
def register_samplers(register: Callable[[type[Sampler]], None]) -> None:
    """Register sampler classes.

    Called once, when the plugin registry is first built (before any command runs).

    :param register: call ``register(SamplerClass)`` for each sampler the plugin provides. The class
        must subclass :class:`harness.benchmark.sampler.Sampler` and set ``name`` and ``description``.
        Registering a name that another plugin already registered is an error.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_trainers(register: Callable[[type[Trainer]], None]) -> None:
    """Register trainer classes.

    Called once, when the plugin registry is first built.

    :param register: call ``register(TrainerClass)`` for each trainer the plugin provides. The class
        must set ``name`` and ``description``; ``harness train --plugin NAME`` runs it.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Register quality-metric classes.

    Called once, when the plugin registry is first built.

    :param register: call ``register(MetricClass)`` for each metric the plugin provides. The class must
        subclass :class:`harness.benchmark.metric.Metric` and set ``name`` and ``description``;
        ``harness bench --metric NAME`` runs it on every measurement's images, outside the timed region.
    :return: nothing; the return value is ignored.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``harness`` command-line interface.

    Called once, when the CLI first lists or resolves its commands.

    :param cli: the top-level :class:`click.Group`; use ``@cli.command()`` to add a command. A command may not
        take the name of a built-in command (``bench``, ``train``, ...) or of another plugin's: the plugin is then
        broken, and the command that was there stays.
    :return: nothing; the return value is ignored.
    """


@hookspec
def harness_machine_info(info: dict[str, Any]) -> None:
    """Add fields to the ``environment`` block of every benchmark record and training ``config.json``.

    Called once per ``harness bench`` run, before any sampler is loaded, and once per ``harness train``
    run before training starts; never while timing.

    :param info: the environment dict collected so far (versions, device, git commit). Add keys to it
        in place; prefer a namespaced key (``"myplugin_driver"``) so plugins do not collide.
    :return: nothing; the return value is ignored.
    """


def plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows harness's hooks and holds no plugin yet."""
    manager = pluggy.PluginManager("harness")
    manager.add_hookspecs(sys.modules[__name__])
    return manager
