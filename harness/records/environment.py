"""What a measurement or training run ran on: versions, device, git commit, and what plugins add.

torch is imported when the environment is gathered, not with this module, so the record types and files
stay importable without it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness.version
from harness.errors import HarnessError, one_line

if TYPE_CHECKING:
    import pluggy
    import torch


# What a plugin's code may raise that harness catches and names: any error, and SystemExit (sys.exit() in a plugin
# would otherwise end harness, with exit code 0 for sys.exit(), having done nothing and said nothing).
PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


def plugin_failure(error: BaseException) -> str:
    """A plugin's failure in one line; ``sys.exit()`` is named as what it is."""
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r}), which a plugin may not do (harness would end, saying nothing)"
    return one_line(error)


def environment(device: torch.device, dtype: torch.dtype,
                plugin_manager: pluggy.PluginManager | None) -> dict[str, Any]:
    """What the numbers were measured on; plugins add fields through ``harness_machine_info``.

    Without a plugin manager (a trainer built by a script or a test) no plugin adds anything.
    """
    import torch

    info: dict[str, Any] = {
        "harness": harness.version.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    # One implementation at a time, in pluggy's call order, so a failing one is named.
    implementations = [] if plugin_manager is None else plugin_manager.hook.harness_machine_info.get_hookimpls()
    for implementation in reversed(implementations):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries --json output
                implementation.function(info=info)
        except PLUGIN_FAILURES as error:
            raise HarnessError(f"the plugin '{implementation.plugin_name}' failed in harness_machine_info: "
                               f"{plugin_failure(error)}; fix or uninstall that plugin.") from None
    return info


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the harness source tree, when it runs from a git checkout."""
    source = Path(harness.version.__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


