"""What a measurement or training run ran on: versions, device, git commit, and what plugins add.

torch is imported when the environment is gathered, not with this module, so the record types and files
stay importable without it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness.version
from harness.errors import HarnessError, one_line

if TYPE_CHECKING:
    import pluggy
    import torch


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
            implementation.function(info=info)
        except Exception as error:  # noqa: BLE001
            raise HarnessError(f"the plugin '{implementation.plugin_name}' failed in harness_machine_info: "
                               f"{one_line(error)}; fix or uninstall that plugin.") from None
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


